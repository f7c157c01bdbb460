"""``mmcam-evaluate``: WSOL evaluation (MaxBoxAcc, MaxBoxAccV2, PxAP) of score maps.

Mode (a), implemented here: score maps exported as ``<scoremap-root>/<image_id>.npy`` (the
protocol's layout), metadata from ``<metadata-root>/<dataset>/<split>/``, masks from
``<mask-root>/OpenImages/<mask path>``::

    mmcam-evaluate --scoremap-root runs/x/scoremaps --metadata-root metadata --dataset CUB --split test

The last line of stdout is one JSON object with the results.

Mode (b): a training checkpoint and a data set: the CAMs are computed here (ground-truth class for
MaxBoxAcc / MaxBoxAccV2 / GT-known Loc / PxAP, the top-5 predictions for Top-1 / Top-5 Loc), score
maps optionally exported in the same layout, overlays optionally written::

    mmcam-evaluate --checkpoint runs/x/checkpoints/best.pt --data tiny-imagenet \
        --data-root ../shared/data/tiny-imagenet-5 --split val --overlays 16 --overlay-dir runs/x/overlays
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from mmcam_fast.data.metadata import load_metadata
from mmcam_fast.errors import ConfigError, DataError, MMCamError
from mmcam_fast.evaluation import (
    DEFAULT_IOU_THRESHOLDS,
    SCOREMAP_SIZE,
    dataset_name,
    evaluate_scoremaps,
    gt_boxes_224,
    iter_scoremaps,
    load_scoremap,
    write_overlays,
)
from mmcam_fast.evaluation.protocol import MASK_DATASETS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmcam-evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path,
                        help="mode (b): a training checkpoint; CAMs are computed from it")
    parser.add_argument("--data", help="mode (b): data set name (default: the checkpoint's)")
    parser.add_argument("--data-root", help="mode (b): data root (default: the checkpoint's)")
    parser.add_argument("--export-scoremaps", type=Path, metavar="DIR",
                        help="mode (b): also save every score map as DIR/<image_id>.npy")
    parser.add_argument("--device", default="cpu", help="mode (b): device of the model")
    parser.add_argument("--batch-size", type=int, default=32, help="mode (b): images per batch")
    parser.add_argument("--scoremap-root", type=Path,
                        help="folder of <image_id>.npy score maps (224x224, float, in [0, 1])")
    parser.add_argument("--metadata-root", type=Path,
                        help="metadata root; the split is read from <metadata-root>/<dataset>/<split>/")
    parser.add_argument("--mask-root", type=Path,
                        help="mask root (OpenImages): masks are <mask-root>/OpenImages/<mask path>")
    parser.add_argument("--dataset",
                        help="CUB, ILSVRC (alias imagenet) or OpenImages; any case")
    parser.add_argument("--split", help="split folder, e.g. val or test (mode (b) default: test)")
    parser.add_argument("--cam-curve-interval", type=float, default=0.01,
                        help="CAM thresholds are arange(0, 1, interval) (default 0.01: 100 thresholds)")
    parser.add_argument("--iou-threshold-list", type=int, nargs="+", default=list(DEFAULT_IOU_THRESHOLDS),
                        help="IoU thresholds in percent of the multi-contour run (default 30 50 70)")
    parser.add_argument("--impl", choices=("fast", "reference"), default="fast",
                        help="fast (default) or the literal reference; the numbers are identical")
    parser.add_argument("--workers", type=int, default=1, help="processes for the per-image work (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for the box evaluation when --workers is 1 (default: one per core, "
                             "at most 8); the numbers do not depend on it")
    parser.add_argument("--overlays", type=int, default=0, metavar="N",
                        help="write overlay PNGs of the first N images (needs --overlay-dir, --image-root)")
    parser.add_argument("--overlay-dir", type=Path, help="folder for overlay PNGs")
    parser.add_argument("--image-root", type=Path,
                        help="image root of the split, for overlays: <image-root>/<image_id>")
    return parser


def _scoremaps_from_files(args: argparse.Namespace, image_ids: list[str]):
    # Mode (a). Mode (b) replaces this generator with one that computes the maps from a model.
    return iter_scoremaps(args.scoremap_root, image_ids)


def _load_image(image_root: Path, image_id: str) -> np.ndarray:
    path = image_root / image_id
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"image {image_id}: {path} is missing or not an image")
    image = cv2.resize(image, (SCOREMAP_SIZE, SCOREMAP_SIZE), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _write_overlays(args: argparse.Namespace, metadata, result: dict) -> list[Path]:
    image_ids = metadata.image_ids[: args.overlays]
    gt = gt_boxes_224(metadata)
    return write_overlays(
        images=[_load_image(args.image_root, i) for i in image_ids],
        scoremaps=[load_scoremap(args.scoremap_root, i) for i in image_ids],
        gt_boxes=[gt[i] for i in image_ids],
        threshold=result["maxboxacc_threshold"],
        out_dir=args.overlay_dir,
        ids=image_ids,
    )


def run_checkpoint(args: argparse.Namespace) -> dict:
    """Mode (b): CAMs of a checkpoint on a data set split, evaluated in memory."""
    from mmcam_fast.data.loaders import build_datasets
    from mmcam_fast.localization import evaluate_localization, load_trained_model

    if args.scoremap_root is not None:
        raise ConfigError("--checkpoint and --scoremap-root are two modes: give one of them")
    if args.overlays and args.overlay_dir is None:
        raise ConfigError("--overlays N needs --overlay-dir")
    split = args.split or "test"
    if split not in ("train", "val", "test"):
        raise ConfigError(f"--split {split!r}: expected train, val or test")
    model, config, _ = load_trained_model(args.checkpoint, args.device)
    data = build_datasets(args.data or config.data, args.data_root or config.data_root,
                          image_size=config.image_size,
                          metadata_root=args.metadata_root or config.metadata_root, mask_root=args.mask_root)
    dataset = getattr(data, split)
    dataset.transform = data.test.transform  # evaluation transform, also for the train split
    result = evaluate_localization(
        model, dataset, device=args.device, cam_curve_interval=args.cam_curve_interval,
        iou_thresholds=tuple(args.iou_threshold_list), batch_size=args.batch_size, impl=args.impl,
        scoremap_root=args.export_scoremaps, overlays=args.overlays, overlay_dir=args.overlay_dir)
    result.update(dataset=args.data or config.data, split=split, checkpoint=str(args.checkpoint))
    if "overlays" in result:
        result["overlays"] = len(result["overlays"])
    return result


def run(args: argparse.Namespace) -> dict:
    """Evaluate as the parsed flags say; returns the result dict (also what is printed)."""
    if args.checkpoint is not None:
        return run_checkpoint(args)
    missing = [flag for flag, value in (("--scoremap-root", args.scoremap_root),
                                        ("--metadata-root", args.metadata_root), ("--dataset", args.dataset),
                                        ("--split", args.split)) if value is None]
    if missing:
        raise ConfigError(f"score-map mode needs {', '.join(missing)} (or give --checkpoint for mode (b))")
    dataset = dataset_name(args.dataset)
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    if args.overlays:
        if args.overlays < 0 or args.overlay_dir is None or args.image_root is None:
            raise ConfigError("--overlays N needs N >= 0, --overlay-dir and --image-root "
                              "(the images to draw on)")
        if dataset in MASK_DATASETS:
            raise ConfigError("--overlays: overlays draw boxes, so they are written for CUB and ILSVRC only")
    metadata = load_metadata(args.metadata_root / dataset / args.split)
    result = evaluate_scoremaps(
        dataset, metadata, _scoremaps_from_files(args, metadata.image_ids), mask_root=args.mask_root,
        cam_curve_interval=args.cam_curve_interval, iou_thresholds=args.iou_threshold_list, impl=args.impl,
        workers=args.workers, threads=args.threads, check=False)  # iter_scoremaps has validated every map
    result["split"] = args.split
    if args.overlays:
        written = _write_overlays(args, metadata, result)
        result["overlays"] = len(written)
    return result


def main(argv: list[str] | None = None) -> None:
    """Entry point; prints a summary and, last, one JSON line. Errors exit with a one-line message."""
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except MMCamError as err:
        raise SystemExit(f"mmcam-evaluate: error: {err}") from None
    if "pxap" in result:
        print(f"{result['dataset']} {result['split']}: PxAP {result['pxap']:.2f} "
              f"over {result['images']} images")
    else:
        print(f"{result['dataset']} {result['split']}: MaxBoxAcc {result['maxboxacc']:.2f} "
              f"(tau {result['maxboxacc_threshold']:.3f}), MaxBoxAccV2 {result['maxboxacc_v2']:.2f} "
              f"over {result['images']} images")
        if "top1_loc" in result:
            print(f"  GT-known Loc {result['gt_known_loc']:.2f}, Top-1 Loc {result['top1_loc']:.2f}, "
                  f"Top-5 Loc {result['top5_loc']:.2f}, Top-1 Cls {result['top1_cls']:.2f}")
        per_iou = ", ".join(f"IoU {k}: {v:.2f} (tau {result['best_threshold'][k]:.3f})"
                            for k, v in result["per_iou"].items())
        print(f"  multi-contour per IoU: {per_iou}")
    sys.stdout.flush()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
