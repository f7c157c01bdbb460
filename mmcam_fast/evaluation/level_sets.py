"""The foreground's bounding box at many levels of a uint8 map at once.

For ``{u > t}`` the first column with a pixel above t is the first index where the running maximum
of the column maxima exceeds t; the running maximum is sorted, so one ``searchsorted`` answers every
level (``O(H + W)`` per level instead of a scan of the image).
"""

from __future__ import annotations

import numpy as np

LEVELS = 256


def foreground_bbox(u: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Pixel bounding box ``(x0, y0, x1, y1)`` (inclusive) of ``{u > t}`` for each t in ``levels``.

    Meaningful only where the set is non-empty (``t < u.max()``).
    """
    levels = np.asarray(levels, dtype=np.int64)
    col_max = u.max(axis=0).astype(np.int64)
    row_max = u.max(axis=1).astype(np.int64)

    def first_above(v: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.maximum.accumulate(v), levels, side="right")

    def last_above(v: np.ndarray) -> np.ndarray:
        return len(v) - 1 - first_above(v[::-1])

    return first_above(col_max), first_above(row_max), last_above(col_max), last_above(row_max)
