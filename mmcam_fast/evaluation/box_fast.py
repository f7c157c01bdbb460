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
   tests), so the largest contour and ties are resolved exactly as in the reference.

IoUs of all boxes are then computed at once with the reference's integer arithmetic.
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

    # 4. trace the rest on the foreground's crop
    traced = np.flatnonzero(reachable)
    contour_area, bounding_rect = cv2.contourArea, cv2.boundingRect
    for j in traced.tolist():
        x0, y0 = int(fx0[j]), int(fy0[j])
        crop = u[y0:int(fy1[j]) + 1, x0:int(fx1[j]) + 1]
        _, binary = cv2.threshold(crop, int(distinct[live[j]]), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0))[0]
        if not multi_contour:
            contours = (max(contours, key=contour_area),)
        for contour in contours:
            x, y, w, h = bounding_rect(contour)
            boxes.append((x, y, min(x + w, width - 1), min(y + h, height - 1)))
            owners.append(int(live[j]))

    if boxes:
        np.maximum.at(best, np.asarray(owners), iou_matrix(np.asarray(boxes, dtype=np.int64), gt).max(axis=1))
    if stats is not None:
        for name, value in (("distinct", len(distinct)), ("empty", int(empty.sum())),
                            ("bounded", int((~reachable).sum())), ("traced", len(traced))):
            stats[name] = stats.get(name, 0) + value
    per_tau = best[inverse.reshape(-1)]
    return np.stack([per_tau >= cut for cut in cuts]).reshape(len(cuts), len(levels))
