"""GT-known Loc, Top-1 Loc and Top-5 Loc at one CAM threshold.

Definitions (per image, IoU threshold 50 by default, box estimation as in MaxBoxAcc: the largest
contour's box at CAM threshold tau, unless ``multi_contour``):

- ``loc``: the box estimated from the **ground-truth class's** score map has IoU >= 0.5 with a
  ground-truth box.
- GT-known Loc = mean of ``loc``.
- Top-1 Loc = mean of ``top1 == label and loc``.
- Top-5 Loc = mean of ``label in top5 and loc``.

Why one score map per image suffices: Top-1 Loc asks for the box of the *predicted* class to be
correct *and* the prediction to be right; when the prediction is right, the predicted class is the
ground-truth class and its score map is the one given here; when it is wrong the image counts as
wrong whatever its box. Top-5 Loc (the ILSVRC convention) asks for one of the five (class, box)
pairs to match both class and box; only the pair whose class is the label can, and its box again
comes from the ground-truth class's map.

tau is either fixed (``cam_threshold``) or, by default, the threshold where GT-known Loc is highest
over the protocol's threshold list (for the default settings that is MaxBoxAcc's threshold, and
GT-known Loc then equals MaxBoxAcc).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mmcam_fast.data.metadata import WSOLMetadata
from mmcam_fast.errors import ConfigError, DataError
from mmcam_fast.evaluation.box_evaluator import box_correct
from mmcam_fast.evaluation.boxes import check_gt_boxes, gt_boxes_224
from mmcam_fast.evaluation.scoremaps import check_scoremap
from mmcam_fast.evaluation.thresholds import cam_thresholds as make_cam_thresholds
from mmcam_fast.evaluation.thresholds import check_impl, check_iou_thresholds


class LocAccuracyEvaluator:
    """Accumulates per-image localization and classification correctness.

    Args:
        gt_boxes: image id -> ground-truth boxes at 224x224.
        labels: image id -> ground-truth class.
        cam_threshold: a fixed tau; by default every tau of ``arange(0, 1, cam_curve_interval)`` is
            tracked and :meth:`compute` reports at the best GT-known tau.
        cam_curve_interval: the threshold grid when ``cam_threshold`` is None.
        iou_threshold: IoU threshold in percent.
        multi_contour: best box over all contours instead of the largest contour's box.
        impl: ``"fast"`` or ``"reference"`` box estimation (identical results).
    """

    def __init__(self, gt_boxes: Mapping[str, Sequence[Sequence[int]]], labels: Mapping[str, int], *,
                 cam_threshold: float | None = None, cam_curve_interval: float = 0.01,
                 iou_threshold: int = 50, multi_contour: bool = False, impl: str = "fast"):
        self.gt_boxes = check_gt_boxes(gt_boxes)
        self.labels = dict(labels)
        if cam_threshold is not None and not 0 <= cam_threshold < 1:
            raise ConfigError(f"cam_threshold must be in [0, 1), got {cam_threshold}")
        self.cam_thresholds = (np.array([cam_threshold], dtype=np.float64) if cam_threshold is not None
                               else make_cam_thresholds(cam_curve_interval))
        self.fixed = cam_threshold is not None
        self.iou_threshold = check_iou_thresholds([iou_threshold])[0]
        self.multi_contour = bool(multi_contour)
        self.impl = check_impl(impl)
        n = len(self.cam_thresholds)
        self.gt_known = np.zeros(n, dtype=np.int64)
        self.top1 = np.zeros(n, dtype=np.int64)
        self.top5 = np.zeros(n, dtype=np.int64)
        self.top1_cls = 0
        self.top5_cls = 0
        self.count = 0

    @classmethod
    def from_metadata(cls, metadata: WSOLMetadata, **kwargs) -> LocAccuracyEvaluator:
        return cls(gt_boxes_224(metadata), metadata.labels, **kwargs)

    def accumulate(self, scoremap: np.ndarray, image_id: str, topk: Sequence[int],
                   check: bool = True) -> None:
        """Add one image.

        Args:
            scoremap: the score map of the image's ground-truth class.
            image_id: the image.
            topk: predicted classes, best first (up to 5 are used; fewer mean a shorter top-5 list).
        """
        if image_id not in self.gt_boxes or image_id not in self.labels:
            raise DataError(f"image {image_id}: no ground-truth box or label in the metadata")
        if check:
            scoremap = check_scoremap(scoremap, image_id)
        loc = box_correct(scoremap, self.gt_boxes[image_id], self.cam_thresholds, [self.iou_threshold],
                          self.multi_contour, self.impl, check=False)[0]
        self.add(loc, image_id, topk)

    def add(self, loc: np.ndarray, image_id: str, topk: Sequence[int]) -> None:
        """Add one image whose box correctness per CAM threshold is known already.

        Args:
            loc: ``[len(cam_thresholds)]`` booleans, e.g. the row of a :class:`BoxEvaluator` with the
                same thresholds, IoU threshold and contour rule (evaluations then trace each map once).
            image_id: the image.
            topk: predicted classes, best first.
        """
        if image_id not in self.labels:
            raise DataError(f"image {image_id}: no label in the metadata")
        if len(topk) == 0:
            raise DataError(f"image {image_id}: empty list of predicted classes")
        loc = np.asarray(loc)
        if loc.shape != self.cam_thresholds.shape or loc.dtype != np.bool_:
            raise DataError(f"image {image_id}: expected {len(self.cam_thresholds)} booleans (one per CAM "
                            f"threshold), got {loc.dtype} of shape {loc.shape}")
        label = self.labels[image_id]
        top1 = int(topk[0]) == label
        top5 = label in [int(c) for c in topk[:5]]
        self.gt_known += loc
        self.top1 += loc & top1
        self.top5 += loc & top5
        self.top1_cls += top1
        self.top5_cls += top5
        self.count += 1

    def compute(self) -> dict[str, float]:
        """Accuracies in percent at the fixed tau, or at the tau with the best GT-known Loc."""
        if self.count == 0:
            raise DataError("localization accuracy: no image was accumulated")
        i = 0 if self.fixed else int(self.gt_known.argmax())
        scale = 100.0 / float(self.count)
        return {"gt_known_loc": float(self.gt_known[i] * scale), "top1_loc": float(self.top1[i] * scale),
                "top5_loc": float(self.top5[i] * scale), "top1_cls": self.top1_cls * scale,
                "top5_cls": self.top5_cls * scale, "cam_threshold": float(self.cam_thresholds[i]),
                "images": self.count}
