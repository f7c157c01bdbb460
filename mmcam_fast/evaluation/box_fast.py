"""The fast box localization: the reference's counts without tracing contours per threshold.

Contour extraction (``cv2.findContours``) is almost all of the reference's time. Per image this
path computes the same per-threshold booleans as :func:`box_correct_reference` from one
union-find pass over the pixels that yields the contours' boxes at every threshold at once
(:mod:`mmcam_fast.evaluation.level_tree`, which states the facts it relies on):

1. Each integer threshold ``t`` is decided once, however many CAM thresholds map to it; ``t`` at or
   above the map's maximum is the protocol's empty box ``(0, 0, 0, 0)``.
2. The outer contours' boxes are the 8-connected components' bounding boxes. With MaxBoxAccV2
   (every contour's box) the best IoU is their maximum, plus the holes' boxes when a component has
   holes (its Euler number says so) and a box inside it could still reach a higher IoU cut than
   the outer boxes: then the holes of those thresholds are found by a second union-find pass (the
   background's 4-connected components that do not reach the border).
3. With MaxBoxAcc (the largest contour's box) one component is the answer. With several, the
   areas decide: exact for components without holes, bounded otherwise; ties among equal exact
   areas follow OpenCV's order (reverse raster order of the components' first pixels) when the
   threshold has no hole. When the candidates for the largest contour all score in the same band
   of IoU cuts, their order does not matter. Only a threshold left undecided is traced with
   ``cv2.findContours`` on the crop to the foreground's bounding box (same contours, same order
   as the whole image), its areas and boxes computed at once in numpy.
4. IoUs use the reference's integer arithmetic and one float64 division. The bound that gates the
   hole pass: every box inside a component lies in that component's protocol box ``B+``, and
   ``IoU(B, G) <= |B+ & G| / |G|`` holds after rounding too (rounding is monotonic).

:func:`box_correct_fast_u8_rules` answers MaxBoxAcc and MaxBoxAccV2 from the same pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from mmcam_fast.errors import DataError
from mmcam_fast.evaluation.boxes import iou_matrix
from mmcam_fast.evaluation.level_tree import (
    DECIDED,
    GROUPS4,
    GROUPS8,
    HOLES,
    QUADS,
    STEPS4,
    STEPS8,
    TRACE,
    answers,
    earlier_masks,
    hole_levels,
    needed_levels,
    outer_levels,
    sort_by_value,
)

# the passes divide a padded index by the padded width with a multiply and shift (exact below 2**40
# for index x width; level_tree._row_divisor)
_MAX_SIDE = 4096
# zero-capacity record arrays: the passes record nothing outside the tests
_NO_COMPONENTS = np.empty((0, 8), np.int64)
_NO_HOLES = np.empty((0, 5), np.int64)


def foreground_bbox(u: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Pixel bounding box ``(x0, y0, x1, y1)`` (inclusive) of ``{u > t}`` for each t in ``levels``.

    Meaningful only where the set is non-empty (``t < u.max()``). For ``{u > t}`` the first column
    with a pixel above t is the first index where the running maximum of the column maxima exceeds
    t; the running maximum is sorted, so one ``searchsorted`` answers every level (``O(H + W)`` per
    level instead of a scan of the image).
    """
    levels = np.asarray(levels, dtype=np.int64)
    col_max = u.max(axis=0).astype(np.int64)
    row_max = u.max(axis=1).astype(np.int64)

    def first_above(v: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.maximum.accumulate(v), levels, side="right")

    def last_above(v: np.ndarray) -> np.ndarray:
        return len(v) - 1 - first_above(v[::-1])

    return first_above(col_max), first_above(row_max), last_above(col_max), last_above(row_max)


def to_uint8(scoremap: np.ndarray) -> np.ndarray:
    """The protocol's quantization: ``(float64 map * 255).astype(uint8)``."""
    return (np.asarray(scoremap, dtype=np.float64) * 255).astype(np.uint8)


def box_correct_fast_u8(u: np.ndarray, gt_boxes: Sequence[Sequence[int]], cam_thresholds: Sequence[float],
                        iou_thresholds: Sequence[int], multi_contour: bool,
                        stats: dict | None = None) -> np.ndarray:
    """The correctness table of one score map, from its quantized form ``u`` (uint8 ``[H, W]``, see
    :func:`to_uint8`); the contract of :func:`~mmcam_fast.evaluation.box_reference.box_correct_reference`.

    Args:
        stats: when given, receives counts of how the distinct integer thresholds were decided:
            ``distinct``, ``empty`` (no foreground), ``holes`` (the hole pass was needed) and
            ``traced`` (``cv2.findContours`` was needed); the rest took the union-find alone.

    Returns:
        ``[len(iou_thresholds), len(cam_thresholds)]`` booleans.
    """
    return box_correct_fast_u8_rules(u, gt_boxes, cam_thresholds, [(iou_thresholds, multi_contour)], stats)[0]


