"""What the DALI pipeline must compute, read from a data set's torchvision transform.

The torchvision transform of a ``WSOLDataset`` (``transforms.train_transform`` / ``eval_transform``) is
the reference. The DALI backend does not take a second, separately configured description of the
same transform: it reads the parameters from that ``v2.Compose``, so the two backends cannot drift
apart. A transform the DALI pipeline does not implement is refused with a ``ConfigError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

from mmcam_fast.errors import ConfigError

TRAIN, EVAL = "train", "eval"


@dataclass(frozen=True)
class TransformSpec:
    """The protocol transform as parameters.

    Attributes:
        kind: ``"train"`` (resize to ``resize_size`` square, random crop, flips) or ``"eval"``
            (resize to ``crop_size`` square).
        crop_size: C, the side of the output image.
        resize_size: R, the side of the train-time resize (equal to C for eval).
        horizontal_flip, vertical_flip: random flips with probability 1/2 (train only).
        mean, std: per-channel normalization of values in [0, 1].
    """

    kind: str
    crop_size: int
    resize_size: int
    horizontal_flip: bool
    vertical_flip: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def max_crop_offset(self) -> int:
        """The largest crop anchor along either axis (``R - C``)."""
        return self.resize_size - self.crop_size


def _square(size: Any, what: str) -> int:
    values = [size] if isinstance(size, int) else list(size)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or values[0] != values[1]:
        raise ConfigError(f"the DALI loader implements a square {what}, the transform has size {size}")
    return int(values[0])


def _unsupported(step: Any) -> ConfigError:
    return ConfigError(f"the DALI loader does not implement the transform step {step!r}; use --loader torch "
                       "for transforms other than the protocol's train and eval transforms")


def transform_spec(transform: Any) -> TransformSpec:
    """Read the parameters of a protocol transform (see ``transforms.py``).

    Accepted: ``Resize`` (square, bilinear, antialiased) -> [``RandomCrop`` (square, no padding) ->
    ``RandomHorizontalFlip(0.5)`` [-> ``RandomVerticalFlip(0.5)``]] -> ``ToImage`` ->
    ``ToDtype(float32, scale=True)`` -> ``Normalize`` [-> ``ToPureTensor``]. The flips may also stand
    between the resize and the crop (the released code's order): on a square resize a flip maps a
    uniform crop offset to a uniform one, so both orders draw the same distribution of images and
    the pipeline's crop-then-flip implements either.

    Raises:
        ConfigError: any other transform, naming the step the DALI pipeline does not implement.
    """
    if not isinstance(transform, v2.Compose):
        raise _unsupported(transform)
    steps = list(transform.transforms)
    resize = crop = normalize = None
    hflip = vflip = False
    for step in steps:
        if isinstance(step, v2.Resize) and resize is None and crop is None:
            bilinear = InterpolationMode(step.interpolation) == InterpolationMode.BILINEAR
            if not bilinear or step.antialias is False or step.max_size:
                raise _unsupported(step)
            resize = _square(step.size, "resize")
        elif isinstance(step, v2.RandomCrop) and resize is not None and crop is None:
            if step.padding is not None or step.pad_if_needed:
                raise _unsupported(step)
            crop = _square(step.size, "crop")
        elif isinstance(step, v2.RandomHorizontalFlip) and resize is not None and not hflip and step.p == 0.5:
            hflip = True
        elif isinstance(step, v2.RandomVerticalFlip) and hflip and not vflip and step.p == 0.5:
            vflip = True
        elif isinstance(step, v2.ToImage | v2.ToPureTensor):
            continue
        elif isinstance(step, v2.ToDtype) and step.dtype == torch.float32 and step.scale:
            continue
        elif isinstance(step, v2.Normalize) and normalize is None:
            normalize = step
        else:
            raise _unsupported(step)
    if resize is None or normalize is None or len(normalize.mean) != 3 or len(normalize.std) != 3:
        raise ConfigError("the DALI loader needs a transform with a square Resize and a 3-channel Normalize, "
                          f"got {transform!r}")
    mean = tuple(float(m) for m in normalize.mean)
    std = tuple(float(s) for s in normalize.std)
    if crop is None and (hflip or vflip):
        raise ConfigError(f"the DALI loader implements flips with a random crop only, got {transform!r}")
    if crop is None:
        return TransformSpec(EVAL, resize, resize, False, False, mean, std)  # type: ignore[arg-type]
    if crop > resize:
        raise ConfigError(f"crop size {crop} is larger than the resize size {resize}")
    return TransformSpec(TRAIN, crop, resize, hflip, vflip, mean, std)  # type: ignore[arg-type]
