"""One split of a WSOL benchmark evaluated from score maps: the numbers the protocol reports.

:func:`evaluate_scoremaps` takes the score maps as an iterable of ``(image_id, map)``, so the same
function serves score maps read from files (``mmcam-evaluate --scoremap-root``) and score maps
computed in memory from a model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mmcam_fast.data.metadata import WSOLMetadata
from mmcam_fast.errors import ConfigError, DataError
from mmcam_fast.evaluation.box_evaluator import BoxEvaluator, accumulate_boxes
from mmcam_fast.evaluation.mask_evaluator import MaskEvaluator
from mmcam_fast.evaluation.thresholds import DEFAULT_IOU_THRESHOLDS

DATASETS = {"cub": "CUB", "ilsvrc": "ILSVRC", "imagenet": "ILSVRC", "openimages": "OpenImages"}
MASK_DATASETS = ("OpenImages",)
MAXBOXACC_IOU = 50


def dataset_name(name: str) -> str:
    """The canonical folder name of a data set (case-insensitive; 'imagenet' means ILSVRC)."""
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise ConfigError(f"--dataset: unknown data set {name!r}, expected one of CUB, ILSVRC (imagenet), "
                          "OpenImages") from None


def evaluate_scoremaps(dataset: str, metadata: WSOLMetadata, scoremaps: Iterable[tuple[str, np.ndarray]], *,
                       mask_root: str | Path | None = None, cam_curve_interval: float = 0.01,
                       iou_thresholds: Iterable[int] = DEFAULT_IOU_THRESHOLDS, impl: str = "fast",
                       workers: int = 1, check: bool = True, threads: int | None = None) -> dict:
    """Evaluate one split; returns the JSON-ready result.

    Box data sets (CUB, ILSVRC) are evaluated twice in one pass: single contour at IoU 50
    (``maxboxacc``, with its CAM threshold) and multi-contour over ``iou_thresholds``
    (``maxboxacc_v2`` = their mean; ``per_iou`` and ``best_threshold`` belong to this run). Mask
    data sets (OpenImages) give ``pxap``.

    Args:
        dataset: CUB, ILSVRC (or imagenet) or OpenImages, any case.
        metadata: the split's metadata.
        scoremaps: ``(image_id, [224, 224] map)`` for every image of the split.
        mask_root: root of the masks; they are read from ``<mask_root>/OpenImages/<mask path>``.
        cam_curve_interval: CAM thresholds ``np.arange(0, 1, interval)``.
        iou_thresholds: IoU thresholds (percent) of the multi-contour run.
        impl: ``"fast"`` or ``"reference"``.
        workers: processes for the per-image work.
        threads: threads for the box evaluation when ``workers`` is 1 (None: one per core).
        check: validate each map (False only for maps validated already).

    Raises:
        DataError: a score map missing or invalid, an image of the metadata without a score map,
            a missing mask file.
    """
    name = dataset_name(dataset)
    expected = set(metadata.image_ids)
    seen: list[str] = []

    def tracked():
        for image_id, scoremap in scoremaps:
            if image_id not in expected:
                raise DataError(f"score map for image {image_id}, which is not in {metadata.folder}")
            seen.append(image_id)
            yield image_id, scoremap

    result: dict = {"dataset": name}
    if name in MASK_DATASETS:
        if mask_root is None:
            raise ConfigError("--mask-root is required for OpenImages (masks are read from "
                              "<mask-root>/OpenImages/<mask path>)")
        evaluator = MaskEvaluator.from_metadata(metadata, Path(mask_root) / "OpenImages",
                                                cam_curve_interval=cam_curve_interval, impl=impl)
        evaluator.accumulate_many(tracked(), workers=workers, check=check)
        _check_complete(metadata, seen)
        result.update(pxap=evaluator.compute(), images=evaluator.count)
        return result

    single = BoxEvaluator.from_metadata(metadata, cam_curve_interval=cam_curve_interval,
                                        iou_thresholds=[MAXBOXACC_IOU], multi_contour=False, impl=impl)
    multi = BoxEvaluator(single.gt_boxes, cam_curve_interval=cam_curve_interval,
                         iou_thresholds=list(iou_thresholds), multi_contour=True, impl=impl)
    accumulate_boxes([single, multi], tracked(), workers=workers, check=check, threads=threads)
    _check_complete(metadata, seen)
    single_result, multi_result = single.compute(), multi.compute()
    result.update(
        maxboxacc=single_result.per_iou[MAXBOXACC_IOU],
        maxboxacc_threshold=single_result.best_threshold[MAXBOXACC_IOU],
        maxboxacc_v2=multi_result.mean,
        per_iou={str(k): v for k, v in multi_result.per_iou.items()},
        best_threshold={str(k): v for k, v in multi_result.best_threshold.items()},
        per_iou_contours="multi",
        images=single.count,
    )
    return result


def _check_complete(metadata: WSOLMetadata, seen: list[str]) -> None:
    if len(seen) != len(set(seen)):
        counts: dict[str, int] = {}
        for image_id in seen:
            counts[image_id] = counts.get(image_id, 0) + 1
        twice = [i for i, c in counts.items() if c > 1]
        raise DataError(f"score maps given more than once for {len(twice)} image(s): {', '.join(twice[:5])}")
    seen_ids = set(seen)
    missing = [i for i in metadata.image_ids if i not in seen_ids]
    if missing:
        raise DataError(f"no score map for {len(missing)} image(s) of {metadata.folder}: "
                        f"{', '.join(missing[:5])}")
