"""Tests that run the Triton kernels on CPU through Triton's interpreter (numpy).

TRITON_INTERPRET=1 must be set before triton is first imported. `make test` runs this folder in its
own process with the variable set; it is also set here so `pytest tests/interpret` works alone. If
triton was already imported without it (this folder collected together with tests/), stop with a
clear message instead of running the kernels on a CPU through the GPU driver.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import mmcam_kernels  # noqa: E402  (must come after the environment variable)

if not mmcam_kernels.INTERPRETED:
    raise RuntimeError(
        "tests/interpret needs TRITON_INTERPRET=1 before triton is imported: run it in its own process, "
        "`TRITON_INTERPRET=1 python -m pytest tests/interpret`"
    )
