"""WSOL evaluation (Choe et al., CVPR 2020): score maps, MaxBoxAcc / MaxBoxAccV2 / PxAP, top-k Loc, overlays.

Every evaluator has a literal ``impl="reference"`` and a ``impl="fast"`` (default) implementation
that produce identical counts, hence identical numbers.

Every entry point that takes boxes or score maps validates them with one pair of helpers,
:func:`check_boxes` (``0 <= x0 <= x1``, ``0 <= y0 <= y1``, integer ``[N, 4]``) and
:func:`check_scoremap` / :func:`check_scoremaps` (2-D float, 224x224 where the protocol needs it,
finite, in [0, 1]), shared with ``mmcam-evaluate``: bad input is a ``DataError`` naming the image.
Callers that validated already pass ``check=False``.
"""

from mmcam_fast.evaluation.box_evaluator import BoxEvaluator, BoxResult, accumulate_boxes, box_correct
from mmcam_fast.evaluation.boxes import box_iou, check_boxes, gt_boxes_224, iou_matrix, resize_box
from mmcam_fast.evaluation.loc_accuracy import LocAccuracyEvaluator
from mmcam_fast.evaluation.mask_evaluator import MaskEvaluator, load_gt_mask, pxap_from_histograms
from mmcam_fast.evaluation.overlays import (
    overlay_image,
    select_overlay_ids,
    write_overlays,
    write_split_overlays,
)
from mmcam_fast.evaluation.protocol import (
    dataset_name,
    evaluate_scoremap_folder,
    evaluate_scoremaps,
    split_folder,
)
from mmcam_fast.evaluation.scoremaps import (
    SCOREMAP_SIZE,
    cams_to_scoremaps,
    check_scoremap,
    check_scoremaps,
    iter_scoremaps,
    load_scoremap,
    save_scoremaps,
    scoremap_path,
)
from mmcam_fast.evaluation.thresholds import DEFAULT_IOU_THRESHOLDS, cam_thresholds

__all__ = [
    "DEFAULT_IOU_THRESHOLDS", "SCOREMAP_SIZE", "BoxEvaluator", "BoxResult", "LocAccuracyEvaluator",
    "MaskEvaluator", "accumulate_boxes", "box_correct", "box_iou", "cam_thresholds", "cams_to_scoremaps",
    "check_boxes", "check_scoremap", "check_scoremaps", "dataset_name", "evaluate_scoremap_folder",
    "evaluate_scoremaps", "gt_boxes_224", "iou_matrix", "iter_scoremaps", "load_gt_mask", "load_scoremap",
    "overlay_image", "pxap_from_histograms", "resize_box", "save_scoremaps", "scoremap_path",
    "select_overlay_ids", "split_folder", "write_overlays", "write_split_overlays",
]
