"""CAM models: a small registry of backbones, the CAM model, local pretrained weights."""

from __future__ import annotations

from pathlib import Path

from mmcam_fast.errors import ConfigError
from mmcam_fast.models.backbones import BACKBONES
from mmcam_fast.models.cam_model import CAMModel
from mmcam_fast.models.pretrained import load_pretrained

__all__ = ["BACKBONES", "CAMModel", "create_model", "load_pretrained", "resolve_backbone_name"]


def resolve_backbone_name(name: str) -> str:
    """Accept CLI names with or without the ``_cam`` suffix (``resnet50`` -> ``resnet50_cam``)."""
    key = name.lower().replace("-", "_")
    key = key if key.endswith("_cam") else f"{key}_cam"
    if key not in BACKBONES:
        choices = ", ".join(n.removesuffix("_cam") for n in BACKBONES)
        raise ConfigError(f"--backbone {name!r}: unknown backbone; choose one of {choices}")
    return key


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
