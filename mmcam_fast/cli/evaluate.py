"""``mmcam-evaluate``: WSOL evaluation (MaxBoxAcc, MaxBoxAccV2, PxAP) of score maps.

Mode (a): score maps exported as ``<scoremap-root>/<image_id>.npy`` (the
protocol's layout; e.g. by mode (b)'s ``--export-scoremaps``), evaluated against a split's metadata.
Two ways to name the data set:

* A benchmark (CUB, ILSVRC alias imagenet, OpenImages): metadata from
  ``<metadata-root>/<dataset>/<split>/`` (the benchmark's ``metadata/`` folder), masks from
  ``<mask-root>/OpenImages/<mask path>``::

    mmcam-evaluate --scoremap-root runs/x/scoremaps --metadata-root metadata --dataset CUB --split test

* A data set the project prepared (``python -m mmcam_fast.prepare synthetic|voc|tiny-imagenet
  --out DIR``): give its folder as ``--data-root``, as for training. The data set is read from the
  folder (``prepared.json`` or ``synthetic.json``; ``--dataset`` may name it too, and must agree),
  the metadata from ``<data-root>/metadata/<split>/`` (``--metadata-root`` overrides it, e.g.
  ``<data-root>/metadata-masks`` for the synthetic set's masks, evaluated as PxAP), masks and the
  images of ``--overlays`` from the data root (``--mask-root``, ``--image-root`` override them)::

    mmcam-evaluate --scoremap-root runs/x/scoremaps --data-root runs/data/synthetic --split test

  A raw Tiny ImageNet or VOC folder is not a prepared folder: training converts it into
  ``runs/data/<kind>-<hash>``, the folder to give here.

``--overlays K`` writes K overlay PNGs (image at its own aspect ratio, heatmap, ground truth solid
green, the box at MaxBoxAcc's threshold dashed red, a caption) of K images spread over the classes
(round-robin) to ``--overlay-dir``. The last line of stdout is one JSON object with the results.
Input errors are one line on stderr, naming the file or flag, and exit status 2.

Mode (b): a training checkpoint and a data set: the CAMs are computed here (ground-truth class for
MaxBoxAcc / MaxBoxAccV2 / GT-known Loc / PxAP, the top-5 predictions for Top-1 / Top-5 Loc), score
maps optionally exported in the same layout, overlays optionally written::

    mmcam-evaluate --checkpoint runs/x/checkpoints/best.pt --data tiny-imagenet \
        --data-root /data/tiny-imagenet-5 --split val --overlays 16 --overlay-dir runs/x/overlays
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmcam_fast.cli import ArgumentParser, console_entry, device_value, int_at_least
from mmcam_fast.data.manifest import find_class_names, prepared_kind
from mmcam_fast.data.metadata import load_metadata
from mmcam_fast.errors import ConfigError, DataError
from mmcam_fast.evaluation import (
    DEFAULT_IOU_THRESHOLDS,
    dataset_name,
    evaluate_scoremap_folder,
    write_split_overlays,
)
from mmcam_fast.evaluation.protocol import MASK_DATASETS, is_benchmark, split_folder
from mmcam_fast.localization import evaluate_checkpoint
from mmcam_fast.run_folder import check_output_folder

EPILOG = """score-map mode, a benchmark (metadata in <metadata-root>/<CUB|ILSVRC|OpenImages>/<split>/):
  mmcam-evaluate --scoremap-root MAPS --metadata-root metadata --dataset CUB --split test
score-map mode, a data set made by `python -m mmcam_fast.prepare synthetic|voc|tiny-imagenet`
(data set, metadata, masks and images read from the folder):
  mmcam-evaluate --scoremap-root MAPS --data-root runs/data/synthetic --split test
  mmcam-evaluate --scoremap-root MAPS --data-root runs/data/synthetic \\
      --metadata-root runs/data/synthetic/metadata-masks --split test        (PxAP on its masks)
checkpoint mode:
  mmcam-evaluate --checkpoint runs/x/checkpoints/best.pt --split val --export-scoremaps MAPS
