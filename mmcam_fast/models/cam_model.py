"""The CAM model: backbone -> feature map F -> global average pool -> fc. CAMs from fc's weights."""

from __future__ import annotations

import torch
from torch import nn


class CAMModel(nn.Module):
    """Backbone + GAP + linear classifier, the architecture CAM and MinMaxCAM share.

    Attributes:
        backbone: maps images [B, 3, H, W] to feature maps [B, K, h, w].
        fc: linear layer with weight W [C, K] and bias [C].
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(num_features, num_classes)
        self.num_features = num_features
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits [B, C], feature maps [B, K, h, w])."""
        features = self.backbone(images)
        logits = self.fc(features.mean(dim=(2, 3)))
        return logits, features

    def cams(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Raw CAMs ``sum_k W[c_b, k] * F[b, k]`` [B, h, w] for one class per image (no bias, no ReLU)."""
        weight = self.fc.weight[classes].to(features.dtype)  # [B, K]
        return torch.einsum("bk,bkhw->bhw", weight, features)
