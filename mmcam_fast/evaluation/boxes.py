"""Boxes of the WSOL protocol: ground truth rescaled to 224x224, IoU on inclusive pixels.

Boxes are ``(x0, y0, x1, y1)`` with inclusive pixel coordinates, so a box covers
``(x1 - x0 + 1) * (y1 - y0 + 1)`` pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mmcam_fast.data.metadata import WSOLMetadata
from mmcam_fast.errors import DataError
from mmcam_fast.evaluation.scoremaps import SCOREMAP_SIZE, format_offenders

Box = tuple[int, int, int, int]


def _box_text(box: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(v)) for v in box) + ")"


def _scalar_box_problem(box: Sequence[int]) -> str | None:
    """The order and sign rules of :func:`check_boxes` for one box, without numpy (hot paths)."""
    if len(box) != 4:
        return f"expected a box (x0, y0, x1, y1), got {tuple(box)}"
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        return f"box {_box_text(box)} must satisfy x0 <= x1 and y0 <= y1"
    if x0 < 0 or y0 < 0:
        return f"box {_box_text(box)} has a negative coordinate"
    return None


def resize_box(box: Sequence[int], image_size: tuple[int, int], size: int = SCOREMAP_SIZE,
               image_id: str = "?", check: bool = True) -> Box:
    """Rescale a box from an image of ``(width, height)`` to ``size x size``, truncating to int.

    Each coordinate is ``int(float(c) * size / float(width or height))``, the protocol's rule.

    Raises:
        DataError: (with ``check``) a box with x1 < x0, y1 < y0 or a negative coordinate, or an image
            size that is not positive, naming the image id.
    """
    if check:
        problem = _scalar_box_problem(box)
        if problem is None and (len(image_size) != 2 or min(image_size) <= 0):
            problem = f"expected a positive image size (width, height), got {tuple(image_size)}"
        if problem is not None:
            raise DataError(f"ground-truth box of image {image_id}: {problem}")
    width, height = map(float, image_size)
    x0, y0, x1, y1 = map(float, box)
    return (int(x0 * size / width), int(y0 * size / height), int(x1 * size / width), int(y1 * size / height))


def gt_boxes_224(metadata: WSOLMetadata, size: int = SCOREMAP_SIZE) -> dict[str, list[Box]]:
    """Every image's ground-truth boxes rescaled to the evaluation resolution.

    Raises:
        DataError: the metadata has no boxes (a mask data set), an image lacks a box or a size, or a
            box is invalid (see :func:`resize_box`).
    """
    if not metadata.boxes:
        raise DataError(f"{metadata.folder / 'localization.txt'}: no boxes (box evaluation needs "
                        "<image_id>,<x0>,<y0>,<x1>,<y1> lines)")
    out = {}
    for image_id in metadata.image_ids:
        if image_id not in metadata.boxes or image_id not in metadata.sizes:
            raise DataError(f"{metadata.folder}: image {image_id} has no box or no size")
        out[image_id] = [resize_box(b, metadata.sizes[image_id], size, image_id)
                         for b in metadata.boxes[image_id]]
    return out


def box_iou(a: Sequence[int], b: Sequence[int], check: bool = True) -> float:
    """IoU of two boxes on inclusive pixels; 0 when the union is not positive.

    Raises:
        DataError: (with ``check``) a box with x1 < x0, y1 < y0 or a negative coordinate; the
            protocol's formula would return a meaningless number (often 0) for it.
    """
    if check:
        for box in (a, b):
            problem = _scalar_box_problem(box)
            if problem is not None:
                raise DataError(f"box_iou: {problem}")
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1) * max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    denominator = area_a + area_b - inter
    return inter / denominator if denominator > 0 else 0.0


def iou_matrix(boxes: np.ndarray, gt: np.ndarray, check: bool = True) -> np.ndarray:
    """IoU of every box against every ground-truth box, vectorized: ``[N, 4] x [G, 4] -> [N, G]``.

    The same integer arithmetic and one float64 division as :func:`box_iou`, hence the same bits.
    ``check`` validates both arrays (:func:`check_boxes`; internal callers with valid boxes skip it).
    """
    if check:
        boxes = check_boxes(boxes, what="estimated", allow_empty=True)
        gt = check_boxes(gt, allow_empty=True)
    b = np.asarray(boxes, dtype=np.int64)[:, None, :]
    g = np.asarray(gt, dtype=np.int64)[None, :, :]
    inter = (np.maximum(0, np.minimum(b[..., 2], g[..., 2]) - np.maximum(b[..., 0], g[..., 0]) + 1)
             * np.maximum(0, np.minimum(b[..., 3], g[..., 3]) - np.maximum(b[..., 1], g[..., 1]) + 1))
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    area_g = (g[..., 2] - g[..., 0] + 1) * (g[..., 3] - g[..., 1] + 1)
    denominator = area_b + area_g - inter
    positive = denominator > 0
    return np.where(positive, inter / np.where(positive, denominator, 1), 0.0)


def _box_array(boxes: object, image_id: str, what: str, allow_empty: bool) -> np.ndarray:
    """The structural part of :func:`check_boxes`: an int64 ``[N, 4]`` array of finite integers."""
    where = f"{what} boxes of image {image_id}"
    if isinstance(boxes, np.ndarray) and boxes.dtype == np.int64 and boxes.ndim == 2 and boxes.shape[1] == 4:
        array = boxes  # already converted (e.g. an evaluator's ground truth handed to another)
    else:
        try:
            array = np.asarray(boxes)
        except (TypeError, ValueError):
            raise DataError(f"{where}: expected a list of (x0, y0, x1, y1) boxes, got {boxes!r}") from None
        if array.size == 0 and array.ndim <= 2 and (array.ndim < 2 or array.shape[-1] in (0, 4)):
            array = np.zeros((0, 4), np.int64)
        elif array.dtype.kind not in "iuf":
            raise DataError(f"{where}: expected integer coordinates, got {array.dtype} in {boxes!r}")
        elif array.ndim != 2 or array.shape[1] != 4:
            raise DataError(f"{where}: expected (x0, y0, x1, y1) boxes, an array of shape [N, 4], "
                            f"got shape {array.shape}")
        elif array.dtype.kind == "f":
            if not np.isfinite(array).all() or not np.array_equal(array, np.trunc(array)):
                raise DataError(f"{where}: expected finite integer coordinates, got {array.tolist()}")
    if len(array) == 0 and not allow_empty:
        raise DataError(f"image {image_id}: no {what} box")
    return array.astype(np.int64, copy=False)


def _values_problem(array: np.ndarray, size: tuple[int, int] | None) -> str | None:
    """The value rules of :func:`check_boxes` on an int64 ``[N, 4]`` array (vectorized)."""
    x0, y0, x1, y1 = array.T
    for bad, rule in (((x1 < x0) | (y1 < y0), "must satisfy x0 <= x1 and y0 <= y1"),
                      ((x0 < 0) | (y0 < 0), "has a negative coordinate")):
        if bad.any():
            return f"box {_box_text(array[np.argmax(bad)])} {rule}"
    if size is not None:
        width, height = size
        bad = (x1 >= width) | (y1 >= height)
        if bad.any():
            return f"box {_box_text(array[np.argmax(bad)])} extends beyond the {width}x{height} map"
    return None


def check_boxes(boxes: object, image_id: str = "?", *, what: str = "ground-truth", allow_empty: bool = False,
                size: tuple[int, int] | None = None) -> np.ndarray:
    """Validate one image's boxes; returns them as an int64 ``[N, 4]`` array.

    Valid means: ``(x0, y0, x1, y1)`` rows of finite integers (inclusive pixels) with
    ``0 <= x0 <= x1`` and ``0 <= y0 <= y1``, at least one box unless ``allow_empty``, and, when
    ``size`` ``(width, height)`` is given, ``x1 < width`` and ``y1 < height``.

    Raises:
        DataError: naming the image id, the box and the rule it breaks.
    """
    array = _box_array(boxes, image_id, what, allow_empty)
    problem = _values_problem(array, size)
    if problem is not None:
        raise DataError(f"{what} boxes of image {image_id}: {problem}")
    return array


def as_gt_array(gt_boxes: Sequence[Sequence[int]], image_id: str = "?") -> np.ndarray:
    """Ground-truth boxes as a validated int64 ``[G, 4]`` array; at least one box (:func:`check_boxes`)."""
    return check_boxes(gt_boxes, image_id)


def check_gt_boxes(gt_boxes: Mapping[str, Sequence[Sequence[int]]],
                   size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """All images' ground-truth boxes as validated int64 arrays (the rules of :func:`check_boxes`).

    The value rules run once over all boxes together; one DataError lists the first few images with
    an invalid box and counts them.
    """
    arrays = {image_id: _box_array(boxes, image_id, "ground-truth", False)
              for image_id, boxes in gt_boxes.items()}
    if arrays and _values_problem(np.concatenate(list(arrays.values())), size) is not None:
        found = ((image_id, _values_problem(array, size)) for image_id, array in arrays.items())
        problems = [f"ground-truth boxes of image {image_id}: {problem}"
                    for image_id, problem in found if problem]
        raise DataError(format_offenders(problems, len(problems),
                                         "image(s) with an invalid ground-truth box"))
    return arrays
