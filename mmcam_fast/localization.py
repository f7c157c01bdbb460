"""Localization with a trained CAM model: score maps of a data set, the protocol's metrics, overlays.

One pass over an evaluation split computes, per image, the classifier's top-5 classes and the score
map of the ground-truth class (CAM -> 224x224 bicubic -> min-max), and feeds them to the protocol's
evaluators (:mod:`mmcam_fast.evaluation`): MaxBoxAcc, MaxBoxAccV2, GT-known / Top-1 / Top-5 Loc for
box data sets, PxAP for mask data sets.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from mmcam_fast.checkpoint import load_checkpoint
from mmcam_fast.config import TrainConfig
from mmcam_fast.data.datasets import WSOLDataset
from mmcam_fast.data.images import read_rgb
from mmcam_fast.errors import DataError
from mmcam_fast.evaluation import (
    SCOREMAP_SIZE,
    BoxEvaluator,
    LocAccuracyEvaluator,
    MaskEvaluator,
    accumulate_boxes,
    cams_to_scoremaps,
    gt_boxes_224,
    save_scoremaps,
    write_overlays,
)
from mmcam_fast.evaluation.overlays import select_overlay_ids
from mmcam_fast.evaluation.scoremaps import nonfinite_maps
from mmcam_fast.models import create_model
from mmcam_fast.models.cam_model import CAMModel

log = logging.getLogger(__name__)

TOPK = 5


def load_trained_model(path: str | Path, device: torch.device | str = "cpu"
                       ) -> tuple[CAMModel, TrainConfig, list[str]]:
    """A model from a training checkpoint, in eval mode: (model, its config, class names)."""
    state = load_checkpoint(path)
    config = TrainConfig.from_dict(state["config"], source=str(path))
    classes = list(state.get("classes") or [])
    num_classes = state["model"]["fc.weight"].shape[0]
    model = create_model(config.backbone, num_classes, feature_stride=config.feature_stride)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config, classes or [str(c) for c in range(num_classes)]


@torch.no_grad()
def predict_scoremaps(model: CAMModel, dataset: WSOLDataset, *, device: torch.device | str = "cpu",
                      batch_size: int = 32, workers: int = 0, classes: str = "gt", loader: str = "torch",
                      stats: dict[str, Any] | None = None,
                      ) -> Iterator[tuple[str, np.ndarray, list[int], list[float]]]:
    """Yield ``(image_id, score map [224, 224] float32, top-5 classes, top-5 probabilities)``.

    Args:
        model: the CAM model (put in eval mode here).
        dataset: an evaluation split (eval transform).
        device: where the model runs.
        batch_size, workers, loader: of the evaluation loader (``loader``: torch, dali or auto).
        classes: ``"gt"`` for the ground-truth class's CAM (GT-known metrics), ``"top1"`` for the
            predicted class's CAM.
        stats: if given, ``nonfinite_cams`` (a count) and ``nonfinite_ids`` are added to it: CAMs with
            a NaN or an infinity, whose score maps are all zeros (the protocol's normalisation).
    """
    from mmcam_fast.data.loaders import build_loader

    model.eval()
    batches, _ = build_loader(dataset, batch_size=batch_size, workers=workers, backend=loader)
    for images, labels, indices in batches:
        images, labels = images.to(device), labels.to(device)
        logits, features = model(images)
        probs, top = logits.float().softmax(dim=1).topk(min(TOPK, logits.shape[1]), dim=1)
        cam_classes = labels if classes == "gt" else top[:, 0]
        cams = model.cams(features, cam_classes)
        scoremaps = cams_to_scoremaps(cams).cpu().numpy()
        if stats is not None:  # read with the maps: no extra synchronisation
            bad = nonfinite_maps(cams).cpu()
            stats["nonfinite_cams"] = stats.get("nonfinite_cams", 0) + int(bad.sum())
            stats.setdefault("nonfinite_ids", []).extend(
                dataset.image_id(i) for i, b in zip(indices.tolist(), bad.tolist(), strict=True) if b)
        for i, index in enumerate(indices.tolist()):
            yield dataset.image_id(index), scoremaps[i], top[i].tolist(), probs[i].tolist()


def evaluate_localization(model: CAMModel, dataset: WSOLDataset, *, device: torch.device | str = "cpu",
                          cam_curve_interval: float = 0.01, iou_thresholds: tuple[int, ...] = (30, 50, 70),
                          batch_size: int = 32, workers: int = 0, impl: str = "fast", loader: str = "torch",
                          scoremap_root: str | Path | None = None, overlays: int = 0,
                          overlay_dir: str | Path | None = None, progress: bool | None = True,
                          desc: str = "eval") -> dict[str, Any]:
    """The protocol's metrics of ``model`` on ``dataset`` (percentages).

    Box data sets: ``maxboxacc`` (largest contour, IoU 50), ``maxboxacc_v2`` (all contours, mean over
    ``iou_thresholds``) with ``per_iou`` and ``best_threshold``, ``gt_known_loc`` / ``top1_loc`` /
    ``top5_loc`` at MaxBoxAcc's best threshold, ``top1_cls`` / ``top5_cls``. Mask data sets:
    ``pxap`` and the classification accuracies.

    Args:
        scoremap_root: also export every score map as ``<root>/<image_id>.npy``.
        overlays: write this many overlay PNGs to ``overlay_dir``, of images spread over the classes
            (round-robin, :func:`~mmcam_fast.evaluation.overlays.select_overlay_ids`).
        progress: a progress bar of the images on stderr, labelled ``desc`` (e.g. "val", "test"),
            cleared when done; False: none; None: only when stderr is a terminal.
    """
    meta = dataset.metadata
    if not meta.boxes and not meta.has_masks:
        raise DataError(f"{meta.folder}: evaluation needs boxes or masks in localization.txt")
    if overlays and overlay_dir is None:
        raise DataError("overlays requested without an overlay folder (--overlay-dir)")
    boxes = gt_boxes_224(meta) if meta.boxes else None
    if boxes is not None:
        single = BoxEvaluator(boxes, cam_curve_interval=cam_curve_interval, iou_thresholds=[50],
                              multi_contour=False, impl=impl)
        multi = BoxEvaluator(boxes, cam_curve_interval=cam_curve_interval,
                             iou_thresholds=list(iou_thresholds), multi_contour=True, impl=impl)
        loc = LocAccuracyEvaluator(boxes, meta.labels, cam_curve_interval=cam_curve_interval, impl=impl)
    else:
        masks = MaskEvaluator.from_metadata(meta, dataset.mask_root, cam_curve_interval=cam_curve_interval,
                                            impl=impl)
    top1 = top5 = count = 0
    chosen = select_overlay_ids(meta.image_ids, meta.labels, overlays)
    wanted = set(chosen)
    kept: dict[str, tuple[np.ndarray, list[int], list[float]]] = {}  # overlay images: map, top-5, probs
    topk: dict[str, list[int]] = {}  # predicted classes of the images in flight
    stats: dict[str, Any] = {}

    def scoremaps() -> Iterator[tuple[str, np.ndarray]]:
        nonlocal top1, top5, count
        predictions = predict_scoremaps(model, dataset, device=device, batch_size=batch_size,
                                        workers=workers, loader=loader, stats=stats)
        for image_id, scoremap, top, probs in predictions:
            label = meta.labels[image_id]
            top1 += top[0] == label
            top5 += label in top
            count += 1
            if boxes is not None:
                topk[image_id] = top
            if scoremap_root is not None:
                save_scoremaps(scoremap_root, [image_id], scoremap[None])
            if image_id in wanted:
                kept[image_id] = (scoremap, top, probs)
            bar.update(1)
            yield image_id, scoremap

    # closed (its line cleared) before the metrics are computed, or before an error propagates
    with tqdm(total=len(dataset), desc=desc, unit="img", leave=False, dynamic_ncols=True,
              disable=None if progress is None else not progress, file=sys.stderr) as bar:
        if boxes is not None:
            def with_loc(image_id: str, results: list[np.ndarray]) -> None:
                # the single-contour evaluator's IoU-50 row is GT-known Loc's per-threshold answer
                loc.add(results[0][0], image_id, topk.pop(image_id))

            accumulate_boxes([single, multi], scoremaps(), on_image=with_loc)
        else:
            masks.accumulate_many(scoremaps())
    if boxes is not None:
        single_result, multi_result = single.compute(), multi.compute()
        result: dict[str, Any] = {
            "maxboxacc": single_result.per_iou[50], "maxboxacc_v2": multi_result.mean,
            "per_iou": {str(k): v for k, v in multi_result.per_iou.items()},
            "best_threshold": {str(k): v for k, v in multi_result.best_threshold.items()},
            "maxboxacc_threshold": single_result.best_threshold[50],
        }
        result.update({k: v for k, v in loc.compute().items() if k.endswith("_loc")})
        threshold = single_result.best_threshold[50]
    else:
        result = {"pxap": masks.compute()}
        threshold = 0.5
    result.update(top1_cls=100.0 * top1 / count, top5_cls=100.0 * top5 / count, images=count)
    if stats.get("nonfinite_cams"):
        result["nonfinite_cams"] = stats["nonfinite_cams"]
        shown = ", ".join(stats["nonfinite_ids"][:5])
        log.warning("%s: %d CAM(s) with NaN or inf scored as all-zero maps (%s%s)", desc,
                    stats["nonfinite_cams"], shown, ", ..." if stats["nonfinite_cams"] > 5 else "")
    if kept:
        index = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
        names = dataset.classes or [str(k) for k in range(max(meta.labels.values()) + 1)]
        images = [np.asarray(read_rgb(dataset.image_path(index[i]))) for i in chosen]  # at their own size
        written = write_overlays(
            images, [kept[i][0] for i in chosen], [meta.boxes.get(i, []) for i in chosen], threshold,
            overlay_dir, chosen, box_sizes=[meta.sizes.get(i) for i in chosen],
            class_names=[names[meta.labels[i]] for i in chosen],
            predictions=[(names[kept[i][1][0]], kept[i][2][0]) for i in chosen])
        result["overlays"] = [str(p) for p in written]
    return result


def image_224(path: Path) -> np.ndarray:
    """The image as the protocol's eval transform sees it: RGB uint8 resized to 224x224."""
    size = (SCOREMAP_SIZE, SCOREMAP_SIZE)
    return cv2.resize(np.asarray(read_rgb(path)), size, interpolation=cv2.INTER_LINEAR)
