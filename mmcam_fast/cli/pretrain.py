"""``python -m mmcam_fast.pretrain`` (``mmcam-pretrain``): classification pretraining from scratch,
the stand-in for ImageNet weights where none can be had (:mod:`mmcam_fast.pretraining`)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mmcam_fast.cli import ArgumentParser, console_entry, device_value
from mmcam_fast.errors import ConfigError
from mmcam_fast.pretraining import ARCHS, build_network, pretrain


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="mmcam_fast.pretrain", description=__doc__)
    parser.add_argument("--data-root", required=True, help="a prepared tiny-imagenet folder (the classes)")
    parser.add_argument("--arch", default="resnet18", help=f"one of {', '.join(ARCHS)}")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="peak of the cosine schedule")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="memory format (default: channels-last on CUDA and under autocast, "
                        "contiguous for fp32 on a CPU; the fine-tuning engine's rule)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", type=device_value, default="cpu")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, help="cut epochs (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder for checkpoint.pt and pretrain.json")
    parser.add_argument("--resume", choices=("auto",), default=None, help="continue from <out>/checkpoint.pt")
    parser.add_argument("--export", type=Path, default=None, help="write the final fp16 state dict here")
    args = parser.parse_args(argv)
    checks = [
        (args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}"),
        (args.batch_size >= 2, f"--batch-size must be at least 2, got {args.batch_size}"),
        (math.isfinite(args.lr) and args.lr > 0, f"--lr must be a finite number > 0, got {args.lr}"),
        (math.isfinite(args.weight_decay) and args.weight_decay >= 0,
         f"--weight-decay must be a finite number >= 0, got {args.weight_decay}"),
        (args.image_size >= 16, f"--image-size must be at least 16, got {args.image_size}"),
        (args.workers >= 0, f"--workers must be >= 0, got {args.workers}"),
        (args.max_steps_per_epoch is None or args.max_steps_per_epoch >= 1,
         f"--max-steps-per-epoch must be at least 1 (leave it out for whole epochs), got "
         f"{args.max_steps_per_epoch}"),
        (0 <= args.seed < 2**32, f"--seed must be in [0, 2**32), got {args.seed}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    build_network(args.arch, 2)  # an unknown --arch fails before any data work
    print(json.dumps(pretrain(args)))


cli = console_entry(main, "mmcam-pretrain")
