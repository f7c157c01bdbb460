"""CAM backbones: torchvision networks cut before their classifier, with strides set for CAM.

One registry (:data:`REGISTRY`): per backbone its builder, feature dimension, supported output
strides, the paper's presets and its pretrained-key handling; :func:`backbone_spec` normalises a
name once and returns its entry. Parameter names mirror torchvision's own (the backbone's
``features.*`` / ``layer*.*`` keys equal torchvision's), so a torchvision state dict loads into
``backbone`` without renaming; the only new layer inside a backbone is VGG16-CAM's ``conv6``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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


def _resnet(builder: Callable[..., tvm.ResNet]) -> Callable[..., nn.Module]:
    return lambda feature_stride, conv6_init: ResNetCAMBackbone(builder(weights=None), feature_stride)


@dataclass(frozen=True)
class BackboneSpec:
    """Everything the project knows about one backbone, in one place.

    Attributes:
        name: the normalised name (``--backbone``, presets, ``config.yaml``).
        build: ``build(feature_stride, conv6_init)`` -> the backbone module (torchvision parameter names).
        feature_dim: K, the channels of the feature map (the rows of ``fc.weight`` have K entries).
        strides: the output strides it can be built with (``--feature-stride``).
        default_stride: the released MinMaxCAM code's geometry (28x28 at 224 for ResNets and
            MobileNetV2, 14x14 for VGG16-CAM).
        preset: the paper's training values for this backbone (lambdas, N; see ``mmcam_fast.config``).
        new_layers: key prefixes a torchvision ImageNet state dict does not have (start from init).
        head_prefixes: key prefixes of the torchvision ImageNet head, replaced by the CAM head.
    """

    name: str
    build: Callable[[int, str], nn.Module]
    feature_dim: int
    strides: tuple[int, ...]
    default_stride: int
    preset: Mapping[str, Any] = field(default_factory=dict)
    new_layers: tuple[str, ...] = ()
    head_prefixes: tuple[str, ...] = ("fc.", "classifier.")

    def check_stride(self, stride: int) -> int:
        """``stride`` if this backbone supports it, else a ConfigError naming both and the choices."""
        if stride not in self.strides:
            choices = ", ".join(map(str, self.strides))
            raise ConfigError(f"--feature-stride {stride}: {self.name} supports {choices}")
        return stride


# The paper's presets per backbone (Fig. 6: VGG16 best at lambda_frr = 10 with a small lambda_crr,
# MobileNetV2 prefers a larger lambda_crr; N = 12 sets of S = 5, ResNet50 N = 10).
REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    BackboneSpec("vgg16",
                 lambda feature_stride, conv6_init: VGGCAMBackbone(tvm.vgg16(weights=None), conv6_init),
                 1024, (16,), 16,
                 {"lambda_crr": 1.0, "lambda_frr": 10.0, "sets_per_batch": 12, "feature_stride": 16},
                 new_layers=("conv6.",)),
    BackboneSpec("resnet50", _resnet(tvm.resnet50), 2048, (8, 16, 32), 8,
                 {"lambda_crr": 1.0, "lambda_frr": 1.0, "sets_per_batch": 10}),
    BackboneSpec("mobilenet_v2",
                 lambda feature_stride, conv6_init: MobileNetV2CAMBackbone(tvm.mobilenet_v2(weights=None),
                                                                           feature_stride),
                 1280, (8, 16, 32), 8, {"lambda_crr": 10.0, "lambda_frr": 1.0, "sets_per_batch": 12}),
    BackboneSpec("resnet18", _resnet(tvm.resnet18), 512, (8, 16, 32), 8,
                 {"lambda_crr": 1.0, "lambda_frr": 1.0, "sets_per_batch": 12}),
)}


def backbone_name(name: str) -> str:
    """The one normalisation of a backbone name: ``VGG16``, ``vgg-16``, ``vgg16_cam`` and ``Vgg16-CAM``
    are all ``vgg16``; ``mobilenet-v2`` and ``MobileNetV2`` are ``mobilenet_v2``. Presets, the model
    factory and ``config.yaml`` all use the name this returns.

    Raises:
        ConfigError: an unknown backbone (naming the flag and the choices).
    """
    compact = re.sub(r"[\s_-]", "", str(name).lower()).removesuffix("cam")
    for key in REGISTRY:
        if compact == key.replace("_", ""):
            return key
    raise ConfigError(f"--backbone {name!r}: unknown backbone; choose one of {', '.join(REGISTRY)}")


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry of a backbone, by any spelling :func:`backbone_name` accepts."""
    return REGISTRY[backbone_name(name)]


def check_feature_stride(backbone: str, stride: int) -> int:
    """``stride`` if ``backbone`` supports it, else a ConfigError naming both and what it supports."""
    return backbone_spec(backbone).check_stride(stride)


# Views of the registry, by normalised name
FEATURE_STRIDES: dict[str, tuple[int, ...]] = {n: s.strides for n, s in REGISTRY.items()}
DEFAULT_FEATURE_STRIDE: dict[str, int] = {n: s.default_stride for n, s in REGISTRY.items()}
# Layers that a torchvision ImageNet state dict does not have, over all backbones (the engine's
# classifier learning rate applies to them)
NEW_LAYERS: tuple[str, ...] = tuple(sorted({p for s in REGISTRY.values() for p in s.new_layers}))
