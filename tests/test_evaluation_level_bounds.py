"""The union-find passes of the box evaluator never index outside their arrays (numba bounds checks).

numba does not check indices: a pass that writes one element past an array corrupts memory
silently and may still return the right answer. Here the fast evaluator runs in a fresh process
with ``NUMBA_BOUNDSCHECK=1`` (an out-of-range index raises IndexError) on the maps that fill the
arrays to their ends: one pixel (the component ids start at 1, so the id arrays need n + 1 slots),
one row, one column, isolated pixels (a component per pixel), a checkerboard (many holes) and
noise, each against the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import numpy as np
    from mmcam_fast.evaluation.box_fast import box_correct_fast_u8, to_uint8
    from mmcam_fast.evaluation.box_reference import box_correct_reference

    rng = np.random.default_rng(0)
    isolated = np.zeros((9, 9))
    isolated[::2, ::2] = rng.uniform(0.2, 1.0, (5, 5))
    maps = [np.ones((1, 1)), np.full((1, 1), 0.5), (np.arange(7) % 2 * 0.9 + 0.1)[None, :],
            (np.arange(7) % 3 / 2.0)[:, None], isolated, (np.indices((8, 9)).sum(axis=0) % 2) * 0.8,
            rng.random((12, 10)), np.round(rng.random((5, 6)) * 3) / 3]
    taus = np.arange(0, 1, 0.05)
    for m in maps:
        h, w = m.shape
        for gt in ([(0, 0, w - 1, h - 1)], [(0, 0, 0, 0)], [(w // 2, h // 2, w - 1, h - 1)]):
            for multi in (False, True):
                want = box_correct_reference(m, gt, taus, [30, 50, 70], multi)
                got = box_correct_fast_u8(to_uint8(m), gt, taus, [30, 50, 70], multi)
                assert np.array_equal(want, got), (m.shape, gt, multi)
    print("bounds ok")
""")


def test_the_passes_stay_inside_their_arrays(tmp_path):
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "bounds ok"
