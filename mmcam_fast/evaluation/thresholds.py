"""CAM and IoU threshold lists of the protocol, validated."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmcam_fast.errors import ConfigError
from mmcam_fast.rules import check_cam_curve_interval

IMPLS = ("fast", "reference")
DEFAULT_IOU_THRESHOLDS = (30, 50, 70)


def cam_thresholds(cam_curve_interval: float = 0.01) -> np.ndarray:
    """The protocol's CAM thresholds: ``np.arange(0, 1, cam_curve_interval)`` (float64).

    Raises:
        ConfigError: the interval is not in (0, 1) (:func:`check_cam_curve_interval`).
    """
    return np.arange(0, 1, check_cam_curve_interval(cam_curve_interval, "cam_curve_interval"))


def check_iou_thresholds(iou_thresholds: Sequence[int]) -> list[int]:
    """IoU thresholds in percent (ints in [0, 100], at least one, no repeats)."""
    values = list(iou_thresholds)
    if not values or any(not isinstance(v, (int, np.integer)) or not 0 <= v <= 100 for v in values):
        raise ConfigError(f"iou thresholds must be integers in [0, 100] (percent), got {values}")
    if len(set(values)) != len(values):
        raise ConfigError(f"iou thresholds must not repeat, got {values}")
    return [int(v) for v in values]


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ConfigError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    return impl
