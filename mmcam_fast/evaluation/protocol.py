"""One split of a WSOL data set evaluated from score maps: the numbers the protocol reports.

:func:`evaluate_scoremaps` takes the score maps as an iterable of ``(image_id, map)``, so the same
function serves score maps read from files (``mmcam-evaluate --scoremap-root``) and score maps
computed in memory from a model.

Data sets: the protocol's benchmarks (CUB, ILSVRC alias imagenet, OpenImages) and the ones the
project prepares (``synthetic``, ``tiny-imagenet``, ``voc``: ``python -m mmcam_fast.prepare``).
A benchmark's name decides the metric (PxAP for OpenImages, boxes otherwise) and its masks are read
from ``<mask_root>/OpenImages/<mask path>``, the benchmark's layout. A prepared data set's metadata
decides: boxes in ``localization.txt`` give MaxBoxAcc / MaxBoxAccV2, masks (e.g. the synthetic set's
``metadata-masks/``) give PxAP, read from ``<mask_root>/<mask path>`` (the data root, as in training).
:func:`split_folder` finds a split's metadata the way the training code does.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mmcam_fast.data.catalogue import BENCHMARK_FOLDERS, PREPARED_DATA
from mmcam_fast.data.metadata import WSOLMetadata
from mmcam_fast.errors import ConfigError, DataError
from mmcam_fast.evaluation.box_evaluator import BoxEvaluator, accumulate_boxes
from mmcam_fast.evaluation.mask_evaluator import MaskEvaluator
from mmcam_fast.evaluation.scoremaps import iter_scoremaps
from mmcam_fast.evaluation.thresholds import DEFAULT_IOU_THRESHOLDS

# --dataset names (case-insensitive): the benchmarks by their --data name or metadata folder name
BENCHMARKS = {**BENCHMARK_FOLDERS, **{folder.lower(): folder for folder in BENCHMARK_FOLDERS.values()}}
PREPARED_DATASETS = PREPARED_DATA
DATASETS = {**BENCHMARKS, **{name: name for name in PREPARED_DATASETS}}
MASK_DATASETS = ("OpenImages",)
MAXBOXACC_IOU = 50


def dataset_name(name: str) -> str:
    """The canonical name of a data set (case-insensitive; 'imagenet' means ILSVRC): CUB, ILSVRC or
    OpenImages for the benchmarks (their metadata folder names), else synthetic, tiny-imagenet, voc."""
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise ConfigError(f"--dataset: unknown data set {name!r}, expected one of CUB, ILSVRC (imagenet), "
                          f"OpenImages, {', '.join(PREPARED_DATASETS)}") from None


def is_benchmark(dataset: str) -> bool:
    """Whether the data set is one of the protocol's benchmarks (CUB, ILSVRC, OpenImages)."""
    return dataset_name(dataset) in BENCHMARKS.values()


def split_folder(metadata_root: str | Path, dataset: str, split: str) -> Path:
    """The metadata folder of one split: ``<metadata_root>/<split>`` or, for a benchmark,
    ``<metadata_root>/<CUB|ILSVRC|OpenImages>/<split>`` (the benchmark's ``metadata/`` layout; tried
    first), whichever holds an ``image_ids.txt``, as the training code looks them up.

    Raises:
        DataError: neither folder exists, naming what was tried.
    """
    root, name = Path(metadata_root), dataset_name(dataset)
    candidates = [root / name / split, root / split] if is_benchmark(name) else [root / split]
    for folder in candidates:
        if (folder / "image_ids.txt").is_file():
            return folder
    tried = " nor ".join(str(folder) for folder in candidates)
    raise DataError(f"{tried}: metadata folder does not exist (no image_ids.txt; check --metadata-root "
                    f"and --split)")


def mask_folder(dataset: str, mask_root: str | Path) -> Path:
    """The folder mask paths are relative to: ``<mask_root>/OpenImages`` for the benchmark, else
    ``mask_root`` (a prepared data set's data root)."""
    name = dataset_name(dataset)
    return Path(mask_root) / name if is_benchmark(name) else Path(mask_root)


