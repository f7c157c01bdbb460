"""Where the tests and benchmarks find the project's real data: ``$MMCAM_SHARED_DATA``, else
``shared/data`` beside the checkout (``../shared/data`` from the repository root)."""

import os
from pathlib import Path


def shared_data_dir() -> Path:
    beside_checkout = Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(os.environ.get("MMCAM_SHARED_DATA") or beside_checkout)
