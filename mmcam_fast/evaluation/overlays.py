"""Overlay pictures: image blended with its heatmap, ground-truth boxes, the estimated box."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from mmcam_fast.errors import DataError
from mmcam_fast.evaluation.box_reference import boxes_at_threshold
from mmcam_fast.evaluation.scoremaps import SCOREMAP_SIZE, check_scoremap, scoremap_path

GT_COLOR = (0, 255, 0)  # BGR green
ESTIMATE_COLOR = (0, 0, 255)  # BGR red


def overlay_image(image: np.ndarray, scoremap: np.ndarray, gt_boxes: Sequence[Sequence[int]],
                  threshold: float, multi_contour: bool = False, alpha: float = 0.5,
                  image_id: str = "?") -> np.ndarray:
    """Blend an RGB image with its JET heatmap and draw the boxes.

    Args:
        image: ``[224, 224, 3]`` uint8 RGB.
        scoremap: ``[224, 224]`` score map in [0, 1].
        gt_boxes: ground-truth boxes at 224x224, drawn green.
        threshold: CAM threshold tau of the estimated box(es), drawn red (the protocol's box rule).
        multi_contour: draw every contour's box instead of the largest contour's.
        alpha: weight of the heatmap.

    Returns:
        ``[224, 224, 3]`` uint8 BGR picture, ready for ``cv2.imwrite``.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.shape != (SCOREMAP_SIZE, SCOREMAP_SIZE, 3):
        raise DataError(f"overlay of image {image_id}: expected a uint8 RGB image of shape "
                        f"({SCOREMAP_SIZE}, {SCOREMAP_SIZE}, 3), got {image.dtype} {image.shape}")
    scoremap = check_scoremap(scoremap, image_id)
    scoremap_u8 = (scoremap * 255).astype(np.uint8)
    heatmap = cv2.applyColorMap(scoremap_u8, cv2.COLORMAP_JET)
    picture = cv2.addWeighted(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), 1 - alpha, heatmap, alpha, 0)
    for x0, y0, x1, y1 in gt_boxes:
        cv2.rectangle(picture, (int(x0), int(y0)), (int(x1), int(y1)), GT_COLOR, 2)
    for x0, y0, x1, y1 in boxes_at_threshold(scoremap_u8[..., None], threshold, multi_contour):
        cv2.rectangle(picture, (x0, y0), (x1, y1), ESTIMATE_COLOR, 2)
    return picture


def write_overlays(images: Sequence[np.ndarray], scoremaps: Sequence[np.ndarray],
                   gt_boxes: Sequence[Sequence[Sequence[int]]], threshold: float, out_dir: str | Path,
                   ids: Sequence[str], multi_contour: bool = False) -> list[Path]:
    """Write one PNG per image, ``<out_dir>/<image_id>.png`` (sub-folders created).

    Args:
        images: ``[224, 224, 3]`` uint8 RGB images.
        scoremaps: their score maps.
        gt_boxes: per image, its ground-truth boxes at 224x224.
        threshold: CAM threshold of the drawn estimate (e.g. MaxBoxAcc's best threshold).
        out_dir: output folder.
        ids: image ids (folders kept).

    Returns:
        The written paths.
    """
    if not len(images) == len(scoremaps) == len(gt_boxes) == len(ids):
        raise DataError(f"write_overlays: {len(images)} images, {len(scoremaps)} score maps, "
                        f"{len(gt_boxes)} box lists and {len(ids)} ids must be as many")
    written = []
    for image, scoremap, boxes, image_id in zip(images, scoremaps, gt_boxes, ids, strict=True):
        path = scoremap_path(out_dir, image_id).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        picture = overlay_image(image, scoremap, boxes, threshold, multi_contour, image_id=image_id)
        if not cv2.imwrite(str(path), picture):
            raise DataError(f"overlay of image {image_id}: cannot write {path}")
        written.append(path)
    return written
