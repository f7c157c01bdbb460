"""CAM backbones: torchvision networks cut before their classifier, with strides set for CAM.

Each builder returns ``(backbone, num_features)``. Parameter names mirror torchvision's own (the
backbone's ``features.*`` / ``layer*.*`` keys equal torchvision's), so a torchvision state dict loads
into ``backbone`` without renaming; the only new layer inside a backbone is VGG16-CAM's ``conv6``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn
from torchvision import models as tvm

from mmcam_fast.errors import ConfigError


class ResNetCAMBackbone(nn.Module):
    """torchvision ResNet up to layer4 at output stride 8 (layer3 and layer4 at stride 1: 28x28 at 224,
    the released MinMaxCAM code), 16 (layer4 at stride 1: 14x14) or 32 (torchvision's own: 7x7)."""

    def __init__(self, net: tvm.ResNet, feature_stride: int = 8):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if feature_stride <= 16:
            _set_first_block_stride(self.layer4, 1)
        if feature_stride <= 8:
            _set_first_block_stride(self.layer3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _set_first_block_stride(layer: nn.Sequential, stride: int) -> None:
    block = layer[0]
    # torchvision's Bottleneck strides conv2 (ResNet v1.5); BasicBlock strides conv1.
    strided = block.conv2 if isinstance(block, tvm.resnet.Bottleneck) else block.conv1
    strided.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


class VGGCAMBackbone(nn.Module):
    """VGG16 conv layers without the last max-pool (stride 16), then conv6 3x3 512->1024 + ReLU.

    ``conv6_init``: ``"kaiming"`` (He normal, fan_out, zero bias: the paper recipe's choice) or
    ``"default"`` (PyTorch's own ``Conv2d`` initialisation, as the released code leaves it).
    """

    def __init__(self, net: tvm.VGG, conv6_init: str = "kaiming"):
        super().__init__()
        layers = list(net.features.children())
        assert isinstance(layers[-1], nn.MaxPool2d)
        self.features = nn.Sequential(*layers[:-1])
        self.conv6 = nn.Conv2d(512, 1024, kernel_size=3, padding=1)
        self.relu6 = nn.ReLU(inplace=True)
        if conv6_init == "kaiming":
            nn.init.kaiming_normal_(self.conv6.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(self.conv6.bias)
        elif conv6_init != "default":
            raise ConfigError(f"--conv6-init {conv6_init!r}: expected kaiming or default")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu6(self.conv6(self.features(x)))


class MobileNetV2CAMBackbone(nn.Module):
    """torchvision MobileNetV2 features at output stride 8 (the 64- and 160-channel stages' stride-2
    convolutions at stride 1: 28x28 at 224, the released MinMaxCAM code), 16 (the 160-channel stage
    only: 14x14) or 32 (torchvision's own: 7x7)."""

    def __init__(self, net: tvm.MobileNetV2, feature_stride: int = 8):
        super().__init__()
        self.features = net.features
        strided = [m for m in self.features.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
        # strided[-1]: the depthwise conv of features[14] (first block of the 160 stage);
        # strided[-2]: that of features[7] (first block of the 64 stage)
        for conv in strided[len(strided) - {8: 2, 16: 1, 32: 0}[feature_stride]:]:
            conv.stride = (1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def resnet50_cam(feature_stride: int = 8, **_: object) -> tuple[nn.Module, int]:
    return ResNetCAMBackbone(tvm.resnet50(weights=None), feature_stride), 2048


def resnet18_cam(feature_stride: int = 8, **_: object) -> tuple[nn.Module, int]:
    return ResNetCAMBackbone(tvm.resnet18(weights=None), feature_stride), 512


def vgg16_cam(feature_stride: int = 16, conv6_init: str = "kaiming", **_: object) -> tuple[nn.Module, int]:
    return VGGCAMBackbone(tvm.vgg16(weights=None), conv6_init), 1024


def mobilenet_v2_cam(feature_stride: int = 8, **_: object) -> tuple[nn.Module, int]:
    return MobileNetV2CAMBackbone(tvm.mobilenet_v2(weights=None), feature_stride), 1280


# Output strides each backbone can be built with (--feature-stride), and the released MinMaxCAM
# code's, the default: 28x28 maps at 224 for ResNet50-CAM and MobileNetV2-CAM, 14x14 for VGG16-CAM.
FEATURE_STRIDES: dict[str, tuple[int, ...]] = {
    "vgg16": (16,), "resnet50": (8, 16, 32), "mobilenet_v2": (8, 16, 32), "resnet18": (8, 16, 32)}
DEFAULT_FEATURE_STRIDE: dict[str, int] = {"vgg16": 16, "resnet50": 8, "mobilenet_v2": 8, "resnet18": 8}


def check_feature_stride(backbone: str, stride: int) -> int:
    """``stride`` if ``backbone`` supports it, else a ConfigError naming both and what it supports."""
    supported = FEATURE_STRIDES[backbone_name(backbone)]
    if stride not in supported:
        raise ConfigError(f"--feature-stride {stride}: {backbone_name(backbone)} supports "
                          f"{', '.join(map(str, supported))}")
    return stride


BACKBONES: dict[str, Callable[..., tuple[nn.Module, int]]] = {
    "vgg16_cam": vgg16_cam,
    "resnet50_cam": resnet50_cam,
    "mobilenet_v2_cam": mobilenet_v2_cam,
    "resnet18_cam": resnet18_cam,
}


def backbone_name(name: str) -> str:
    """The one normalisation of a backbone name: ``VGG16``, ``vgg-16``, ``vgg16_cam`` and ``Vgg16-CAM``
    are all ``vgg16``; ``mobilenet-v2`` and ``MobileNetV2`` are ``mobilenet_v2``. Presets, the model
    factory and ``config.yaml`` all use the name this returns.

    Raises:
        ConfigError: an unknown backbone (naming the flag and the choices).
    """
    compact = re.sub(r"[\s_-]", "", str(name).lower()).removesuffix("cam")
    for key in BACKBONES:
        short = key.removesuffix("_cam")
        if compact == short.replace("_", ""):
            return short
    choices = ", ".join(n.removesuffix("_cam") for n in BACKBONES)
    raise ConfigError(f"--backbone {name!r}: unknown backbone; choose one of {choices}")


# Layers that a torchvision ImageNet state dict does not have: they start from their initialisation.
NEW_LAYERS = ("conv6.",)
# Keys of a torchvision state dict that belong to its ImageNet head, replaced by the CAM head.
TORCHVISION_HEAD_PREFIXES = ("fc.", "classifier.")
