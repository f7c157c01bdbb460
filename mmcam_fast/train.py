"""``python -m mmcam_fast.train`` / ``torchrun -m mmcam_fast.train``: train MinMaxCAM (or plain CAM).

Under ``torchrun --nproc-per-node G`` each process trains on its own N sets of S images (a global
batch of G x N x S), rank 0 logs, validates and writes checkpoints; ``--resume auto`` continues from
the newest complete checkpoint (also after torchrun's ``--max-restarts``).

Flags mirror :class:`mmcam_fast.config.TrainConfig`; values not given come from the preset of the
(data set, backbone) pair, then from the defaults. ``--config FILE`` reads a YAML of the same keys
(flags given on the command line win).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from mmcam_fast.cli import add_dataclass_flags, run_main
from mmcam_fast.config import TrainConfig, build_config
from mmcam_fast.errors import ConfigError

_HELP = {
    "data": "data set: synthetic, tiny-imagenet, voc, cub, imagenet, openimages",
    "data_root": "image root of the data set (synthetic: where to generate it)",
    "metadata_root": "WSOL metadata root (defaults per data set, see README)",
    "backbone": "vgg16, resnet50, mobilenet_v2 or resnet18 (the _cam suffix is optional)",
    "large_feature_map": "ResNet: layer3 at stride 1 too (28x28 maps at 224)",
    "pretrained": "local torchvision state dict for the backbone (never downloaded)",
    "image_size": "crop size; the train resize is round(size * 8 / 7)",
    "vertical_flip": "add the authors' random vertical flip to the train transform",
    "set_size": "S, images per set (one class per set)",
    "sets_per_batch": "N, distinct classes per batch; batch = N * S",
    "sample_with_replacement": "allow classes with fewer than S images (sampled with replacement)",
    "lambda_crr": "weight of the common region regularization (0 and 0 = plain CAM)",
    "lambda_frr": "weight of the full region regularization",
    "stage2_mask": "where Stage II applies the CAM: image (the method) or feature (the paper's Table 3 "
                   "ablation, f = g(F * H))",
    "init": "start from this checkpoint's model weights (backbone and fc); optimizer, schedule and "
            "step count start afresh (unlike --resume)",
    "lr": "learning rate of the backbone",
    "classifier_lr_mult": "lr multiplier of the new layers (fc, conv6)",
    "lr_milestones": "epochs at which the lr is multiplied by --lr-gamma",
    "impl": "step implementation: fast (channels-last, AMP, compile, fused kernels) or reference",
    "amp": "fast engine autocast: auto (bf16 where the hardware has it), bf16, fp16 (GradScaler), off",
    "compile": "fast engine: torch.compile Stage I and II (default: on CUDA only)",
    "channels_last": "fast engine: channels-last memory format",
    "cuda_graphs": "fast engine on CUDA: replay Stage II from CUDA graphs (compile mode reduce-overhead)",
    "fold_bn": "fast engine under autocast (bf16/fp16): fold Stage II's eval-mode BatchNorm into the "
               "convolutions before it",
    "bad_images": "unreadable image: error (stop, naming the file) or skip (substitute, counted)",
    "loader": "data loading backend: auto (DALI when installed), dali, torch",
    "log_every": "steps between metric flushes to metrics.jsonl",
    "eval_every": "epochs between validations (0: only the final test)",
    "max_steps_per_epoch": "cut every epoch to this many steps (smoke runs)",
    "checkpoint_every": "also write checkpoints/last.pt every N steps within an epoch (0: epoch ends only)",
    "resume": "continue a run: 'auto' (the newest complete checkpoint in --out, else start afresh) or a "
              "checkpoint file",
    "max_nonfinite_steps": "stop with an error after this many consecutive steps with a NaN/inf loss "
                           "(each is skipped and counted; 0: never stop)",
    "sync_bn": "torchrun on GPUs: SyncBatchNorm, Stage I batch statistics over all ranks",
    "dist_timeout_min": "torchrun: collective timeout in minutes (rank 0 validates while the others wait)",
    "out": "run folder (config.yaml, metrics.jsonl, checkpoints/, final_metrics.json)",
}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="mmcam_fast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML file of config keys")
    add_dataclass_flags(parser, TrainConfig, _HELP)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config")
    values = {}
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"--config {config_file}: file not found")
        loaded = yaml.safe_load(config_file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {config_file}: expected a mapping of config keys")
        values.update(loaded)
    values.update({k: v for k, v in args.items() if v is not None})
    return build_config(values, source=str(config_file) if config_file else "command line")


def main(argv: list[str] | None = None) -> None:
    from mmcam_fast.runner import train

    config = parse_args(argv)
    result = train(config)
    print(result.summary_line())


if __name__ == "__main__":
    sys.exit(run_main(main))
