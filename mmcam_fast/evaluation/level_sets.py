"""Facts about every upper level set ``{u > t}`` (t = 0..255) of a uint8 map, for all t at once.

The fast box evaluator uses these to skip contour extraction where its result is known:

- :func:`foreground_bbox`: the pixel bounding box of ``{u > t}`` for many t, from the row and column
  maxima (``O(H + W)`` per t).
- :func:`single_blob_levels`: the levels where ``{u > t}`` is exactly one 8-connected component
  without holes. There ``cv2.findContours`` returns exactly one contour (the outer border, whose
  bounding box is the component's), so its box is known without tracing.

Why :func:`single_blob_levels` is exact:

- The Euler number of the 8-connected foreground (components minus 4-connected holes) is the Euler
  characteristic of the clique complex of the 8-adjacency graph:
  ``V - E + T - Q`` with V pixels, E adjacent pairs (horizontal, vertical, both diagonals), T
  triples inside a 2x2 window, Q full 2x2 windows. Each term counts windows whose *minimum* is
  ``> t``, so one histogram of window minima gives the term for every t.
- A set whose every non-empty row is a single run has no hole: a hole pixel has foreground on its
  left and on its right in its own row (else it would reach the border through its row). The
  number of runs is ``V - E_horizontal``; it equals the number of non-empty rows exactly when every
  row is one run. The same holds for columns.
- No hole and Euler number 1 means exactly one component.
"""

from __future__ import annotations

import cv2
import numpy as np

LEVELS = 256


def _count_above(arrays: list[np.ndarray]) -> np.ndarray:
    """For t = 0..255, how many entries of the uint8 arrays are ``> t``."""
    hist = np.zeros(LEVELS, dtype=np.int64)
    for array in arrays:
        # calcHist is several times faster than np.bincount on uint8; its float32 counts are exact
        # (at most 4 * 226 * 226 < 2**24).
        counts = cv2.calcHist([np.ascontiguousarray(array)], [0], None, [LEVELS], [0, LEVELS])
        hist += counts.ravel().astype(np.int64)
    return hist.sum() - np.cumsum(hist)


def single_blob_levels(u: np.ndarray) -> np.ndarray:
    """``[256]`` booleans: True at t when ``{u > t}`` is one 8-connected component with no hole.

    Args:
        u: uint8 ``[H, W]`` map.
    """
    padded = np.zeros((u.shape[0] + 2, u.shape[1] + 2), dtype=np.uint8)  # 0 is never > t for t >= 0
    padded[1:-1, 1:-1] = u
    a, b = padded[:-1, :-1], padded[:-1, 1:]  # the four pixels of every 2x2 window
    c, d = padded[1:, :-1], padded[1:, 1:]
    ab, cd = np.minimum(a, b), np.minimum(c, d)
    horizontal = np.minimum(u[:, :-1], u[:, 1:])
    vertical = np.minimum(u[:-1], u[1:])
    pixels = _count_above([u])
    h_edges = _count_above([horizontal])
    v_edges = _count_above([vertical])
    euler = (pixels - h_edges - v_edges - _count_above([np.minimum(a, d), np.minimum(b, c)])
             + _count_above([np.minimum(ab, c), np.minimum(ab, d), np.minimum(cd, a), np.minimum(cd, b)])
             - _count_above([np.minimum(ab, cd)]))
    rows = _count_above([u.max(axis=1)])
    cols = _count_above([u.max(axis=0)])
    no_holes = (pixels - h_edges == rows) | (pixels - v_edges == cols)
    return no_holes & (euler == 1)


def foreground_bbox(u: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Pixel bounding box ``(x0, y0, x1, y1)`` (inclusive) of ``{u > t}`` for each t in ``levels``.

    Meaningful only where the set is non-empty (``t < u.max()``).
    """
    levels = np.asarray(levels, dtype=np.int64)
    col_max = u.max(axis=0).astype(np.int64)
    row_max = u.max(axis=1).astype(np.int64)

    def first_above(v: np.ndarray) -> np.ndarray:
        # the running maximum is sorted; the first index where it exceeds t is the first v > t
        return np.searchsorted(np.maximum.accumulate(v), levels, side="right")

    def last_above(v: np.ndarray) -> np.ndarray:
        return len(v) - 1 - first_above(v[::-1])

    return first_above(col_max), first_above(row_max), last_above(col_max), last_above(row_max)
