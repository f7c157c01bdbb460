"""``python -m mmcam_fast.prepare`` (``mmcam-prepare``): convert a data set into the WSOL
metadata format (:mod:`mmcam_fast.data.converters`) or generate the synthetic one."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from mmcam_fast.cli import ArgumentParser, console_entry, folder_value
from mmcam_fast.data.converters import CONVERTERS, unpack_archive
from mmcam_fast.data.manifest import read_class_list
from mmcam_fast.data.synthetic import make_synthetic
from mmcam_fast.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m mmcam_fast.prepare",
                                     description="Convert a data set into the WSOL metadata format.")
    parser.add_argument("kind", choices=[*CONVERTERS, "synthetic"], help="the source format")
    parser.add_argument("--src", type=Path, help="the source folder (tiny-imagenet, voc)")
    parser.add_argument("--out", type=folder_value, required=True, help="the output folder (a --data-root)")
    parser.add_argument("--val-per-class", type=int, default=None,
                        help="tiny-imagenet, voc: images per class held out from train as the val split "
                             "(default 10); synthetic: val images per class (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out choice / synthetic images")
    parser.add_argument("--strict-boxes", action="store_true",
                        help="a box extending outside its image is an error instead of being clipped")
    parser.add_argument("--labels-only", action="store_true",
                        help="tiny-imagenet: a classification set without boxes (pretraining)")
    parser.add_argument("--classes", type=Path, default=None,
                        help="tiny-imagenet: only the wnids listed in this file, one per line (e.g. "
                             "wsol20.txt, pretrain172.txt); --src may also be a .tar.gz archive, extracted "
                             "once into runs/data/")
    group = parser.add_argument_group("synthetic")
    group.add_argument("--num-classes", type=int, default=4)
    group.add_argument("--train-per-class", type=int, default=100)
    group.add_argument("--test-per-class", type=int, default=20)
    group.add_argument("--size", type=int, default=64, help="image side in pixels")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.kind == "synthetic":
        out = make_synthetic(args.out, num_classes=args.num_classes, train_per_class=args.train_per_class,
                             val_per_class=20 if args.val_per_class is None else args.val_per_class,
                             test_per_class=args.test_per_class,
                             size=args.size, seed=args.seed)
    else:
        if args.src is None:
            raise ConfigError(f"--src is required for {args.kind}")
        val_per_class = 10 if args.val_per_class is None else args.val_per_class
        if val_per_class < 1:
            raise ConfigError(f"--val-per-class must be at least 1, got {val_per_class}")
        extra = {}
        if args.classes is not None:
            if args.kind != "tiny-imagenet":
                raise ConfigError("--classes applies to tiny-imagenet only")
            extra["classes"] = read_class_list(args.classes)
        if args.labels_only:
            if args.kind != "tiny-imagenet":
                raise ConfigError("--labels-only applies to tiny-imagenet only")
            extra["labels_only"] = True
        src = args.src
        if src.is_file() and src.name.endswith((".tar.gz", ".tgz", ".tar")):
            src = unpack_archive(src)
        out = CONVERTERS[args.kind](src, args.out, val_per_class=val_per_class,
                                    seed=args.seed, strict_boxes=args.strict_boxes, **extra)
    print(f"{out}: ready (use it as --data-root)")
    return 0


cli = console_entry(main, "mmcam-prepare")
