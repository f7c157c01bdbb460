"""The bounds that several entry points check, each written once: the training config, the evaluators
and the kernels all call these."""

from __future__ import annotations

from mmcam_kernels import MIN_SET_SIZE

from mmcam_fast.errors import ConfigError

__all__ = ["MIN_SET_SIZE", "check_cam_curve_interval", "check_set_size"]


def check_cam_curve_interval(cam_curve_interval: float, flag: str = "--cam-curve-interval") -> float:
    """The one rule for the CAM threshold spacing, for every entry point: a number in (0, 1).

    Raises:
        ConfigError: naming ``flag``.
    """
    if not 0 < cam_curve_interval < 1:
        raise ConfigError(f"{flag} must be in (0, 1), got {cam_curve_interval}")
    return cam_curve_interval


def check_set_size(set_size: int, flag: str = "--set-size") -> int:
    """S for MinMaxCAM: at least :data:`MIN_SET_SIZE` (CRR compares images within a set), the bound
    the kernels' ``check_set_batch`` holds every batch to (with whole sets in it)."""
    if set_size < MIN_SET_SIZE:
        raise ConfigError(f"{flag} must be at least {MIN_SET_SIZE} (CRR compares images within a set), "
                          f"got {set_size}")
    return set_size