input errors: one line on stderr, exit status 2"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="mmcam-evaluate", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path,
                        help="mode (b): a training checkpoint; CAMs are computed from it")
    parser.add_argument("--data", help="mode (b): data set name (default: the checkpoint's)")
    parser.add_argument("--data-root", type=Path,
                        help="mode (b): data root (default: the checkpoint's); mode (a): a folder made by "
                             "`python -m mmcam_fast.prepare` (synthetic, voc, tiny-imagenet): the "
                             "data set, metadata (<data-root>/metadata/<split>), masks and images are read "
                             "from it")
    parser.add_argument("--export-scoremaps", type=Path, metavar="DIR",
                        help="mode (b): also save every score map as DIR/<image_id>.npy")
    parser.add_argument("--device", type=device_value, default="cpu", help="mode (b): device of the model")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32, help="mode (b): images per batch")
    parser.add_argument("--scoremap-root", type=Path,
                        help="folder of <image_id>.npy score maps (224x224, float, in [0, 1])")
    parser.add_argument("--metadata-root", type=Path,
                        help="metadata root; the split is read from <metadata-root>/<dataset>/<split>/ "
                             "(benchmarks) or <metadata-root>/<split>/ (default with --data-root: "
                             "<data-root>/metadata)")
    parser.add_argument("--mask-root", type=Path,
                        help="mask root: OpenImages masks are <mask-root>/OpenImages/<mask path>, a prepared "
                             "data set's <mask-root>/<mask path> (default: --data-root)")
    parser.add_argument("--dataset",
                        help="CUB, ILSVRC (alias imagenet), OpenImages, or a prepared synthetic, "
                             "tiny-imagenet, voc (default: read from --data-root); any case")
    parser.add_argument("--split", help="split folder, e.g. val or test (mode (b) default: test)")
    parser.add_argument("--cam-curve-interval", type=float, default=0.01,
                        help="CAM thresholds are arange(0, 1, interval) (default 0.01: 100 thresholds)")
    parser.add_argument("--iou-threshold-list", type=int, nargs="+", default=list(DEFAULT_IOU_THRESHOLDS),
                        help="IoU thresholds in percent of the multi-contour run (default 30 50 70)")
    parser.add_argument("--impl", choices=("fast", "reference"), default="fast",
                        help="fast (default) or the literal reference; the numbers are identical")
    parser.add_argument("--processes", type=int_at_least(1), default=1,
                        help="processes for the per-image work (default 1: threads, see --threads)")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="threads for the box evaluation when --processes is 1 (default: one per core, "
                             "at most 8); the numbers do not depend on it")
    parser.add_argument("--overlays", type=int_at_least(0), default=0, metavar="K",
                        help="write overlay PNGs of K images spread over the classes (round-robin); needs "
                             "--overlay-dir, and in mode (a) --image-root or --data-root")
    parser.add_argument("--overlay-dir", type=Path, help="folder for overlay PNGs")
    parser.add_argument("--image-root", type=Path,
                        help="image root of the split, for overlays: <image-root>/<image_id> "
                             "(default: --data-root)")
    return parser


