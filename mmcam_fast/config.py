"""Typed training configuration, the presets per (data set, backbone) and the recipes.

Precedence: dataclass defaults < backbone preset < data-set preset < recipe (``--recipe``) < values
given in ``--config`` or on the command line. Settings left open (None) after that are resolved from
the recipe. Unknown keys fail fast with the name of the key.
``config.yaml`` ends with a comment block saying where each value came from.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mmcam_kernels import MIN_SET_SIZE

from mmcam_fast.errors import ConfigError
from mmcam_fast.evaluation.thresholds import check_cam_curve_interval
from mmcam_fast.models.backbones import REGISTRY, backbone_name, check_feature_stride

# the --data names (mmcam_fast.data.loaders maps each to its folders and metadata)
DATA_NAMES = ("synthetic", "tiny-imagenet", "voc", "cub", "imagenet", "openimages")


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.yaml`` in the run folder."""

    data: str = "synthetic"
    data_root: str | None = None
    metadata_root: str | None = None
    backbone: str = "resnet18"
    # output stride of the feature map: 8 (28x28 at 224), 16 (14x14), 32 (7x7); the released code's
    # geometry by default (8; the vgg16 preset: 16, the only stride VGG16-CAM has)
    feature_stride: int = 8
    pretrained: str | None = None
    # "paper" (the paper's text) or "authors" (the released training code point by point); see docs/usage.md
    recipe: str = "paper"
    image_size: int = 224  # crop size C; train resize R = round(C * 8 / 7) (256 at 224)
    vertical_flip: bool = False  # the authors' extra train-time vertical flip (recipe: authors)
    # train-time flips before the random crop (the released code's order) instead of after it
    flip_before_crop: bool = False
    # what Stage II's optimizer step moves: "fc_weight" (the paper: fc.weight and its momentum only)
    # or "all" (the released code: zero gradients elsewhere, so weight decay and momentum move every
    # parameter a second time per batch)
    stage2_step: str = "fc_weight"
    conv6_init: str = "kaiming"  # VGG16-CAM's conv6: "kaiming" (He normal, zero bias) or "default"
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
    # the run folder; None: a new one, runs/<data>-<backbone>-<date>-<time> (under torchrun named
    # after the run id, the same on every rank and after a restart)
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """``config.yaml``: the values, then (as comments) where each one came from."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        sources: dict[str, str] = getattr(self, "sources", {})
        if sources:
            by_source: dict[str, list[str]] = {}
            for key, where in sources.items():
                by_source.setdefault(where, []).append(key)
            text += ("# where each value came from (defaults < backbone preset < data preset < recipe "
                     "< --config/flags):\n")
            text += "".join(f"#   {where}: {', '.join(keys)}\n" for where, keys in by_source.items())
        Path(path).write_text(text)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        values = dict(values)
        if "large_feature_map" in values:  # the flag --feature-stride replaced (older checkpoints)
            large = values.pop("large_feature_map")
            resnet = str(values.get("backbone", cls.backbone)).startswith("resnet")
            if values.get("feature_stride") is None and resnet:
                values["feature_stride"] = 8 if large else 16
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
        return cls(**values)

    def validate(self) -> None:
        checks = [
            (self.sets_per_batch >= 1, "--sets-per-batch must be at least 1"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (self.lambda_crr >= 0 and self.lambda_frr >= 0, "--lambda-crr/--lambda-frr must be >= 0"),
            (self.image_size >= 16, "--image-size must be at least 16"),
            (self.bad_images in ("error", "skip"), "--bad-images must be 'error' or 'skip'"),
            (self.stage2_mask in ("image", "feature"), "--stage2-mask must be 'image' or 'feature'"),
            (self.impl in ("fast", "reference"), "--impl must be 'fast' or 'reference'"),
            (self.amp in ("auto", "bf16", "fp16", "off"), "--amp must be one of auto, bf16, fp16, off"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be >= 0 (0: at the end of epochs only)"),
            (self.max_nonfinite_steps >= 0, "--max-nonfinite-steps must be >= 0 (0: never stop)"),
            (self.dist_timeout_min > 0, "--dist-timeout-min must be positive"),
            (self.resume is None or self.resume != "", "--resume takes 'auto' or a checkpoint file"),
            (self.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}"),
            (self.stage2_step in STAGE2_STEPS,
             f"--stage2-step must be one of {', '.join(STAGE2_STEPS)}"),
            (self.conv6_init in ("kaiming", "default"), "--conv6-init must be 'kaiming' or 'default'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_cam_curve_interval(self.cam_curve_interval)  # the evaluators' own rule
        if self.set_size < MIN_SET_SIZE:  # the kernels' rule (mmcam_kernels.check_set_size)
            raise ConfigError(f"--set-size must be at least {MIN_SET_SIZE} (CRR compares images within a "
                              f"set), got {self.set_size}")


# Presets from the paper per backbone live in its registry entry (mmcam_fast.models.backbones.REGISTRY:
# Sec. 4: S=5, N=12, ResNet50 N=10; Fig. 6: VGG16 best at lambda_frr=10 with a small lambda_crr,
# MobileNetV2 prefers a larger lambda_crr). Per data set: the authors' released code (SGD Nesterov,
# lr 1e-4, classifier x10, wd 5e-4, 200 epochs with decay at 50 and 100 on CUB); ImageNet and
# OpenImages schedules follow the evaluation benchmark's (10 epochs on ImageNet).
_BACKBONE_PRESETS: dict[str, dict[str, Any]] = {name: dict(spec.preset) for name, spec in REGISTRY.items()}
_DATA_PRESETS: dict[str, dict[str, Any]] = {
    "cub": {"epochs": 200, "lr_milestones": [50, 100], "image_size": 224},
    "imagenet": {"epochs": 10, "lr_milestones": [3, 6, 9], "image_size": 224},
    "openimages": {"epochs": 10, "lr_milestones": [3, 6, 9], "image_size": 224},
    "voc": {"epochs": 30, "lr_milestones": [20], "image_size": 224},
    # Small data at 64 px, trained from scratch on CPU: few classes, so fewer sets per batch. The
    # lambdas stay at the paper's 1 and 1 with S = 5: in the Tiny-ImageNet-5 study (docs/results.md,
    # Experiments) that setting tied plain CAM for the best val MaxBoxAccV2 of all variants.
    "tiny-imagenet": {"epochs": 10, "lr_milestones": [7], "image_size": 64, "sets_per_batch": 5,
                      "lr": 0.01, "classifier_lr_mult": 1.0},
    # The built-in default of the README's first command: a CPU run of a few minutes.
    "synthetic": {"epochs": 6, "lr_milestones": [5], "image_size": 64, "sets_per_batch": 4,
                  "lr": 0.01, "classifier_lr_mult": 1.0},
}
STAGE2_STEPS = ("fc_weight", "all")
# The recipes (--recipe). "paper": what the paper states, where the released code differs from it.
# "authors": the released training code wherever the paper does not say otherwise: its Stage II step
# as it runs under the PyTorch 1.x it was written for (zero_grad() leaves zero gradients, so weight
# decay and Nesterov momentum move every parameter), its train transform (resize, horizontal and
# vertical flips, then the random crop), PyTorch's default conv6 initialisation, lambda 1 / 1 and its
# batch default of 5 sets. The geometry (28x28 at 224) is the released code's in both.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"vertical_flip": False, "flip_before_crop": False, "stage2_step": "fc_weight",
              "conv6_init": "kaiming"},
    "authors": {"vertical_flip": True, "flip_before_crop": True, "stage2_step": "all",
                "conv6_init": "default", "lambda_crr": 1.0, "lambda_frr": 1.0, "sets_per_batch": 5},
}


def default_run_folder(data: str, backbone: str) -> str:
    """A new run folder's name: ``runs/<data>-<backbone>-<YYYYmmdd-HHMMSS>`` (a suffix when taken).

    Under torchrun the ranks (and a worker group restarted by ``--max-restarts``) must agree on the
    folder, so it is named after torchrun's run id instead of the time.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"runs/{data}-{backbone}-{run_id}"
    stem = f"runs/{data}-{backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, k = stem, 1
    while Path(name).exists():
        k += 1
        name = f"{stem}-{k}"
    return name


