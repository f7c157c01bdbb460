"""Typed training configuration, the presets per (data set, backbone) and the recipes.

Precedence: dataclass defaults < backbone preset < data-set preset < recipe (``--recipe``) < values
given in ``--config`` or on the command line. Settings left open (None) after that are resolved from
the recipe. Unknown keys fail fast with the name of the key.
``config.yaml`` ends with a comment block saying where each value came from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmcam_fast.errors import ConfigError
from mmcam_fast.models.backbones import REGISTRY, backbone_name, check_feature_stride
from mmcam_fast.rules import check_cam_curve_interval, check_set_size

SECTIONS = ("data", "model", "method", "optimisation", "engine", "run")  # the --help groups, in order


def option(default: Any, section: str, help: str, *, none_means: str | None = None) -> Any:
    """A config field with its ``--help`` text and section beside it (the CLI is derived from these).

    ``none_means``: how a default of None reads in ``--help`` where "none" would not say it.
    """
    assert section in SECTIONS, section
    metadata = {"section": section, "help": help, "none_means": none_means}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


DataName = Literal["synthetic", "tiny-imagenet", "voc", "cub", "imagenet", "openimages"]
# the --data names (mmcam_fast.data.splits maps each to its folders and metadata)
DATA_NAMES: tuple[str, ...] = typing.get_args(DataName)
Recipe = Literal["paper", "authors"]
Stage2Step = Literal["fc_weight", "all"]
STAGE2_STEPS: tuple[str, ...] = typing.get_args(Stage2Step)


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.yaml`` in the run folder.

    Each field carries its ``--help`` text and its section (:data:`SECTIONS`); a ``Literal`` type is
    the field's choices, checked by :meth:`validate` and offered by the CLI.
    """

    # -- data
    data: DataName = option("synthetic", "data",
        "data set: synthetic, tiny-imagenet, voc, cub, imagenet, openimages")
    data_root: str | None = option(None, "data",
        "image root of the data set (synthetic: where to generate it)")
    metadata_root: str | None = option(None, "data",
        "WSOL metadata root",
        none_means="per data set, see docs/data.md")
    image_size: int = option(224, "data", "crop size; the train resize is round(size * 8 / 7)")
    vertical_flip: bool = option(False, "data",
        "add the authors' random vertical flip to the train transform")
    flip_before_crop: bool = option(False, "data",
        "train-time flips before the random crop (the released code's order)")
    set_size: int = option(5, "data", "S, images per set (one class per set)")
    sets_per_batch: int = option(12, "data", "N, distinct classes per batch; batch = N * S")
    sample_with_replacement: bool = option(False, "data",
        "allow classes with fewer than S images (sampled with replacement)")
    workers: int = option(2, "data", "data loader worker processes (0: load in the training process)")
    loader: Literal['auto', 'dali', 'torch'] = option("auto", "data",
        "data loading backend: auto (DALI when installed), dali, torch")
    bad_images: Literal['error', 'skip'] = option("error", "data",
        "unreadable image: error (stop, naming the file) or skip (substitute, counted)")

    # -- model
    backbone: str = option("resnet18", "model",
        "vgg16, resnet50, mobilenet_v2 or resnet18 (the _cam suffix is optional)")
    feature_stride: int = option(8, "model",
        "output stride of the feature map: 8 (28x28 at 224), 16 (14x14), 32 (7x7, torchvision's); the "
        "default is the released code's geometry (vgg16: 16 only)")
    pretrained: str | None = option(None, "model",
        "local torchvision state dict for the backbone (never downloaded)",
        none_means="none, random init")
    conv6_init: Literal['kaiming', 'default'] = option("kaiming", "model",
        "VGG16-CAM's conv6 initialisation: kaiming (He normal, zero bias) or default (PyTorch's)")
    init: str | None = option(None, "model",
        "start from this checkpoint's model weights (backbone and fc); optimizer, schedule and step count "
        "start afresh (unlike --resume)")

    # -- method
    recipe: Recipe = option("paper", "method",
        "paper (the paper's text) or authors (the released training code: Stage II step on every "
        "parameter, vertical flip, flips before the crop, default conv6 init, lambda 1/1, N 5)")
    lambda_crr: float = option(1.0, "method",
        "weight of the common region regularization (0 and 0 = plain CAM)")
    lambda_frr: float = option(1.0, "method", "weight of the full region regularization")
    stage2_mask: Literal['image', 'feature'] = option("image", "method",
        "where Stage II applies the CAM: image (the method) or feature (the paper's Table 3 ablation, f = "
        "g(F * H))")
    stage2_step: Stage2Step = option("fc_weight", "method",
        "what Stage II's step moves: fc_weight (the paper) or all (the released code: weight decay and "
        "momentum on every parameter)")

    # -- optimisation
    epochs: int = option(10, "optimisation", "training epochs")
    lr: float = option(0.0001, "optimisation", "learning rate of the backbone")
    classifier_lr_mult: float = option(10.0, "optimisation", "lr multiplier of the new layers (fc, conv6)")
    momentum: float = option(0.9, "optimisation", "SGD momentum")
    nesterov: bool = option(True, "optimisation", "SGD with Nesterov momentum")
    weight_decay: float = option(0.0005, "optimisation", "SGD weight decay")
    lr_milestones: list[int] = option([], "optimisation",
        "epochs at which the lr is multiplied by --lr-gamma")
    lr_gamma: float = option(0.1, "optimisation", "lr multiplier at each of --lr-milestones")
    seed: int = option(0, "optimisation",
        "random seed of the weights, the set sampler and the augmentations (torchrun: each rank derives "
        "its own from it)")

    # -- engine
    device: str = option("cpu", "engine", "cpu or cuda (torchrun: cuda is each rank's local GPU)")
    impl: Literal['fast', 'reference'] = option("fast", "engine",
        "step implementation: fast (channels-last, AMP, compile, fused kernels) or reference")
    amp: Literal['auto', 'bf16', 'fp16', 'off'] = option("auto", "engine",
        "fast engine autocast: auto (bf16 where the hardware has it), bf16, fp16 (GradScaler), off")
    # on a 2-core CPU compiling takes minutes, more than it saves in a short run
    compile: bool | None = option(None, "engine",
        "fast engine: torch.compile Stage I and II",
        none_means="on CUDA only")
    channels_last: bool | None = option(None, "engine",
        "fast engine: channels-last memory format",
        none_means="on CUDA and under CPU autocast, off for fp32 on a CPU")
    cuda_graphs: bool = option(True, "engine",
        "fast engine on CUDA: replay Stage II from CUDA graphs (compile mode reduce-overhead)")
    fold_bn: bool = option(True, "engine",
        "fast engine under autocast (bf16/fp16): fold Stage II's eval-mode BatchNorm into the "
        "convolutions before it")
    sync_bn: bool = option(False, "engine",
        "torchrun on GPUs: SyncBatchNorm, Stage I batch statistics over all ranks")
    dist_timeout_min: float = option(60.0, "engine",
        "torchrun: collective timeout in minutes (rank 0 validates while the others wait)")

    # -- run
    log_every: int = option(10, "run", "steps between metric flushes to metrics.jsonl")
    eval_every: int = option(1, "run", "epochs between validations (0: only the final test)")
    cam_curve_interval: float = option(0.01, "run",
        "step of the CAM thresholds the localization metrics sweep")
    max_steps_per_epoch: int | None = option(None, "run",
        "cut every epoch to this many steps (smoke runs)",
        none_means="none, whole epochs")
    checkpoint_every: int = option(0, "run",
        "also write checkpoints/last.pt every N steps within an epoch (0: epoch ends only)")
    resume: str | None = option(None, "run",
        "continue a run: 'auto' (the newest complete checkpoint in --out, else start afresh) or a "
        "checkpoint file")
    overwrite: bool = option(False, "run",
        "start over in an --out that already holds a run (removes its logs, final metrics and "
        "checkpoints); without it such an --out is refused")
    max_nonfinite_steps: int = option(20, "run",
        "stop with an error after this many consecutive steps with a NaN/inf loss (each is skipped and "
        "counted; 0: never stop)")
    # None: a new one, runs/<data>-<backbone>-<date>-<time> (under torchrun named after the run id, the
    # same on every rank and after a restart)
    out: str | None = option(None, "run",
        "run folder (config.yaml, metrics.jsonl, val_metrics.jsonl, checkpoints/, final_metrics.json, "
        "curves.png); one that holds a run is refused unless --resume or --overwrite",
        none_means="a new runs/<data>-<backbone>-<date>-<time>")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section(self, name: str) -> dict[str, Any]:
        """The fields of one of :data:`SECTIONS`, in declaration order: ``{name: value}``.

        The config stays flat (one key per flag, as ``--config`` files, ``config.yaml`` and checkpoints
        spell it; a nested form would also make ``data`` both a section and a key); a field's section
        is its metadata, from which the ``--help`` groups and ``config.yaml``'s headings are derived.
        """
        if name not in SECTIONS:
            raise ConfigError(f"no config section {name!r}; sections: {', '.join(SECTIONS)}")
        values = self.to_dict()
        return {f.name: values[f.name] for f in dataclasses.fields(self) if f.metadata.get("section") == name}

    def save(self, path: str | Path) -> None:
        """``config.yaml``: the values under a heading per section (flat keys, as ``--config`` reads
        them), then (as comments) where each one came from."""
        text = "".join(f"# -- {name}\n" + yaml.safe_dump(self.section(name), sort_keys=False)
                       for name in SECTIONS)
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
        hints = typing.get_type_hints(cls)
        return cls(**{key: _typed(key, value, hints[key], source) for key, value in values.items()})

    def validate(self) -> None:
        """Every rule once: a Literal field's choices, then the bounds."""
        for name, choices in literal_choices().items():
            if getattr(self, name) not in choices:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        finite = math.isfinite
        checks = [
            (self.sets_per_batch >= 1, "--sets-per-batch must be at least 1"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (finite(self.lr) and self.lr > 0, f"--lr must be a finite number > 0, got {self.lr}"),
            (finite(self.classifier_lr_mult) and self.classifier_lr_mult > 0,
             f"--classifier-lr-mult must be a finite number > 0, got {self.classifier_lr_mult}"),
            (finite(self.momentum) and 0 <= self.momentum < 1,
             f"--momentum must be in [0, 1), got {self.momentum}"),
            (not self.nesterov or self.momentum > 0,
             "--nesterov needs --momentum > 0 (or --no-nesterov with --momentum 0)"),
            (finite(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be a finite number >= 0, got {self.weight_decay}"),
            (finite(self.lr_gamma) and 0 < self.lr_gamma <= 1,
             f"--lr-gamma must be in (0, 1], got {self.lr_gamma}"),
            (all(m >= 1 for m in self.lr_milestones),
             f"--lr-milestones are epochs, each at least 1, got {self.lr_milestones}"),
            (0 <= self.seed < 2**32, f"--seed must be in [0, 2**32), got {self.seed}"),
            (finite(self.lambda_crr) and self.lambda_crr >= 0,
             f"--lambda-crr must be a finite number >= 0, got {self.lambda_crr}"),
            (finite(self.lambda_frr) and self.lambda_frr >= 0,
             f"--lambda-frr must be a finite number >= 0, got {self.lambda_frr}"),
            (self.image_size >= 16, "--image-size must be at least 16"),
            (self.log_every >= 1, f"--log-every must be at least 1, got {self.log_every}"),
            (self.eval_every >= 0,
             f"--eval-every must be >= 0 (0: only the final test), got {self.eval_every}"),
            (self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
             f"--max-steps-per-epoch must be at least 1 (leave it out for whole epochs), got "
             f"{self.max_steps_per_epoch}"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be >= 0 (0: at the end of epochs only)"),
            (self.max_nonfinite_steps >= 0, "--max-nonfinite-steps must be >= 0 (0: never stop)"),
            (finite(self.dist_timeout_min) and self.dist_timeout_min > 0,
             "--dist-timeout-min must be a finite number > 0"),
            (self.resume is None or self.resume != "", "--resume takes 'auto' or a checkpoint file"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_cam_curve_interval(self.cam_curve_interval)  # the evaluators' own rule
        check_set_size(self.set_size)  # the kernels' bound


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# what a value of each field type must be (Literal fields: their choices are checked by ``validate``)
_FITS = {bool: lambda v: isinstance(v, bool), int: _is_int, str: lambda v: isinstance(v, str),
         float: lambda v: _is_int(v) or isinstance(v, float),
         list: lambda v: isinstance(v, (list, tuple)) and all(_is_int(x) for x in v)}
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list of integers"}


def _typed(key: str, value: Any, kind: Any, source: str) -> Any:
    """``value`` as the field's type (a YAML file's values are untyped): an int where a float is
    expected, and a number YAML read as text (``1e-3``), become floats, a path its string; anything
    else that does not fit is a ConfigError naming the key."""
    args = typing.get_args(kind)
    if type(None) in args:  # X | None
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
    kind = typing.get_origin(kind) or kind  # list[int] -> list; Literal[...] -> Literal
    if kind is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    elif kind is str and isinstance(value, os.PathLike):  # a Path from Python code
        value = os.fspath(value)
    fits = _FITS.get(kind)
    if fits is not None and not fits(value):
        raise ConfigError(f"{source}: {key} must be {_KIND_NAMES[kind]}, got {value!r}")
    return float(value) if kind is float else list(value) if kind is list else value


def literal_choices() -> dict[str, tuple[str, ...]]:
    """The choices of every ``Literal`` field of :class:`TrainConfig` (the CLI offers them)."""
    hints = typing.get_type_hints(TrainConfig)
    return {name: typing.get_args(kind) for name, kind in hints.items() if typing.get_origin(kind) is Literal}


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
