"""The fast box localization: the reference's counts, with contour extraction only where needed.

Contour extraction (``cv2.findContours``) is almost all of the reference's time. Per image this
path computes the same per-threshold booleans as :func:`box_correct_reference` and extracts
contours only for thresholds whose answer is not already known:

1. Same binary image, same answer. ``uint8 map > t`` depends only on how many pixels are ``<= t``,
   so thresholds with equal counts share one result (at interval 0.001 the 1000 thresholds give at
   most 256 distinct images).
2. Empty foreground: the protocol's box ``(0, 0, 0, 0)``.
3. An upper bound that cannot reach the lowest IoU threshold. Every contour point is a foreground
   pixel, so every estimated box lies inside ``F+``, the foreground's pixel bounding box with
   ``x1, y1`` moved one past the last pixel and clipped, exactly as the protocol builds boxes. For
   a box ``B`` inside ``F+``: ``IoU(B, G) = |B & G| / (|B| + |G| - |B & G|) <= |F+ & G| / |G|``.
   When that bound, computed in the same float64 arithmetic, is below the smallest ``T / 100``,
   the answer is False for every T without tracing (rounding is monotonic, so the computed IoU
   cannot exceed the computed bound).
4. Otherwise: ``cv2.findContours`` on the crop to the foreground's bounding box with ``offset``,
   which returns the same contours, in the same order, as on the whole image (checked by the
   tests). Boxes and areas of all traced contours are then computed at once with numpy: the box is
   the points' min and max (``cv2.boundingRect``), the area ``|shoelace| / 2``, which is what
   ``cv2.contourArea`` computes and is exact for integer points, and per level the first contour
   of largest area is kept, as Python's ``max`` does in the reference.

IoUs of all boxes are computed at once with the reference's integer arithmetic.

What was measured and left out: stacking all thresholds' binary images into one image for a
single ``findContours`` call (same pixels to scan, worse cache behaviour: slower), and certifying
"one component, no hole" levels for all thresholds at once from Euler numbers (exact, but on
realistic maps it cost as much as the tracing it saved).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from mmcam_fast.evaluation.boxes import iou_matrix
from mmcam_fast.evaluation.level_sets import LEVELS, foreground_bbox


def to_uint8(scoremap: np.ndarray) -> np.ndarray:
    """The protocol's quantization: ``(float64 map * 255).astype(uint8)``."""
    return (np.asarray(scoremap, dtype=np.float64) * 255).astype(np.uint8)


def box_correct_fast(scoremap: np.ndarray, gt_boxes: Sequence[Sequence[int]], cam_thresholds: Sequence[float],
                     iou_thresholds: Sequence[int], multi_contour: bool,
                     stats: dict | None = None) -> np.ndarray:
    """Same contract as :func:`~mmcam_fast.evaluation.box_reference.box_correct_reference`."""
    u = to_uint8(scoremap)
    return box_correct_fast_u8(u, gt_boxes, cam_thresholds, iou_thresholds, multi_contour, stats)


def box_correct_fast_u8(u: np.ndarray, gt_boxes: Sequence[Sequence[int]], cam_thresholds: Sequence[float],
                        iou_thresholds: Sequence[int], multi_contour: bool,
                        stats: dict | None = None) -> np.ndarray:
    """:func:`box_correct_fast` on an already quantized map ``u`` (uint8 ``[H, W]``).

    Args:
        stats: when given, receives counts of how each distinct threshold was decided
            (``distinct``, ``empty``, ``bounded``, ``traced``).

    Returns:
        ``[len(iou_thresholds), len(cam_thresholds)]`` booleans.
    """
    height, width = u.shape
    gt = np.asarray(gt_boxes, dtype=np.int64).reshape(-1, 4)
    cuts = [iou_threshold / 100 for iou_threshold in iou_thresholds]
    umax = int(u.max())
    levels = (np.asarray(cam_thresholds, dtype=np.float64) * float(umax)).astype(np.int64)  # int(tau * max)

    # 1. one result per distinct binary image, keyed by the number of pixels <= t
    at_or_below = np.concatenate([[0], np.cumsum(np.bincount(u.ravel(), minlength=LEVELS))])
    keys = at_or_below[np.clip(levels, -1, LEVELS - 1) + 1]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    distinct = levels[first]
    best = np.full(len(distinct), -1.0)  # best IoU per distinct image; -1: below every cut
    boxes: list[tuple[int, int, int, int]] = []
    owners: list[int] = []

    # 2. empty foreground
    empty = distinct >= umax
    for k in np.flatnonzero(empty).tolist():
        boxes.append((0, 0, 0, 0))
        owners.append(k)

    # 3. the bound through the foreground's box F+
    live = np.flatnonzero(~empty)
    fx0, fy0, fx1, fy1 = foreground_bbox(u, distinct[live])
    fbox = np.stack([fx0, fy0, np.minimum(fx1 + 1, width - 1), np.minimum(fy1 + 1, height - 1)], axis=1)
    f, g = fbox[:, None, :], gt[None, :, :]
    inter = (np.maximum(0, np.minimum(f[..., 2], g[..., 2]) - np.maximum(f[..., 0], g[..., 0]) + 1)
             * np.maximum(0, np.minimum(f[..., 3], g[..., 3]) - np.maximum(f[..., 1], g[..., 1]) + 1))
    gt_area = (gt[:, 2] - gt[:, 0] + 1) * (gt[:, 3] - gt[:, 1] + 1)
    bound = (inter / gt_area[None, :]).max(axis=1) if len(live) else np.zeros(0)
    reachable = bound >= min(cuts)

    # 4. trace the rest on the foreground's crop; contours' areas and boxes are computed afterwards,
    # all at once (per-contour OpenCV calls from Python would cost as much as the tracing)
    traced = np.flatnonzero(reachable)
    contours: list[np.ndarray] = []
    per_level: list[int] = []
    for j in traced.tolist():
        x0, y0 = int(fx0[j]), int(fy0[j])
        crop = u[y0:int(fy1[j]) + 1, x0:int(fx1[j]) + 1]
        _, binary = cv2.threshold(crop, int(distinct[live[j]]), 255, cv2.THRESH_BINARY)
        found = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0))[0]
        contours.extend(found)
        per_level.append(len(found))
    if contours:
        traced_boxes, which = _contour_boxes(contours, np.asarray(per_level), multi_contour, width, height)
        boxes.extend(map(tuple, traced_boxes.tolist()))
        owners.extend(live[traced[which]].tolist())

    if boxes:
        np.maximum.at(best, np.asarray(owners), iou_matrix(np.asarray(boxes, dtype=np.int64), gt).max(axis=1))
    if stats is not None:
        for name, value in (("distinct", len(distinct)), ("empty", int(empty.sum())),
                            ("bounded", int((~reachable).sum())), ("traced", len(traced))):
            stats[name] = stats.get(name, 0) + value
    per_tau = best[inverse.reshape(-1)]
    return np.stack([per_tau >= cut for cut in cuts]).reshape(len(cuts), len(levels))


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