def resolve_scoremap_inputs(args: argparse.Namespace) -> str:
    """Mode (a): the data set's canonical name; fills in the metadata, mask and image roots that
    ``--data-root`` implies.

    Raises:
        ConfigError: missing or contradicting flags, naming them.
        DataError: a ``--data-root`` that is not a folder or not a prepared one.
    """
    if args.scoremap_root is not None and not args.scoremap_root.is_dir():
        raise DataError(f"--scoremap-root {args.scoremap_root}: folder does not exist")
    if args.data is not None:
        raise ConfigError("--data names the data set of --checkpoint mode; with --scoremap-root use "
                          "--dataset (or --data-root of a prepared folder)")
    kind = None
    if args.data_root is not None:
        if not args.data_root.is_dir():
            raise DataError(f"--data-root {args.data_root}: folder does not exist")
        kind = prepared_kind(args.data_root)
        if kind is None and args.dataset is None:
            raise DataError(f"--data-root {args.data_root}: not a folder made by `python -m "
                            "mmcam_fast.prepare` (no prepared.json or synthetic.json); prepare it "
                            "first, or give --dataset and --metadata-root")
    if args.dataset is not None:
        dataset = dataset_name(args.dataset)
        if kind is not None and dataset_name(kind) != dataset:
            raise ConfigError(f"--dataset {args.dataset}: --data-root {args.data_root} was prepared as "
                              f"{kind!r} data")
    elif kind is not None:
        dataset = dataset_name(kind)
    else:
        dataset = None
    if args.data_root is not None:
        if args.metadata_root is None:
            args.metadata_root = args.data_root / "metadata"
        if not is_benchmark(dataset or "synthetic"):
            args.mask_root = args.mask_root if args.mask_root is not None else args.data_root
        args.image_root = args.image_root if args.image_root is not None else args.data_root
    missing = [flag for flag, value in (("--scoremap-root", args.scoremap_root),
                                        ("--metadata-root (or --data-root)", args.metadata_root),
                                        ("--dataset (or --data-root)", dataset), ("--split", args.split))
               if value is None]
    if missing:
        raise ConfigError(f"score-map mode needs {', '.join(missing)} (or give --checkpoint for mode (b))")
    assert dataset is not None
    return dataset


def run_checkpoint(args: argparse.Namespace) -> dict:
    """Mode (b): CAMs of a checkpoint on a data set split, evaluated in memory."""
    if args.scoremap_root is not None:
        raise ConfigError("--checkpoint and --scoremap-root are two modes: give one of them")
    if args.overlays and args.overlay_dir is None:
        raise ConfigError("--overlays K needs --overlay-dir")
    result = evaluate_checkpoint(
        args.checkpoint, split=args.split or "test", data=args.data, data_root=args.data_root,
        metadata_root=args.metadata_root, mask_root=args.mask_root, device=args.device,
        batch_size=args.batch_size, cam_curve_interval=args.cam_curve_interval,
        iou_thresholds=tuple(args.iou_threshold_list), impl=args.impl, scoremap_root=args.export_scoremaps,
        overlays=args.overlays, overlay_dir=args.overlay_dir)
    if "overlays" in result:
        result["overlays"] = len(result["overlays"])
    return result


def run(args: argparse.Namespace) -> dict:
    """Evaluate as the parsed flags say; returns the result dict (also what is printed)."""
    for flag, folder in (("--overlay-dir", args.overlay_dir), ("--export-scoremaps", args.export_scoremaps)):
        if folder is not None:  # named before the evaluation runs, not after it
            check_output_folder(folder, flag)
    if args.checkpoint is not None:
        return run_checkpoint(args)
    dataset = resolve_scoremap_inputs(args)
    if args.overlays and (args.overlay_dir is None or args.image_root is None):
        raise ConfigError("--overlays K needs --overlay-dir and --image-root or --data-root "
                          "(the images to draw on)")
    metadata = load_metadata(split_folder(args.metadata_root, dataset, args.split))
    result = evaluate_scoremap_folder(
        dataset, metadata, args.scoremap_root, mask_root=args.mask_root,
        cam_curve_interval=args.cam_curve_interval, iou_thresholds=args.iou_threshold_list, impl=args.impl,
        processes=args.processes, threads=args.threads)
    result["split"] = args.split
    if args.overlays:
        if "pxap" in result or dataset in MASK_DATASETS:
            raise ConfigError(f"--overlays: overlays draw boxes, and {metadata.folder} has masks "
                              "(give a split with boxes, or leave out --overlays)")
        names = find_class_names([args.data_root, args.metadata_root, metadata.folder.parent])
        written = write_split_overlays(metadata, args.scoremap_root, args.image_root,
                                       result["maxboxacc_threshold"], args.overlay_dir, args.overlays, names)
        result["overlays"] = len(written)
    return result


def main(argv: list[str] | None = None) -> None:
    """Entry point; prints a summary and, last, one JSON line. Errors exit with a one-line message."""
    args = build_parser().parse_args(argv)
    result = run(args)
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


cli = console_entry(main, "mmcam-evaluate")