def preset(data: str, backbone: str) -> dict[str, Any]:
    """The preset values for a (data set, backbone) pair; later entries override earlier ones.

    ``backbone`` may be spelled any way :func:`mmcam_fast.models.backbones.backbone_name` accepts.
    """
    return {key: value for key, (value, _) in _layers(data, backbone_name(backbone), None).items()}


def _layers(data: str, backbone: str, recipe: str | None) -> dict[str, tuple[Any, str]]:
    """Preset and recipe values with where each came from, in precedence order."""
    values: dict[str, tuple[Any, str]] = {}
    for where, layer in ((f"preset backbone={backbone}", _BACKBONE_PRESETS[backbone]),
                         (f"preset data={data}", _DATA_PRESETS.get(data, {})),
                         (f"recipe {recipe}", RECIPES.get(recipe, {}) if recipe else {})):
        values.update({key: (value, where) for key, value in layer.items()})
    return values


def build_config(overrides: dict[str, Any], *, source: str = "command line") -> TrainConfig:
    """Defaults, then the presets of (data, backbone), then the recipe, then ``overrides`` (values that
    are not None)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if "backbone" in given:  # one normalisation, before anything reads the name
        given["backbone"] = backbone_name(given["backbone"])
    if "data" in given and given["data"] not in DATA_NAMES:
        raise ConfigError(f"--data {given['data']!r} is not a known data set; valid: {', '.join(DATA_NAMES)}")
    base = TrainConfig.from_dict(given, source=source)
    if base.recipe not in RECIPES:
        raise ConfigError(f"--recipe {base.recipe!r}: expected one of {', '.join(RECIPES)}")
    layered = _layers(base.data, base.backbone, base.recipe)
    values = {key: value for key, (value, _) in layered.items()}
    sources = {key: where for key, (_, where) in layered.items()}
    values.update(given)
    sources.update({key: source for key in given})
    config = TrainConfig.from_dict(values, source=source)
    config.validate()
    check_feature_stride(config.backbone, config.feature_stride)
    if config.out is None:
        if config.resume is not None:
            raise ConfigError("--resume needs --out, the run folder to continue")
        config.out = default_run_folder(config.data, config.backbone)
        sources["out"] = "a new run folder"
    # which values the user chose (flags, --config): a preset's value may adapt to the data, these not
    config.explicit = frozenset(given)
    config.sources = sources
    return config
