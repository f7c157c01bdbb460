"""Localization with a trained CAM model: score maps of a data set, the protocol's metrics, overlays;
boxes in a user's own images (``mmcam-localize``).

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
from mmcam_fast.data.loaders import build_loader
from mmcam_fast.data.splits import build_datasets
from mmcam_fast.data.transforms import eval_transform
from mmcam_fast.errors import ConfigError, DataError
from mmcam_fast.evaluation import (
    SCOREMAP_SIZE,
    BoxEvaluator,
    LocAccuracyEvaluator,
    MaskEvaluator,
    accumulate_boxes,
    cams_to_scoremaps,
    gt_boxes_224,
    overlay_image,
    save_scoremaps,
    write_overlays,
)
from mmcam_fast.evaluation.box_reference import boxes_at_threshold
from mmcam_fast.evaluation.overlays import select_overlay_ids
from mmcam_fast.evaluation.scoremaps import nonfinite_maps
from mmcam_fast.models import create_model
from mmcam_fast.models.cam_model import CAMModel

log = logging.getLogger(__name__)

TOPK = 5
DEFAULT_THRESHOLD = 0.2  # localize_images' CAM threshold when the checkpoint has none


def load_trained_model(path: str | Path, device: torch.device | str = "cpu"
                       ) -> tuple[CAMModel, TrainConfig, list[str]]:
    """A model from a training checkpoint, in eval mode: (model, its config, class names)."""
    return model_from_checkpoint(load_checkpoint(path), path, device)


def model_from_checkpoint(state: dict, path: str | Path, device: torch.device | str = "cpu"
                          ) -> tuple[CAMModel, TrainConfig, list[str]]:
    """:func:`load_trained_model` from a checkpoint already read (``path`` names it in errors)."""
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


def _inherited_metadata_root(config: TrainConfig, data: str | None,
                             data_root: str | Path | None) -> str | None:
    """The checkpoint's metadata root, unless the data it describes was replaced: another ``--data``, or
    another ``--data-root`` when the training's metadata lay inside its data root (then the new root's
    ``metadata/`` is read, as training would have). A metadata root of its own (``--metadata-root`` at
    training, e.g. the benchmark's metadata beside the images) is kept for a new ``--data-root``."""
    if data is not None and data != config.data:
        return None
    if data_root is not None and config.metadata_root and config.data_root:
        if Path(config.metadata_root).is_relative_to(config.data_root):
            return None
    return config.metadata_root


def evaluate_checkpoint(checkpoint: str | Path, *, split: str = "test", data: str | None = None,
                        data_root: str | Path | None = None, metadata_root: str | Path | None = None,
                        mask_root: str | Path | None = None, device: str = "cpu", batch_size: int = 32,
                        cam_curve_interval: float = 0.01, iou_thresholds: tuple[int, ...] = (30, 50, 70),
                        impl: str = "fast", scoremap_root: str | Path | None = None, overlays: int = 0,
                        overlay_dir: str | Path | None = None) -> dict[str, Any]:
    """Mode (b) of ``mmcam-evaluate``: the CAMs of a training checkpoint on a split of a data set
    (by default the checkpoint's own data set and root), evaluated in memory
    (:func:`evaluate_localization`); the result names the data set, split and checkpoint."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"--split {split!r}: expected train, val or test")
    model, config, _ = load_trained_model(checkpoint, device)
    splits = build_datasets(data or config.data, data_root or config.data_root, image_size=config.image_size,
                            metadata_root=metadata_root or _inherited_metadata_root(config, data, data_root),
                            mask_root=mask_root)
    dataset = getattr(splits, split)
    dataset.transform = splits.test.transform  # evaluation transform, also for the train split
    result = evaluate_localization(
        model, dataset, device=device, cam_curve_interval=cam_curve_interval, iou_thresholds=iou_thresholds,
        batch_size=batch_size, impl=impl, scoremap_root=scoremap_root, overlays=overlays,
        overlay_dir=overlay_dir)
    result.update(dataset=data or config.data, split=split, checkpoint=str(checkpoint))
    return result


def localize_images(checkpoint: str | Path, images: list[Path], *, device: str = "cpu", topk: int = 5,
                    cam_threshold: float | None = None, multi_contour: bool = False,
                    out_dir: Path | None = None) -> list[dict]:
    """Predicted classes and boxes for each of a user's images (``mmcam-localize``).

    Per image: the top-``topk`` classes with their probabilities; the CAM of the top-1 class as a score
    map (224x224 bicubic, min-max); the box(es) at ``cam_threshold`` by the protocol's rule (the
    largest contour, or every contour with ``multi_contour``) in the image's own pixel coordinates;
    with ``out_dir``, an overlay PNG (heatmap + red box). The threshold defaults to the one the
    checkpoint's validation chose (MaxBoxAcc's best tau), else :data:`DEFAULT_THRESHOLD`.
    """
    state = load_checkpoint(checkpoint)
    model, config, classes = model_from_checkpoint(state, checkpoint, device)
    if cam_threshold is None:
        saved = state.get("val") or {}
        cam_threshold = float(saved.get("maxboxacc_threshold", DEFAULT_THRESHOLD))
    if not 0 <= cam_threshold < 1:
        raise ConfigError(f"--cam-threshold must be in [0, 1), got {cam_threshold}")
    transform = eval_transform(config.image_size)
    results = []
    for path in images:
        image = read_rgb(path)
        width, height = image.size
        with torch.no_grad():
            logits, features = model(transform(image)[None].to(device))
            probs, top = logits.float().softmax(1).topk(min(topk, logits.shape[1]), dim=1)
            scoremap = cams_to_scoremaps(model.cams(features, top[:, 0]))[0].cpu().numpy()
        u8 = (scoremap.astype(np.float64) * 255).astype(np.uint8)
        boxes_224 = boxes_at_threshold(u8[..., None], cam_threshold, multi_contour)
        sx, sy = width / SCOREMAP_SIZE, height / SCOREMAP_SIZE
        boxes = [[int(x0 * sx), int(y0 * sy), min(int((x1 + 1) * sx) - 1, width - 1),
                  min(int((y1 + 1) * sy) - 1, height - 1)] for x0, y0, x1, y1 in boxes_224]
        entry = {"image": str(path), "width": width, "height": height, "cam_threshold": cam_threshold,
                 "predictions": [{"class": int(c), "name": classes[int(c)], "score": float(p)}
                                 for c, p in zip(top[0].tolist(), probs[0].tolist(), strict=True)],
                 "boxes": boxes}
        if out_dir is not None:
            best = entry["predictions"][0]
            picture = overlay_image(np.asarray(image), scoremap, [], cam_threshold, multi_contour,
                                    image_id=str(path), prediction=(best["name"], best["score"]))
            overlay = out_dir / f"{len(results):04d}_{path.stem}.png"
            cv2.imwrite(str(overlay), picture)
            entry["overlay"] = str(overlay)
        results.append(entry)
    return results
