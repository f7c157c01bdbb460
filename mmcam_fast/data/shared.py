"""The project's real data folder: ``$MMCAM_SHARED_DATA``, else ``shared/data`` beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MMCAM_SHARED_DATA"


def shared_data_dir() -> Path:
    """``$MMCAM_SHARED_DATA`` when set, else ``../shared/data`` relative to the repository root."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"
