"""mmcam_fast: a fast, exact training and evaluation engine for MinMaxCAM (BMVC 2021)."""

__version__ = "0.1.0"
