"""CAM models: a small registry of backbones, the CAM model, local pretrained weights."""

from __future__ import annotations

from pathlib import Path

from mmcam_fast.errors import ConfigError
from mmcam_fast.models.backbones import BACKBONES, backbone_name
from mmcam_fast.models.cam_model import CAMModel
from mmcam_fast.models.pretrained import load_pretrained

__all__ = ["BACKBONES", "CAMModel", "backbone_name", "create_model", "load_pretrained",
           "resolve_backbone_name"]


def resolve_backbone_name(name: str) -> str:
    """The registry key of a backbone name (``VGG16`` -> ``vgg16_cam``), by :func:`backbone_name`."""
    return f"{backbone_name(name)}_cam"


def create_model(name: str, num_classes: int, *, large_feature_map: bool = False,
                 pretrained: str | Path | None = None) -> CAMModel:
    """Build a CAM model from the registry.

    Args:
        name: a backbone name (``vgg16``, ``resnet50``, ``mobilenet_v2``, ``resnet18``, ``_cam`` optional).
        num_classes: C, the rows of fc.weight.
        large_feature_map: ResNet only: layer3 at stride 1 too (28x28 maps at 224).
        pretrained: a local torchvision state dict for the backbone, or None for random init.
    """
    key = resolve_backbone_name(name)
    try:
        backbone, num_features = BACKBONES[key](large_feature_map=large_feature_map)
    except ValueError as exc:
        raise ConfigError(f"--large-feature-map: {exc}") from None
    model = CAMModel(backbone, num_features, num_classes)
    if pretrained:
        load_pretrained(model, pretrained)
    return model