def box_correct_fast_u8_rules(u: np.ndarray, gt_boxes: Sequence[Sequence[int]],
                              cam_thresholds: Sequence[float], rules: Sequence[tuple[Sequence[int], bool]],
                              stats: dict | None = None) -> list[np.ndarray]:
    """Several rules at once (e.g. MaxBoxAcc and MaxBoxAccV2) from one pass over the map.

    Args:
        rules: ``(iou_thresholds, multi_contour)`` per rule.
        stats: as for :func:`box_correct_fast_u8`, summed over the rules.

    Returns:
        Per rule, ``[len(iou_thresholds), len(cam_thresholds)]`` booleans, each identical to
        :func:`box_correct_fast_u8` (and to the reference) for that rule alone.
    """
    u = np.ascontiguousarray(u, dtype=np.uint8)
    if u.ndim != 2 or not 0 < max(u.shape) < _MAX_SIDE:
        raise DataError(f"box evaluation: expected a 2-D score map with sides below {_MAX_SIDE}, "
                        f"got shape {u.shape}")
    gt = np.asarray(gt_boxes, dtype=np.int64).reshape(-1, 4)
    rule_cuts = [np.array([t / 100 for t in ious], dtype=np.float64) for ious, _ in rules]
    modes = 0
    for _, multi in rules:
        modes |= 2 if multi else 1
    levels, need, umax = needed_levels(u, np.asarray(cam_thresholds, dtype=np.float64).reshape(-1))
    # the kernels are separate compiled functions called from here: one numba function calling the
    # others would be compiled again as a whole, doubling the first-call compile time
    order, hist = sort_by_value(u)
    masks = earlier_masks(u)
    all_cuts = rule_cuts[0] if len(rule_cuts) == 1 else np.unique(np.concatenate(rule_cuts))
    best, status, _ = outer_levels(order, hist, masks, u.shape, need, gt, all_cuts, modes, GROUPS8, STEPS8,
                                   QUADS, _NO_COMPONENTS)
    n_holes = 0
    if modes & 2:
        holes = need & (status[1] == HOLES)
        n_holes = int(holes.sum())
        if n_holes:
            hole_best, _ = hole_levels(order, hist, masks, u.shape, holes, gt, GROUPS4, STEPS4, _NO_HOLES)
            best[1] = np.where(holes, np.maximum(best[1], hole_best), best[1])
    n_traced = 0
    if modes & 1:
        traced = np.flatnonzero(need & (status[0] == TRACE))
        n_traced = len(traced)
        if n_traced:
            best[0, traced] = _traced_ious(u, traced, gt, False)
            status[0, traced] = DECIDED
    out = [answers(levels, best[int(multi)], status[int(multi)], umax, u.shape, gt, cuts)
           for (_, multi), cuts in zip(rules, rule_cuts, strict=True)]
    if stats is not None:
        distinct = np.unique(levels)
        for name, value in (("distinct", len(distinct)), ("empty", int((distinct >= umax).sum())),
                            ("holes", n_holes), ("traced", n_traced)):
            stats[name] = stats.get(name, 0) + value
    return out


def _traced_ious(u: np.ndarray, traced: np.ndarray, gt: np.ndarray, multi_contour: bool) -> np.ndarray:
    """The best IoU at thresholds ``traced`` by the protocol's rule, tracing each on its crop.

    ``cv2.findContours`` on the crop to the foreground's bounding box with ``offset`` returns the
    same contours, in the same order, as on the whole image (checked by the tests).
    """
    height, width = u.shape
    x0s, y0s, x1s, y1s = foreground_bbox(u, traced)
    contours: list[np.ndarray] = []
    per_level: list[int] = []
    for t, x0, y0, x1, y1 in zip(traced.tolist(), x0s.tolist(), y0s.tolist(), x1s.tolist(), y1s.tolist(),
                                 strict=True):
        _, binary = cv2.threshold(u[y0:y1 + 1, x0:x1 + 1], t, 255, cv2.THRESH_BINARY)
        found = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0))[0]
        contours.extend(found)
        per_level.append(len(found))
    boxes, which = _contour_boxes(contours, np.asarray(per_level), multi_contour, width, height)
    best = np.full(len(traced), -1.0)
    np.maximum.at(best, which, iou_matrix(boxes, gt, check=False).max(axis=1))
    return best


def _contour_boxes(contours: list[np.ndarray], per_level: np.ndarray, multi_contour: bool, width: int,
                   height: int) -> tuple[np.ndarray, np.ndarray]:
    """The protocol's boxes of traced contours, vectorized over all contours of all levels.

    Args:
        contours: every level's ``findContours`` output, concatenated in order.
        per_level: how many contours each traced level contributed (at least one each).
        multi_contour: every contour's box, or per level the box of the first contour of largest area.

    Returns:
        ``[N, 4]`` boxes and, per box, the index of its level in ``per_level``.
    """
    lengths = np.fromiter(map(len, contours), dtype=np.int64, count=len(contours))
    points = np.concatenate(contours).reshape(-1, 2).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    x, y = points[:, 0], points[:, 1]
    # cv2.boundingRect is the min and max of the points; the box ends one past the last pixel, clipped
    boxes = np.stack([np.minimum.reduceat(x, starts), np.minimum.reduceat(y, starts),
                      np.minimum(np.maximum.reduceat(x, starts) + 1, width - 1),
                      np.minimum(np.maximum.reduceat(y, starts) + 1, height - 1)], axis=1)
    level = np.repeat(np.arange(len(per_level)), per_level)
    if multi_contour:
        return boxes, level
    # cv2.contourArea is |shoelace| / 2 accumulated in double; for integer points every partial sum is
    # an exact integer, so twice the area in int64 orders contours, ties included, exactly as it does
    following = np.arange(1, len(points) + 1)
    following[starts + lengths - 1] = starts  # each contour closes on its first point
    twice_area = np.abs(np.add.reduceat(x * y[following] - y * x[following], starts))
    level_starts = np.concatenate([[0], np.cumsum(per_level)[:-1]])
    largest = np.maximum.reduceat(twice_area, level_starts)[level]
    index = np.arange(len(contours))
    # Python's max() keeps the first of equal areas: the smallest index reaching the level's maximum
    chosen = np.minimum.reduceat(np.where(twice_area == largest, index, len(contours)), level_starts)
    return boxes[chosen], np.arange(len(per_level))
