"""MaxBoxAcc and MaxBoxAccV2 (Choe et al., CVPR 2020) over score maps, with two implementations.

``impl="reference"`` runs the protocol's rule literally per threshold
(:mod:`~mmcam_fast.evaluation.box_reference`); ``impl="fast"`` (default) gets the same per-image,
per-threshold booleans with far fewer contour extractions (:mod:`~mmcam_fast.evaluation.box_fast`).
Both feed the same counts, so every number agrees exactly.

- MaxBoxAcc: largest contour only (``multi_contour=False``), IoU threshold 50.
- MaxBoxAccV2: every contour's box (``multi_contour=True``), mean over IoU thresholds 30, 50, 70.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from mmcam_fast.data.metadata import WSOLMetadata
from mmcam_fast.errors import DataError
from mmcam_fast.evaluation.box_fast import box_correct_fast_u8, box_correct_fast_u8_rules, to_uint8
from mmcam_fast.evaluation.box_reference import box_correct_reference
from mmcam_fast.evaluation.boxes import check_boxes, check_gt_boxes, gt_boxes_224
from mmcam_fast.evaluation.parallel import ordered_map, resolve_threads
from mmcam_fast.evaluation.scoremaps import check_scoremap
from mmcam_fast.evaluation.thresholds import DEFAULT_IOU_THRESHOLDS, check_impl, check_iou_thresholds
from mmcam_fast.evaluation.thresholds import cam_thresholds as make_cam_thresholds


def box_correct(scoremap: np.ndarray, gt_boxes: Sequence[Sequence[int]], cam_thresholds: Sequence[float],
                iou_thresholds: Sequence[int], multi_contour: bool, impl: str = "fast", *,
                image_id: str = "?", check: bool = True) -> np.ndarray:
    """Per IoU threshold and CAM threshold, whether the estimated box(es) reach IoU >= T / 100.

    Args:
        scoremap: ``[H, W]`` score map in [0, 1]; evaluated in float64 as the protocol does.
        gt_boxes: ground-truth boxes at the map's resolution (inclusive pixels).
        cam_thresholds: CAM thresholds tau.
        iou_thresholds: IoU thresholds in percent.
        multi_contour: all contours' boxes (best match) instead of the largest contour's box.
        impl: ``"fast"`` or ``"reference"``; identical results.
        image_id: named in errors.
        check: validate the map (any ``H x W``, see :func:`check_scoremap`) and the boxes (see
            :func:`check_boxes`, inside the map); False only for inputs validated already.

    Returns:
        ``[len(iou_thresholds), len(cam_thresholds)]`` booleans.

    Raises:
        DataError: (with ``check``) an invalid map or box, naming the image id.
    """
    if check:
        scoremap = check_scoremap(scoremap, image_id, shape=None)
        height, width = scoremap.shape
        gt_boxes = check_boxes(gt_boxes, image_id, size=(width, height))
    scoremap = np.asarray(scoremap, dtype=np.float64)
    if check_impl(impl) == "reference":
        return box_correct_reference(scoremap, gt_boxes, cam_thresholds, iou_thresholds, multi_contour)
    return box_correct_fast_u8(to_uint8(scoremap), gt_boxes, cam_thresholds, iou_thresholds, multi_contour)


@dataclass
class BoxResult:
    """Box accuracy at the best CAM threshold, per IoU threshold.

    Attributes:
        per_iou: IoU threshold (percent) -> max over tau of the box accuracy (percent).
        best_threshold: IoU threshold -> the CAM threshold tau where that maximum is first reached.
        images: number of images evaluated.
        multi_contour: whether all contours' boxes were used (MaxBoxAccV2) or the largest one's.
    """

    per_iou: dict[int, float]
    best_threshold: dict[int, float]
    images: int
    multi_contour: bool

    @property
    def mean(self) -> float:
        """Mean over the IoU thresholds: MaxBoxAccV2 when multi-contour over 30, 50, 70."""
        return float(np.mean(list(self.per_iou.values())))


class BoxEvaluator:
    """Accumulates per-threshold box correctness over images; :meth:`compute` gives MaxBoxAcc(V2).

    Args:
        gt_boxes: image id -> ground-truth boxes at 224x224 (see :func:`gt_boxes_224`).
        cam_curve_interval: CAM thresholds are ``np.arange(0, 1, cam_curve_interval)``.
        iou_thresholds: IoU thresholds in percent.
        multi_contour: every contour's box (MaxBoxAccV2) instead of the largest contour's (MaxBoxAcc).
        impl: ``"fast"`` (default) or ``"reference"``.
        cam_thresholds: an explicit threshold list instead of ``cam_curve_interval``.
    """

    def __init__(self, gt_boxes: Mapping[str, Sequence[Sequence[int]]], *, cam_curve_interval: float = 0.01,
                 iou_thresholds: Sequence[int] = DEFAULT_IOU_THRESHOLDS, multi_contour: bool = False,
                 impl: str = "fast", cam_thresholds: Sequence[float] | None = None):
        self.gt_boxes = check_gt_boxes(gt_boxes)
        self.cam_thresholds = (np.asarray(cam_thresholds, dtype=np.float64) if cam_thresholds is not None
                               else make_cam_thresholds(cam_curve_interval))
        self.iou_thresholds = check_iou_thresholds(iou_thresholds)
        self.multi_contour = bool(multi_contour)
        self.impl = check_impl(impl)
        self.num_correct = np.zeros((len(self.iou_thresholds), len(self.cam_thresholds)), dtype=np.int64)
        self.count = 0

    @classmethod
    def from_metadata(cls, metadata: WSOLMetadata, **kwargs) -> BoxEvaluator:
        """An evaluator for one split of a box data set (boxes rescaled to 224x224)."""
        return cls(gt_boxes_224(metadata), **kwargs)

    def gt_for(self, image_id: str) -> np.ndarray:
        try:
            return self.gt_boxes[image_id]
        except KeyError:
            raise DataError(f"image {image_id}: no ground-truth boxes in the metadata") from None

    def accumulate(self, scoremap: np.ndarray, image_id: str, check: bool = True) -> np.ndarray:
        """Add one image; returns its ``[len(iou_thresholds), len(cam_thresholds)]`` booleans.

        Raises:
            DataError: (with ``check``) a map that is not 224x224, finite and in [0, 1]; an image
                without ground truth.
        """
        if check:
            scoremap = check_scoremap(scoremap, image_id)
        correct = box_correct(scoremap, self.gt_for(image_id), self.cam_thresholds, self.iou_thresholds,
                              self.multi_contour, self.impl, check=False)
        self.add(correct)
        return correct

    def add(self, correct: np.ndarray) -> None:
        """Add one image's booleans (computed elsewhere, e.g. in a worker process).

        Raises:
            DataError: ``correct`` is not a ``[len(iou_thresholds), len(cam_thresholds)]`` boolean array.
        """
        correct = np.asarray(correct)
        if correct.shape != self.num_correct.shape or correct.dtype != np.bool_:
            raise DataError(f"box evaluation: expected {self.num_correct.shape} booleans (IoU thresholds x "
                            f"CAM thresholds), got {correct.dtype} of shape {correct.shape}")
        self.num_correct += correct
        self.count += 1

    def compute(self) -> BoxResult:
        """Max over CAM thresholds of the accuracy (percent), per IoU threshold."""
        if self.count == 0:
            raise DataError("box evaluation: no image was accumulated")
        accuracy = self.num_correct * 100.0 / float(self.count)
        best = accuracy.argmax(axis=1)  # the first maximum, as np.max's threshold would be
        ious = self.iou_thresholds
        return BoxResult(per_iou={t: float(accuracy[i, best[i]]) for i, t in enumerate(ious)},
                         best_threshold={t: float(self.cam_thresholds[best[i]]) for i, t in enumerate(ious)},
                         images=self.count, multi_contour=self.multi_contour)


def _image_job(item: tuple[str, np.ndarray, np.ndarray], cam_thresholds: np.ndarray,
               specs: list[tuple[list[int], bool]], impl: str) -> list[np.ndarray]:
    """All evaluators' booleans for one image (runs in a worker or in this process)."""
    _, payload, gt = item
    if impl == "reference":
        return [box_correct_reference(payload, gt, cam_thresholds, ious, multi) for ious, multi in specs]
    # one union-find pass answers every evaluator (MaxBoxAcc and MaxBoxAccV2 together)
    return box_correct_fast_u8_rules(payload, gt, cam_thresholds, specs)


