"""Typed training configuration and the presets per (data set, backbone).

Precedence: dataclass defaults < preset of (data, backbone) < values given on the command line.
Unknown keys fail fast with the name of the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmcam_fast.errors import ConfigError
from mmcam_fast.models.backbones import backbone_name

# the --data names (mmcam_fast.data.loaders maps each to its folders and metadata)
DATA_NAMES = ("synthetic", "tiny-imagenet", "voc", "cub", "imagenet", "openimages")


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.yaml`` in the run folder."""

    data: str = "synthetic"
    data_root: str | None = None
    metadata_root: str | None = None
    backbone: str = "resnet18"
    large_feature_map: bool = False
    pretrained: str | None = None
    image_size: int = 224  # crop size C; train resize R = round(C * 8 / 7) (256 at 224)
    vertical_flip: bool = False  # the authors' extra train-time vertical flip
    set_size: int = 5  # S images per set
    sets_per_batch: int = 12  # N distinct classes per batch
    sample_with_replacement: bool = False
    lambda_crr: float = 1.0
    lambda_frr: float = 1.0
    stage2_mask: str = "image"  # "feature": the paper's Table 3 ablation, f = g(F * H)
    init: str | None = None  # start from this checkpoint's model weights (optimizer and schedule afresh)
    epochs: int = 10
    lr: float = 1e-4  # backbone; new layers (fc, conv6) use lr * classifier_lr_mult
    classifier_lr_mult: float = 10.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_milestones: list[int] = field(default_factory=list)  # epochs at which lr *= lr_gamma
    lr_gamma: float = 0.1
    seed: int = 0
    workers: int = 2
    loader: str = "auto"  # auto (DALI when installed and the data are files), dali, torch
    device: str = "cpu"
    impl: str = "fast"  # or "reference": the plain-PyTorch step every fast path is tested against
    amp: str = "auto"  # fast engine: auto (bf16 where supported), bf16, fp16 (with GradScaler), off
    # fast engine: torch.compile the Stage I and Stage II computations; None = on CUDA only (on a
    # 2-core CPU compiling takes minutes, more than it saves in a short run)
    compile: bool | None = None
    channels_last: bool = True  # fast engine: channels-last memory format end to end
    cuda_graphs: bool = True  # fast engine on CUDA: Stage II replayed from CUDA graphs
    fold_bn: bool = True  # fast engine under autocast: Stage II's eval-mode BatchNorm folded into convs
    bad_images: str = "error"  # or "skip": substitute another image of the same class, counted
    log_every: int = 10
    eval_every: int = 1  # epochs; 0 disables per-epoch validation
    cam_curve_interval: float = 0.01
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke runs, CI)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: at the end of epochs only)
    resume: str | None = None  # "auto" (the newest complete checkpoint of --out, if any) or a file
    overwrite: bool = False  # start over in an --out that holds a run (its run files are removed)
    max_nonfinite_steps: int = 20  # stop after this many consecutive non-finite losses (0: never)
    sync_bn: bool = False  # torchrun on GPUs: SyncBatchNorm (Stage I batch statistics over all ranks)
    dist_timeout_min: float = 60.0  # torchrun: collective timeout (rank 0 validates while others wait)
    out: str = "runs/train"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
        return cls(**values)

    def validate(self) -> None:
        checks = [
            (self.set_size >= 2, "--set-size must be at least 2 (CRR compares images within a set)"),
            (self.sets_per_batch >= 1, "--sets-per-batch must be at least 1"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (self.lambda_crr >= 0 and self.lambda_frr >= 0, "--lambda-crr/--lambda-frr must be >= 0"),
            (self.image_size >= 16, "--image-size must be at least 16"),
            (self.bad_images in ("error", "skip"), "--bad-images must be 'error' or 'skip'"),
            (self.stage2_mask in ("image", "feature"), "--stage2-mask must be 'image' or 'feature'"),
            (self.impl in ("fast", "reference"), "--impl must be 'fast' or 'reference'"),
            (self.amp in ("auto", "bf16", "fp16", "off"), "--amp must be one of auto, bf16, fp16, off"),
            (0 < self.cam_curve_interval < 1, "--cam-curve-interval must be in (0, 1)"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be >= 0 (0: at the end of epochs only)"),
            (self.max_nonfinite_steps >= 0, "--max-nonfinite-steps must be >= 0 (0: never stop)"),
            (self.dist_timeout_min > 0, "--dist-timeout-min must be positive"),
            (self.resume is None or self.resume != "", "--resume takes 'auto' or a checkpoint file"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


# Presets from the paper (Sec. 4: S=5, N=12, ResNet50 N=10; Fig. 6: VGG16 best at lambda_frr=10 with
# a small lambda_crr, MobileNetV2 prefers a larger lambda_crr) and the authors' released code (SGD
# Nesterov, lr 1e-4, classifier x10, wd 5e-4, 200 epochs with decay at 50 and 100 on CUB). ImageNet
# and OpenImages schedules follow the evaluation benchmark's (10 epochs on ImageNet).
_BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    "vgg16": {"lambda_crr": 1.0, "lambda_frr": 10.0, "sets_per_batch": 12},
    "resnet50": {"lambda_crr": 1.0, "lambda_frr": 1.0, "sets_per_batch": 10},
    "mobilenet_v2": {"lambda_crr": 10.0, "lambda_frr": 1.0, "sets_per_batch": 12},
    "resnet18": {"lambda_crr": 1.0, "lambda_frr": 1.0, "sets_per_batch": 12},
}
_DATA_PRESETS: dict[str, dict[str, Any]] = {
    "cub": {"epochs": 200, "lr_milestones": [50, 100], "image_size": 224},
    "imagenet": {"epochs": 10, "lr_milestones": [3, 6, 9], "image_size": 224},
    "openimages": {"epochs": 10, "lr_milestones": [3, 6, 9], "image_size": 224},
    "voc": {"epochs": 30, "lr_milestones": [20], "image_size": 224},
    # Small data at 64 px, trained from scratch on CPU: few classes, so fewer sets per batch. The
    # lambdas stay at the paper's 1 and 1 with S = 5: in the Tiny-ImageNet-5 study (README,
    # Experiments) that setting tied plain CAM for the best val MaxBoxAccV2 of all variants.
    "tiny-imagenet": {"epochs": 10, "lr_milestones": [7], "image_size": 64, "sets_per_batch": 5,
                      "lr": 0.01, "classifier_lr_mult": 1.0, "large_feature_map": True},
    # The built-in default of the README's first command: a CPU run of a few minutes.
    "synthetic": {"epochs": 6, "lr_milestones": [5], "image_size": 64, "sets_per_batch": 4,
                  "lr": 0.01, "classifier_lr_mult": 1.0, "large_feature_map": True},
}


def preset(data: str, backbone: str) -> dict[str, Any]:
    """The preset values for a (data set, backbone) pair; later entries override earlier ones.

    ``backbone`` may be spelled any way :func:`mmcam_fast.models.backbones.backbone_name` accepts.
    """
    backbone = backbone_name(backbone)
    values: dict[str, Any] = {}
    values.update(_BACKBONE_PRESETS[backbone])
    values.update(_DATA_PRESETS.get(data, {}))
    if backbone not in ("resnet50", "resnet18"):
        values.pop("large_feature_map", None)
    return values


def build_config(overrides: dict[str, Any], *, source: str = "command line") -> TrainConfig:
    """Defaults, then the preset of (data, backbone), then ``overrides`` (values that are not None)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if "backbone" in given:  # one normalisation, before anything reads the name
        given["backbone"] = backbone_name(given["backbone"])
    if "data" in given and given["data"] not in DATA_NAMES:
        raise ConfigError(f"--data {given['data']!r} is not a known data set; valid: {', '.join(DATA_NAMES)}")
    base = TrainConfig.from_dict(given, source=source)
    values = preset(base.data, base.backbone)
    values.update(given)
    config = TrainConfig.from_dict(values, source=source)
    config.validate()
    # which values the user chose (flags, --config): a preset's value may adapt to the data, these not
    config.explicit = frozenset(given)
    return config
