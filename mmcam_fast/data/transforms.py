"""The evaluation protocol's image transforms (Choe et al., CVPR 2020), on torchvision.transforms.v2.

train: Resize((R, R)) -> RandomCrop(C) -> RandomHorizontalFlip [-> RandomVerticalFlip] -> float in
       [0, 1] -> Normalize(ImageNet mean, std)
eval:  Resize((C, C)) -> float in [0, 1] -> Normalize(ImageNet mean, std)

The resize works on the PIL image (bilinear, as the protocol's ``transforms.Resize``); cropping and
flipping happen before the conversion to a tensor, so they move the small image. The v2 pipeline
gives the protocol's v1 pipeline's values (to float rounding) for the same torch RNG state: the
random crop offset and the flips draw from torch's global generator in the same order.

R defaults to ``round(C * 8 / 7)``, the protocol's 256/224 ratio: 256 at C=224, 73 at C=64
(Tiny ImageNet and the synthetic set), so the random crop removes the same fraction of the image at
every resolution.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from mmcam_fast.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_resize_size(crop_size: int) -> int:
    """The train-time resize R for a crop C, keeping the protocol's ratio 256/224 = 8/7."""
    return round(crop_size * 8 / 7)


def _to_normalized_tensor() -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.ToPureTensor()]


def train_transform(crop_size: int = 224, resize_size: int | None = None, *,
                    vertical_flip: bool = False, flip_before_crop: bool = False) -> v2.Compose:
    """The training transform: PIL RGB image -> normalized float tensor ``[3, C, C]``.

    Args:
        crop_size: C, the side of the random crop (the network's input size).
        resize_size: R, the side the image is resized to first; default ``round(C * 8 / 7)``.
        vertical_flip: add a random vertical flip after the horizontal one (the MinMaxCAM authors'
            extra augmentation; not part of the evaluation protocol, off by default).
        flip_before_crop: the released code's order, resize -> flips -> random crop, instead of
            resize -> random crop -> flips. The two give the same distribution of images (a flip maps
            a uniform crop offset o to R - C - o, uniform again) but other random draws.
    """
    resize_size = default_resize_size(crop_size) if resize_size is None else resize_size
    if resize_size < crop_size:
        raise ConfigError(f"train resize size {resize_size} is smaller than the crop size {crop_size} "
                          "(--image-size)")
    flips: list[v2.Transform] = [v2.RandomHorizontalFlip()]
    if vertical_flip:
        flips.append(v2.RandomVerticalFlip())
    crop: list[v2.Transform] = [v2.RandomCrop(crop_size)]
    steps = [v2.Resize((resize_size, resize_size)), *(flips + crop if flip_before_crop else crop + flips)]
    return v2.Compose(steps + _to_normalized_tensor())


def eval_transform(crop_size: int = 224) -> v2.Compose:
    """The evaluation transform: PIL RGB image -> normalized float tensor ``[3, C, C]`` (no crop)."""
    return v2.Compose([v2.Resize((crop_size, crop_size))] + _to_normalized_tensor())