def evaluate_scoremaps(dataset: str, metadata: WSOLMetadata, scoremaps: Iterable[tuple[str, np.ndarray]], *,
                       mask_root: str | Path | None = None, cam_curve_interval: float = 0.01,
                       iou_thresholds: Iterable[int] = DEFAULT_IOU_THRESHOLDS, impl: str = "fast",
                       processes: int = 1, check: bool = True, threads: int | None = None) -> dict:
    """Evaluate one split; returns the JSON-ready result.

    Box data sets (CUB, ILSVRC, prepared sets with boxes) are evaluated twice in one pass: single
    contour at IoU 50 (``maxboxacc``, with its CAM threshold) and multi-contour over
    ``iou_thresholds`` (``maxboxacc_v2`` = their mean; ``per_iou`` and ``best_threshold`` belong to
    this run). Mask data sets (OpenImages, prepared sets with masks) give ``pxap``.

    Args:
        dataset: CUB, ILSVRC (or imagenet), OpenImages, synthetic, tiny-imagenet or voc, any case.
        metadata: the split's metadata.
        scoremaps: ``(image_id, [224, 224] map)`` for every image of the split.
        mask_root: root of the masks; they are read from ``<mask_root>/OpenImages/<mask path>`` for
            OpenImages, from ``<mask_root>/<mask path>`` for a prepared data set (see
            :func:`mask_folder`).
        cam_curve_interval: CAM thresholds ``np.arange(0, 1, interval)``.
        iou_thresholds: IoU thresholds (percent) of the multi-contour run.
        impl: ``"fast"`` or ``"reference"``.
        processes: processes for the per-image work.
        threads: threads for the box evaluation when ``processes`` is 1 (None: one per core).
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
    masks = name in MASK_DATASETS if is_benchmark(name) else metadata.has_masks
    if not masks and not is_benchmark(name) and not metadata.boxes:
        raise DataError(f"{metadata.folder / 'localization.txt'}: no boxes and no masks, nothing to evaluate "
                        "(a labels-only split?)")
    if masks:
        if mask_root is None:
            where = "<mask-root>/OpenImages/<mask path>" if is_benchmark(name) else "<mask-root>/<mask path>"
            raise ConfigError(f"--mask-root is required for {name} masks (they are read from {where})")
        evaluator = MaskEvaluator.from_metadata(metadata, mask_folder(name, mask_root),
                                                cam_curve_interval=cam_curve_interval, impl=impl)
        evaluator.accumulate_many(tracked(), processes=processes, check=check)
        _check_complete(metadata, seen)
        result.update(pxap=evaluator.compute(), images=evaluator.count)
        return result

    single = BoxEvaluator.from_metadata(metadata, cam_curve_interval=cam_curve_interval,
                                        iou_thresholds=[MAXBOXACC_IOU], multi_contour=False, impl=impl)
    multi = BoxEvaluator(single.gt_boxes, cam_curve_interval=cam_curve_interval,
                         iou_thresholds=list(iou_thresholds), multi_contour=True, impl=impl)
    accumulate_boxes([single, multi], tracked(), processes=processes, check=check, threads=threads)
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


def evaluate_scoremap_folder(dataset: str, metadata: WSOLMetadata, scoremap_root: str | Path, *,
                             mask_root: str | Path | None = None, cam_curve_interval: float = 0.01,
                             iou_thresholds: Iterable[int] = DEFAULT_IOU_THRESHOLDS, impl: str = "fast",
                             processes: int = 1, threads: int | None = None) -> dict:
    """Mode (a) of ``mmcam-evaluate``: the split of ``metadata`` scored from the protocol's layout,
    ``<scoremap_root>/<image_id>.npy`` (each map validated as it is read); see
    :func:`evaluate_scoremaps` for the arguments and the result."""
    return evaluate_scoremaps(dataset, metadata, iter_scoremaps(scoremap_root, metadata.image_ids),
                              mask_root=mask_root, cam_curve_interval=cam_curve_interval,
                              iou_thresholds=iou_thresholds, impl=impl, processes=processes, threads=threads,
                              check=False)  # iter_scoremaps has validated every map


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
