"""The reference box localization: the protocol's rule written literally, per threshold.

This is the specification in code (Choe et al., CVPR 2020, ``compute_bboxes_from_scoremaps`` and
``BoxEvaluator.accumulate``): for every CAM threshold, binarize, extract contours with OpenCV, take
the largest contour's box (or every contour's box), and score it against the ground truth. The fast
path in :mod:`mmcam_fast.evaluation.box_fast` is tested against it count for count.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from mmcam_fast.evaluation.boxes import Box, box_iou


def boxes_at_threshold(scoremap_u8: np.ndarray, tau: float, multi_contour: bool) -> list[Box]:
    """Estimated boxes of one uint8 score map (``[H, W, 1]``) at CAM threshold ``tau``.

    ``uint8 map > int(tau * max)`` (strictly greater), contours by ``RETR_TREE`` (holes included),
    the largest by ``cv2.contourArea`` (the first of equal areas) unless ``multi_contour``; a box is
    ``(x, y, min(x + w, W - 1), min(y + h, H - 1))`` of ``cv2.boundingRect``; no contour gives the
    single box ``(0, 0, 0, 0)``.
    """
    height, width = scoremap_u8.shape[:2]
    _, binary = cv2.threshold(scoremap_u8, thresh=int(tau * np.max(scoremap_u8)), maxval=255,
                              type=cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
        return [(0, 0, 0, 0)]
    if not multi_contour:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        boxes.append((x, y, min(x + w, width - 1), min(y + h, height - 1)))
    return boxes


def box_ious_reference(scoremap: np.ndarray, gt_boxes: Sequence[Sequence[int]],
                       cam_thresholds: Sequence[float], multi_contour: bool) -> list[float]:
    """Per CAM threshold, the best IoU of the estimated boxes against any ground-truth box.

    Args:
        scoremap: float64 ``[H, W]`` map in [0, 1] (already validated).
        gt_boxes: the image's ground-truth boxes at the map's resolution.
        cam_thresholds: the thresholds tau.
        multi_contour: every contour's box (MaxBoxAccV2) instead of the largest contour's.
    """
    scoremap_u8 = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
    ious = []
    for tau in cam_thresholds:
        boxes = boxes_at_threshold(scoremap_u8, tau, multi_contour)
        ious.append(max(max(box_iou(box, gt, check=False) for gt in gt_boxes) for box in boxes))
    return ious


def box_correct_reference(scoremap: np.ndarray, gt_boxes: Sequence[Sequence[int]],
                          cam_thresholds: Sequence[float], iou_thresholds: Sequence[int],
                          multi_contour: bool) -> np.ndarray:
    """``[len(iou_thresholds), len(cam_thresholds)]`` booleans: IoU >= T / 100 at each tau."""
    ious = box_ious_reference(scoremap, gt_boxes, cam_thresholds, multi_contour)
    return np.array([[iou >= iou_threshold / 100 for iou in ious] for iou_threshold in iou_thresholds],
                    dtype=bool).reshape(len(iou_thresholds), len(ious))
