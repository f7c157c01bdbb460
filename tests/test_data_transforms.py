"""The protocol transforms on torchvision v2 against the protocol's own v1 pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as v1

from mmcam_fast.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    default_resize_size,
    eval_transform,
    train_transform,
)
from mmcam_fast.errors import ConfigError


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(53, 71, 3), dtype=np.uint8))  # not square


def _protocol_train(resize: int, crop: int) -> v1.Compose:
    """The evaluation benchmark's training transform, verbatim in torchvision v1."""
    return v1.Compose([v1.Resize((resize, resize)), v1.RandomCrop(crop), v1.RandomHorizontalFlip(),
                       v1.ToTensor(), v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _protocol_eval(crop: int) -> v1.Compose:
    return v1.Compose([v1.Resize((crop, crop)), v1.ToTensor(), v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.mark.parametrize("crop", [64, 32])
def test_train_transform_matches_the_protocol_pipeline(image, crop):
    ours, reference = train_transform(crop), _protocol_train(default_resize_size(crop), crop)
    outputs = []
    for seed in range(6):  # several seeds: different crops, with and without the flip
        torch.manual_seed(seed)
        a = ours(image)
        torch.manual_seed(seed)
        b = reference(image)
        assert type(a) is torch.Tensor and a.dtype == torch.float32 and a.shape == (3, crop, crop)
        err = (a - b).abs().max().item()
        # 1e-5: float32 rounding of the normalisation in another order (|value| <= 2.7, where a
        # unit in the last place is 2.4e-7); one 8-bit level of a pixel would be 1.7e-2
        assert err < 1e-5, f"seed {seed}: max abs difference {err}"
        outputs.append(a)
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:]), "augmentation should vary with the RNG"


def test_eval_transform_matches_the_protocol_pipeline(image):
    a, b = eval_transform(48)(image), _protocol_eval(48)(image)
    assert a.shape == (3, 48, 48)
    assert (a - b).abs().max().item() < 1e-5  # float32 rounding only, as above


def test_default_resize_keeps_the_protocol_ratio():
    assert default_resize_size(224) == 256
    assert default_resize_size(64) == 73
    assert default_resize_size(448) == 512


def test_vertical_flip_is_optional_and_deterministic(image):
    plain, flipped = train_transform(32), train_transform(32, vertical_flip=True)
    assert not any("VerticalFlip" in type(t).__name__ for t in plain.transforms)
    assert any("VerticalFlip" in type(t).__name__ for t in flipped.transforms)
    torch.manual_seed(1)
    a = flipped(image)
    torch.manual_seed(1)
    assert torch.equal(a, flipped(image))


def test_resize_smaller_than_crop_is_refused():
    with pytest.raises(ConfigError, match="--image-size"):
        train_transform(64, 60)