def accumulate_boxes(evaluators: Sequence[BoxEvaluator], scoremaps: Iterable[tuple[str, np.ndarray]],
                     processes: int = 1, check: bool = True, threads: int | None = None,
                     on_image: Callable[[str, list[np.ndarray]], None] | None = None) -> int:
    """Feed ``(image_id, scoremap)`` pairs to several evaluators in one pass, optionally in parallel.

    The evaluators must share their ground truth, CAM thresholds and implementation (they may
    differ in ``multi_contour`` and IoU thresholds), e.g. a MaxBoxAcc and a MaxBoxAccV2 evaluator.

    Args:
        evaluators: the evaluators to update.
        scoremaps: ``(image_id, [224, 224] map)`` pairs, consumed lazily.
        processes: processes; each image is evaluated whole in one of them.
        threads: threads when ``processes`` is 1; None (default) is one per available core, at most 8.
            The numbers do not depend on it (each image's counts are computed whole, in one thread,
            and added in input order).
        check: validate each map (skip only for maps validated already, e.g. by ``iter_scoremaps``).
        on_image: called in input order with each image's id and its booleans per evaluator (after
            they are added), e.g. to feed a :class:`LocAccuracyEvaluator` without tracing again.

    Returns:
        The number of images added.
    """
    first = evaluators[0]
    for other in evaluators[1:]:
        if (other.impl != first.impl or not np.array_equal(other.cam_thresholds, first.cam_thresholds)
                or other.gt_boxes.keys() != first.gt_boxes.keys()):
            raise ValueError("accumulate_boxes: evaluators must share ground truth, CAM thresholds and impl")
    specs = [(e.iou_thresholds, e.multi_contour) for e in evaluators]

    ids: deque[str] = deque()

    def payloads():
        for image_id, scoremap in scoremaps:
            ids.append(image_id)
            scoremap = check_scoremap(scoremap, image_id) if check else np.asarray(scoremap, dtype=np.float64)
            # the fast path needs only the uint8 map: a quarter of the bytes to ship to a worker
            payload = scoremap if first.impl == "reference" else to_uint8(scoremap)
            yield image_id, payload, first.gt_for(image_id)

    job = partial(_image_job, cam_thresholds=first.cam_thresholds, specs=specs, impl=first.impl)
    added = 0
    for results in ordered_map(job, payloads(), processes, threads=resolve_threads(threads)):
        for evaluator, correct in zip(evaluators, results, strict=True):
            evaluator.add(correct)
        image_id = ids.popleft()
        if on_image is not None:
            on_image(image_id, results)
        added += 1
    return added
