"""The dispersion analysis (Sec. 4.3) on hand-computed vectors and on a real model pass."""

from __future__ import annotations

import math

import torch

from mmcam_fast.analysis import class_centre_distances, feature_dispersion
from mmcam_fast.data.splits import build_datasets
from mmcam_fast.models import create_model


def test_distances_to_the_class_centre_by_hand():
    vectors = torch.tensor([[3.0, 0.0], [0.0, 2.0], [5.0, 5.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # class 0: normalized (1, 0) and (0, 1), centre (0.5, 0.5), distance sqrt(0.5) each;
    # class 1: both normalize to the same unit vector, distance 0
    distances = class_centre_distances(vectors, labels)
    want = torch.tensor([math.sqrt(0.5)] * 2 + [0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(distances, want)


def test_feature_dispersion_of_a_model_on_a_split(tmp_path):
    data = build_datasets("synthetic", tmp_path / "synthetic", image_size=32)
    torch.manual_seed(0)
    model = create_model("resnet18", data.num_classes, feature_stride=8)
    result = feature_dispersion(model, data.test, batch_size=7)
    assert result["images"] == len(data.test)
    for name in ("f", "f_o"):
        # unit vectors: a distance to the mean of unit vectors is in [0, 2]
        assert 0.0 < result[name]["mean"] < 2.0 and result[name]["std"] >= 0.0
    assert result["f"] != result["f_o"]
