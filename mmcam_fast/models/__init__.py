"""CAM models: a small registry of backbones, the CAM model, local pretrained weights."""

from __future__ import annotations

from pathlib import Path

from mmcam_fast.models.backbones import (
    BACKBONES,
    DEFAULT_FEATURE_STRIDE,
    FEATURE_STRIDES,
    backbone_name,
    check_feature_stride,
)
from mmcam_fast.models.cam_model import CAMModel
from mmcam_fast.models.pretrained import load_pretrained

__all__ = ["BACKBONES", "CAMModel", "DEFAULT_FEATURE_STRIDE", "FEATURE_STRIDES", "backbone_name",
           "check_feature_stride", "create_model", "load_pretrained",
           "resolve_backbone_name"]


def resolve_backbone_name(name: str) -> str:
    """The registry key of a backbone name (``VGG16`` -> ``vgg16_cam``), by :func:`backbone_name`."""
    return f"{backbone_name(name)}_cam"


def create_model(name: str, num_classes: int, *, feature_stride: int | None = None,
                 conv6_init: str = "kaiming", pretrained: str | Path | None = None) -> CAMModel:
    """Build a CAM model from the registry.

    Args:
        name: a backbone name (``vgg16``, ``resnet50``, ``mobilenet_v2``, ``resnet18``, ``_cam`` optional).
        num_classes: C, the rows of fc.weight.
        feature_stride: the feature map's output stride (8: 28x28 at 224, 16: 14x14, 32: 7x7); None is
            the backbone's default (the released code's: 8 for ResNets and MobileNetV2, 16 for VGG16).
        conv6_init: VGG16-CAM's conv6 initialisation, ``kaiming`` or ``default`` (PyTorch's).
        pretrained: a local torchvision state dict for the backbone, or None for random init.
    """
    key = resolve_backbone_name(name)
    stride = DEFAULT_FEATURE_STRIDE[backbone_name(name)] if feature_stride is None else feature_stride
    check_feature_stride(name, stride)
    backbone, num_features = BACKBONES[key](feature_stride=stride, conv6_init=conv6_init)
    model = CAMModel(backbone, num_features, num_classes)
    if pretrained:
        load_pretrained(model, pretrained)
    return model
