"""The experiment plan: which runs, with which settings, in which order.

Every variant fine-tunes the same classification-pretrained model of its seed (Stage I only, the
``pretrain`` run) for the same number of epochs, changing one thing at a time: the lambdas (the
paper's Fig. 6, one fixed at 1, the other in 0 / 0.1 / 1 / 10), the set size S (Table 4), where
the CAM is applied (Table 3), and plain CAM (lambda_crr = lambda_frr = 0) as the baseline. This
stands in for the paper's ImageNet-pretrained backbones: every variant starts from a classifier
whose CAMs are already object-centred, and the baseline gets the same Stage I epochs as the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The paper's setting for ResNet backbones: lambda_crr = lambda_frr = 1, S = 5.
PAPER = {"lambda_crr": 1.0, "lambda_frr": 1.0, "set_size": 5}
IMAGE_SIZE = 64  # Tiny ImageNet's own resolution


@dataclass(frozen=True)
class Variant:
    """One setting of the study.

    Attributes:
        name: folder and table name.
        groups: the analyses it belongs to (``main``, ``lambda_crr``, ``lambda_frr``, ``set_size``,
            ``masking``); the paper's setting belongs to all of them.
        overrides: training flags on top of the common ones (config keys).
    """

    name: str
    groups: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict)

    def value(self, key: str) -> Any:
        return self.overrides.get(key, PAPER.get(key))


def _variants() -> list[Variant]:
    variants = [
        Variant("cam", ("main",), {"lambda_crr": 0.0, "lambda_frr": 0.0}),
        Variant("minmaxcam", ("main", "lambda_crr", "lambda_frr", "set_size", "masking"), dict(PAPER)),
    ]
    for value in (0.0, 0.1, 10.0):
        variants.append(Variant(f"crr{value:g}", ("lambda_crr",), {**PAPER, "lambda_crr": value}))
    for value in (0.0, 0.1, 10.0):
        variants.append(Variant(f"frr{value:g}", ("lambda_frr",), {**PAPER, "lambda_frr": value}))
    for size in (2, 3, 4):
        variants.append(Variant(f"S{size}", ("set_size",), {**PAPER, "set_size": size}))
    variants.append(Variant("feature_mask", ("masking",), {**PAPER, "stage2_mask": "feature"}))
    return variants


VARIANTS = _variants()
GROUPS = ("main", "lambda_crr", "lambda_frr", "set_size", "masking")


@dataclass(frozen=True)
class Schedule:
    """Sizes of the study (cut to fit about an hour on two cores; see docs/results.md)."""

    pretrain_epochs: int = 6
    epochs: int = 3
    lr: float = 0.01
    sets_per_batch: int = 5  # all five classes in every batch
    max_steps_per_epoch: int | None = None


@dataclass(frozen=True)
class Run:
    """One training process: a variant (or the pretraining) at one seed."""

    name: str  # variant name or "pretrain"
    seed: int
    folder: Path
    flags: dict[str, Any]
    after: Path | None = None  # the checkpoint this run starts from (written by another run)

    @property
    def done(self) -> bool:
        return (self.folder / "final_metrics.json").is_file()


def pretrain_run(out: Path, data_root: Path, seed: int, schedule: Schedule) -> Run:
    flags = _common(data_root, seed, schedule)
    flags.update(lambda_crr=0.0, lambda_frr=0.0, epochs=schedule.pretrain_epochs, lr_milestones=[],
                 eval_every=0)
    return Run("pretrain", seed, out / "pretrain" / f"seed{seed}", flags)


def variant_run(out: Path, data_root: Path, seed: int, schedule: Schedule, variant: Variant) -> Run:
    start = out / "pretrain" / f"seed{seed}" / "checkpoints" / "last.pt"
    flags = _common(data_root, seed, schedule)
    # the last fine-tuning epoch at a tenth of the learning rate
    flags.update(epochs=schedule.epochs, lr_milestones=[max(1, schedule.epochs - 1)], init=str(start),
                 eval_every=1)
    flags.update(variant.overrides)
    return Run(variant.name, seed, out / variant.name / f"seed{seed}", flags, after=start)


def _common(data_root: Path, seed: int, schedule: Schedule) -> dict[str, Any]:
    flags: dict[str, Any] = {
        "data": "tiny-imagenet", "data_root": str(data_root), "backbone": "resnet18", "seed": seed,
        "image_size": IMAGE_SIZE,
        "lr": schedule.lr, "sets_per_batch": schedule.sets_per_batch, "loader": "torch", "workers": 0,
        "log_every": 10,
    }
    if schedule.max_steps_per_epoch:
        flags["max_steps_per_epoch"] = schedule.max_steps_per_epoch
    return flags


def build_plan(out: Path, data_root: Path, seeds: list[int], schedule: Schedule,
               variants: list[Variant] | None = None) -> tuple[list[Run], list[Run]]:
    """(pretraining runs, variant runs), the variants ordered seed by seed."""
    variants = VARIANTS if variants is None else variants
    pretrain = [pretrain_run(out, data_root, seed, schedule) for seed in seeds]
    runs = [variant_run(out, data_root, seed, schedule, v) for seed in seeds for v in variants]
    return pretrain, runs


def select_variants(names: list[str] | None) -> list[Variant]:
    """The variants named (or of the groups named); all when ``names`` is empty."""
    if not names:
        return list(VARIANTS)
    chosen = [v for v in VARIANTS if v.name in names or set(v.groups) & set(names)]
    unknown = sorted(set(names) - {v.name for v in VARIANTS} - set(GROUPS))
    if unknown:
        known = ", ".join([v.name for v in VARIANTS] + list(GROUPS))
        raise ValueError(f"--only: unknown variant or group {', '.join(unknown)}; known: {known}")
    return chosen
