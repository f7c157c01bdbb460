"""CAM models: the backbone registry, the CAM model, local pretrained weights."""

from __future__ import annotations

from pathlib import Path

import torch

from mmcam_fast.models.backbones import (
    DEFAULT_FEATURE_STRIDE,
    FEATURE_STRIDES,
    REGISTRY,
    BackboneSpec,
    backbone_name,
    backbone_spec,
    check_feature_stride,
)
from mmcam_fast.models.cam_model import CAMModel
from mmcam_fast.models.pretrained import load_pretrained

__all__ = ["REGISTRY", "BackboneSpec", "CAMModel", "DEFAULT_FEATURE_STRIDE", "FEATURE_STRIDES",
           "backbone_name", "backbone_spec", "check_feature_stride", "create_model", "load_pretrained",
           "unwrap"]


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
    spec = backbone_spec(name)
    stride = spec.check_stride(spec.default_stride if feature_stride is None else feature_stride)
    model = CAMModel(spec.build(stride, conv6_init), spec.feature_dim, num_classes)
    if pretrained:
        load_pretrained(model, pretrained, spec)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
