"""Boxes of the WSOL protocol: ground truth rescaled to 224x224, IoU on inclusive pixels.

Boxes are ``(x0, y0, x1, y1)`` with inclusive pixel coordinates, so a box covers
``(x1 - x0 + 1) * (y1 - y0 + 1)`` pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mmcam_fast.data.metadata import WSOLMetadata
from mmcam_fast.errors import DataError
from mmcam_fast.evaluation.scoremaps import SCOREMAP_SIZE

Box = tuple[int, int, int, int]


def resize_box(box: Sequence[int], image_size: tuple[int, int], size: int = SCOREMAP_SIZE) -> Box:
    """Rescale a box from an image of ``(width, height)`` to ``size x size``, truncating to int.

    Each coordinate is ``int(float(c) * size / float(width or height))``, the protocol's rule.
    """
    width, height = map(float, image_size)
    x0, y0, x1, y1 = map(float, box)
    return (int(x0 * size / width), int(y0 * size / height), int(x1 * size / width), int(y1 * size / height))


def gt_boxes_224(metadata: WSOLMetadata, size: int = SCOREMAP_SIZE) -> dict[str, list[Box]]:
    """Every image's ground-truth boxes rescaled to the evaluation resolution.

    Raises:
        DataError: the metadata has no boxes (a mask data set) or an image lacks a box or a size.
    """
    if not metadata.boxes:
        raise DataError(f"{metadata.folder / 'localization.txt'}: no boxes (box evaluation needs "
                        "<image_id>,<x0>,<y0>,<x1>,<y1> lines)")
    out = {}
    for image_id in metadata.image_ids:
        if image_id not in metadata.boxes or image_id not in metadata.sizes:
            raise DataError(f"{metadata.folder}: image {image_id} has no box or no size")
        out[image_id] = [resize_box(b, metadata.sizes[image_id], size) for b in metadata.boxes[image_id]]
    return out


def box_iou(a: Sequence[int], b: Sequence[int]) -> float:
    """IoU of two boxes on inclusive pixels; 0 when the union is not positive."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1) * max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    denominator = area_a + area_b - inter
    return inter / denominator if denominator > 0 else 0.0


def iou_matrix(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of every box against every ground-truth box, vectorized: ``[N, 4] x [G, 4] -> [N, G]``.

    The same integer arithmetic and one float64 division as :func:`box_iou`, hence the same bits.
    """
    b = np.asarray(boxes, dtype=np.int64)[:, None, :]
    g = np.asarray(gt, dtype=np.int64)[None, :, :]
    inter = (np.maximum(0, np.minimum(b[..., 2], g[..., 2]) - np.maximum(b[..., 0], g[..., 0]) + 1)
             * np.maximum(0, np.minimum(b[..., 3], g[..., 3]) - np.maximum(b[..., 1], g[..., 1]) + 1))
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    area_g = (g[..., 2] - g[..., 0] + 1) * (g[..., 3] - g[..., 1] + 1)
    denominator = area_b + area_g - inter
    positive = denominator > 0
    return np.where(positive, inter / np.where(positive, denominator, 1), 0.0)


def as_gt_array(gt_boxes: Sequence[Sequence[int]], image_id: str = "?") -> np.ndarray:
    """Ground-truth boxes as an int64 ``[G, 4]`` array; at least one box is required."""
    gt = np.asarray(gt_boxes, dtype=np.int64).reshape(-1, 4) if len(gt_boxes) else np.zeros((0, 4), np.int64)
    if len(gt) == 0:
        raise DataError(f"image {image_id}: no ground-truth box")
    return gt


def check_gt_boxes(gt_boxes: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, np.ndarray]:
    """All images' ground-truth boxes as int64 arrays (see :func:`as_gt_array`)."""
    return {image_id: as_gt_array(boxes, image_id) for image_id, boxes in gt_boxes.items()}
