"""``python -m mmcam_fast.tiny_wsol``: CAM against MinMaxCAM from pretrained backbones.

The paper's setting in miniature: ResNet18-CAM and MobileNetV2-CAM start from weights pretrained on
172 Tiny ImageNet classes (``experiments/pretrained/``, the stand-in for ImageNet weights; rebuilt by
``make pretrain``) and are fine-tuned with the paper's recipe (SGD, classifier lr x10, multi-step decay,
the WSOL stride change, N x S = 12 x 5) on

- ``wsol20``: Tiny-ImageNet-WSOL-20, 20 other classes whose objects are small (boxes 14-35 % of the
  image), the benchmark where localization matters; test = their 1,000 official val images;
- ``tiny5``: Tiny-ImageNet-5 (large objects), the main comparison only.

Every run selects its model on val MaxBoxAccV2 and reports the test split. Each finished run writes
its result row (metrics, curves, wall time, seed, config hash) to ``experiments/tiny-imagenet-wsol/
rows/``; a run whose row exists with the same config hash is skipped, so the study continues across
sessions and machines from what is committed (run folders stay in ``runs/``, out of git).

    python -m mmcam_fast.tiny_wsol gate            # the recipe gate (val only), see GATE
    python -m mmcam_fast.tiny_wsol study           # every run not done yet, then the report
    python -m mmcam_fast.tiny_wsol study --only main --benchmarks wsol20
    python -m mmcam_fast.tiny_wsol report          # the report from the committed rows
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mmcam_fast.config import preset
from mmcam_fast.data.converters import ensure_prepared, unpack_archive
from mmcam_fast.data.manifest import read_class_list
from mmcam_fast.data.splits import build_datasets
from mmcam_fast.engine import PRECISION_NAMES, resolve_amp
from mmcam_fast.errors import ConfigError
from mmcam_fast.experiments.execute import run_all
from mmcam_fast.experiments.plan import Run
from mmcam_fast.experiments.report import dispersion_of
from mmcam_fast.machine import describe
from mmcam_fast.run_folder import atomic_write_text

REPORT_DIR = Path("experiments/tiny-imagenet-wsol")
PRETRAINED_DIR = Path("experiments/pretrained")  # --pretrained-dir
BACKBONES = ("resnet18", "mobilenet_v2")
SEEDS = (0, 1, 2)
SWEEP_SEEDS = (0,)
DATA_CACHE = Path("runs/data")  # prepared benchmarks and the extracted archive (as `mmcam_fast.prepare`)
BATCH = 60  # images per batch, N x S, in every run (Table 4 changes S at this batch)


def pretrained_path(backbone: str, folder: Path | None = None) -> Path:
    return (folder or PRETRAINED_DIR) / f"{backbone}-172.pth"


@dataclass(frozen=True)
class Benchmark:
    """A fine-tuning data set: where its source is under the shared data folder, and how to convert it."""

    name: str
    source: str  # relative to the shared data folder
    class_list: str | None = None  # a --classes file beside the source
    groups: tuple[str, ...] = ("main",)  # which analyses run on it
    classes: int = 20  # N is at most this (N distinct classes per batch)

    def prepare(self, shared: Path | None, cache: Path) -> Path:
        if shared is None:
            raise ConfigError("--shared: the data folder is needed (or set MMCAM_SHARED_DATA)")
        src = shared / self.source
        if not src.exists():
            raise ConfigError(
                f"--shared {shared}: {self.source} not found (the project's data folder, "
                "with tiny-imagenet-192/ and tiny-imagenet-5/)"
            )
        options: dict[str, Any] = {}
        if self.class_list is not None:
            options["classes"] = read_class_list(src.parent / self.class_list)
        if src.is_file():  # an archive, extracted once beside the prepared folders
            src = unpack_archive(src, cache)
        return ensure_prepared("tiny-imagenet", src, cache / self.name, **options)


SWEEP_GROUPS = ("lambda_crr", "lambda_frr", "set_size", "masking")
BENCHMARKS = {
    "wsol20": Benchmark(
        "wsol20",
        "tiny-imagenet-192/tiny-imagenet-192.tar.gz",
        "wsol20.txt",
        groups=("main", *SWEEP_GROUPS),
    ),
    # five classes: N = 5 sets of S = 5 (batch 25), every class in every batch
    "tiny5": Benchmark("tiny5", "tiny-imagenet-5", classes=5),
}


@dataclass(frozen=True)
class Recipe:
    """The fine-tuning recipe every variant shares (config keys of ``mmcam_fast.train``)."""

    name: str
    lr: float
    epochs: int
    lr_milestones: tuple[int, ...]
    classifier_lr_mult: float = 10.0
    lr_gamma: float = 0.1
    weight_decay: float = 5e-4
    image_size: int = 64
    feature_stride: int = 8
    max_steps_per_epoch: int | None = None
    note: str = ""

    def flags(self) -> dict[str, Any]:
        flags = {k: v for k, v in asdict(self).items() if k not in ("name", "note") and v is not None}
        flags["lr_milestones"] = list(self.lr_milestones)
        return flags


# The recipes the gate tried (GATE), plain CAM on WSOL-20's val split, and the one the study uses.
GATE = {
    r.name: r
    for r in (
        Recipe("lr0.01-e4", lr=0.01, epochs=4, lr_milestones=(3,)),
        Recipe("lr0.001-e4", lr=0.001, epochs=4, lr_milestones=(3,)),
        Recipe("lr0.003-e4", lr=0.003, epochs=4, lr_milestones=(3,)),
        Recipe("lr0.01-e8", lr=0.01, epochs=8, lr_milestones=(6,)),
        Recipe("lr0.003-e8", lr=0.003, epochs=8, lr_milestones=(6,)),
        Recipe("lr0.03-e4", lr=0.03, epochs=4, lr_milestones=(3,)),
        # where the stride change happens: layer4 only (stride 16, 4x4 maps at 64 px)
        Recipe("lr0.01-e4-s16", lr=0.01, epochs=4, lr_milestones=(3,), feature_stride=16),
        # input resolution: 96 px (12x12 maps at stride 8), 2.3x the cost per step
        Recipe("lr0.01-e3-r96", lr=0.01, epochs=3, lr_milestones=(2,), image_size=96),
    )
}
# The study's recipe: the gate's best on val (MaxBoxAccV2 25.0 against 23.0 for lr0.01-e4 at 64 px,
# 22.2 for the centred Gaussian; 200 val images, one seed), 1.3x the wall time of lr0.01-e4 per run.
# It does not pass the gate's +10 (docs/results.md says so and why).
RECIPE = GATE["lr0.01-e3-r96"]
# The sweeps' recipe: the study's, cut to 2 x 80 steps (160 of its ~489; about one pass over WSOL-20's
# train split, lr 0.01 then 0.001): the 20 sweep runs cost about a third of as many main runs (the
# whole study still exceeds its 4 h target; docs/results.md has the figures). The ResNet18 main runs'
# val MaxBoxAccV2 after their first epoch (163 steps) is already 22.5-26.5, against 24.3-26.5 at their
# best. Each sweep has its own reference points (plain CAM and the paper's lambdas) at this recipe.
SWEEP_RECIPE = replace(
    RECIPE,
    name="lr0.01-e2x80-r96",
    epochs=2,
    lr_milestones=(1,),
    max_steps_per_epoch=80,
    note="sweeps: the study's recipe cut to 160 steps",
)
# Table 4 (S) and Table 3 (masking) on ResNet18 only; Fig. 6 (the lambdas) on both backbones.
TABLE_BACKBONES = ("resnet18",)


@dataclass(frozen=True)
class Variant:
    """One setting of the method on top of the recipe."""

    name: str
    groups: tuple[str, ...]
    lambda_crr: float
    lambda_frr: float
    set_size: int = 5
    stage2_mask: str = "image"

    def flags(self) -> dict[str, Any]:
        return {
            "lambda_crr": self.lambda_crr,
            "lambda_frr": self.lambda_frr,
            "set_size": self.set_size,
            "sets_per_batch": BATCH // self.set_size,
            "stage2_mask": self.stage2_mask,
        }


def paper_lambdas(backbone: str) -> tuple[float, float]:
    """The paper's (lambda_crr, lambda_frr) for the backbone: the project's preset."""
    values = preset("tiny-imagenet", backbone)
    return float(values["lambda_crr"]), float(values["lambda_frr"])


def variants_for(backbone: str) -> list[Variant]:
    """Plain CAM, MinMaxCAM at the paper's lambdas, and the sweeps (one thing changed at a time).

    A sweep point equal to the paper's setting is the ``minmaxcam`` variant itself (not run twice).
    """
    crr, frr = paper_lambdas(backbone)
    tables = ("set_size", "masking") if backbone in TABLE_BACKBONES else ()
    sweeps = ("lambda_crr", "lambda_frr", *tables)
    paper = Variant("minmaxcam", ("main", *sweeps), crr, frr)
    variants = [Variant("cam", ("main", *sweeps), 0.0, 0.0), paper]
    for value in (0.0, 0.1, 1.0, 10.0):
        if value != crr:
            variants.append(Variant(f"crr{value:g}", ("lambda_crr",), value, frr))
    for value in (0.0, 0.1, 1.0, 10.0):
        if value != frr:
            variants.append(Variant(f"frr{value:g}", ("lambda_frr",), crr, value))
    if tables:
        for size in (2, 3, 4):
            variants.append(Variant(f"S{size}", ("set_size",), crr, frr, set_size=size))
        variants.append(Variant("feature_mask", ("masking",), crr, frr, stage2_mask="feature"))
    return variants


GROUPS = ("main", *SWEEP_GROUPS)


def run_key(benchmark: str, backbone: str, variant: str, seed: int, main: bool = True) -> str:
    """The row name of a study run; sweep runs (at ``SWEEP_RECIPE``) carry ``-sweep``."""
    sweep = "" if main else "-sweep"
    return f"{benchmark}-{backbone}-{variant}{sweep}-seed{seed}"


@dataclass(frozen=True)
class StudyRun:
    """One fine-tuning run of the study; ``key`` names its row."""

    benchmark: str
    backbone: str
    variant: Variant
    seed: int
    recipe: Recipe
    groups: tuple[str, ...] = field(default=())
    pretrained_dir: Path | None = None

    @property
    def key(self) -> str:
        if self.groups == ("gate",):  # the gate's runs differ in their recipe only
            return f"{self.benchmark}-{self.backbone}-{self.variant.name}-{self.recipe.name}"
        return run_key(self.benchmark, self.backbone, self.variant.name, self.seed, "main" in self.groups)

    def flags(self, data_root: Path | None = None) -> dict[str, Any]:
        flags: dict[str, Any] = {
            "data": "tiny-imagenet",
            "backbone": self.backbone,
            "seed": self.seed,
            "recipe": "paper",
            "pretrained": str(pretrained_path(self.backbone, self.pretrained_dir)),
            "loader": "torch",
            "workers": 0,
            "log_every": 10,
            "eval_every": 1,
        }
        flags.update(self.recipe.flags())
        flags.update(self.variant.flags())
        flags["sets_per_batch"] = min(flags["sets_per_batch"], BENCHMARKS[self.benchmark].classes)
        if data_root is not None:
            flags["data_root"] = str(data_root)
        return flags

    def config_hash(self) -> str:
        """What the result depends on: every flag but the machine's paths, and the weights' sha256."""
        flags = self.flags()
        flags["pretrained"] = pretrained_sha256(self.backbone, self.pretrained_dir)
        flags["benchmark"] = self.benchmark
        text = json.dumps(flags, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def pretrained_sha256(backbone: str, folder: Path | None = None) -> str:
    path = pretrained_path(backbone, folder)
    record = path.with_name(path.name + ".sha256")
    if not record.is_file():
        raise ConfigError(f"{record}: missing; the pretrained weights are built by `make pretrain`")
    return record.read_text().split()[0]


def build_plan(
    benchmarks: list[str],
    backbones: list[str],
    groups: list[str],
    recipe: Recipe = RECIPE,
    seeds: tuple[int, ...] = SEEDS,
    sweep_seeds: tuple[int, ...] = SWEEP_SEEDS,
    pretrained_dir: Path | None = None,
    sweep_recipe: Recipe = SWEEP_RECIPE,
) -> list[StudyRun]:
    """The study's runs in order of the analyses: 3 seeds for ``main`` at ``recipe``, one seed for the
    sweeps at ``sweep_recipe`` (a run in several sweeps, such as their reference points, runs once)."""
    runs: dict[str, StudyRun] = {}
    for group in GROUPS:
        if group not in groups:
            continue
        for benchmark in benchmarks:
            if group not in BENCHMARKS[benchmark].groups:
                continue
            for backbone in backbones:
                for variant in variants_for(backbone):
                    if group not in variant.groups:
                        continue
                    main = group == "main"
                    for seed in seeds if main else sweep_seeds:
                        run = StudyRun(
                            benchmark,
                            backbone,
                            variant,
                            seed,
                            recipe if main else sweep_recipe,
                            groups=(group,),
                            pretrained_dir=pretrained_dir,
                        )
                        previous = runs.get(run.key)
                        runs[run.key] = replace(run, groups=(*(previous.groups if previous else ()), group))
    return list(runs.values())


def row_path(report_dir: Path, key: str) -> Path:
    return report_dir / "rows" / f"{key}.json"


def read_row(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _subsample(rows: list[dict[str, Any]], keys: tuple[str, ...], every: int) -> list[dict[str, Any]]:
    return [
        {k: round(r[k], 5) if isinstance(r.get(k), float) else r.get(k) for k in keys if k in r}
        for i, r in enumerate(rows)
        if r.get("step", 0) % every == 0 or i == len(rows) - 1
    ]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_row(
    run: StudyRun, folder: Path, wall_s: float | None, dispersion: dict[str, Any] | None, kind: str = "study"
) -> dict[str, Any]:
    """A finished run's result row: the test metrics of the model selected on val, curves, provenance."""
    final = json.loads((folder / "final_metrics.json").read_text())
    if final.get("wall_s") is not None:  # the run's own clock, summed over processes when it was resumed
        wall_s = max(wall_s or 0.0, float(final["wall_s"]))  # the process's own also counts start-up
    history = final["val_history"]
    best = max(history, key=lambda h: h["maxboxacc_v2"]) if history else None
    row: dict[str, Any] = {
        "key": run.key,
        "kind": kind,
        "benchmark": run.benchmark,
        "backbone": run.backbone,
        "variant": run.variant.name,
        "groups": list(run.groups),
        "seed": run.seed,
        "lambda_crr": run.variant.lambda_crr,
        "lambda_frr": run.variant.lambda_frr,
        "set_size": run.variant.set_size,
        "stage2_mask": run.variant.stage2_mask,
        "recipe": asdict(run.recipe),
        "config_hash": run.config_hash(),
        "flags": run.flags(),
        "val_best": best,
        "val_history": history,
        "train_curve": _subsample(
            _jsonl(folder / "metrics.jsonl"), ("step", "epoch", "lr", "ce", "acc", "crr", "frr"), 10
        ),
        "wall_s": None if wall_s is None else round(wall_s, 1),
        "machine": describe(),
        "resumed_at": final.get("resumed_at", []),
        "precision": final.get("precision"),  # --amp auto: bf16 where the CPU has it, else fp32
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if kind == "study":
        row["test"] = final["test"]
    if dispersion is not None:
        row["dispersion"] = dispersion
    return row


def _note(message: str) -> None:
    print(f"mmcam_fast.tiny_wsol: {message}", file=sys.stderr, flush=True)


def execute(
    runs: list[StudyRun],
    *,
    shared: Path,
    out: Path,
    report_dir: Path,
    jobs: int,
    kind: str = "study",
    dispersion_groups: tuple[str, ...] = ("main",),
) -> None:
    """Train every run whose row is missing or stale, writing each row as its run finishes."""
    todo = []
    for run in runs:
        done_folder = _folder(out, run)
        if (done_folder / "final_metrics.json").is_file() and read_row(row_path(report_dir, run.key)) is None:
            # trained, but the row was not written (stopped in between): write it now
            wall = done_folder / "wall_time.txt"
            _write_row(
                run,
                Run(run.key, run.seed, done_folder, {}),
                float(wall.read_text()) if wall.is_file() else None,
                report_dir,
                kind,
                dispersion_groups,
                shared,
                out,
            )
        row = read_row(row_path(report_dir, run.key))
        if row is not None and row.get("config_hash") == run.config_hash():
            continue
        if row is not None:
            _note(f"{run.key}: its row is of another configuration ({row.get('config_hash')}); rerunning")
        todo.append(run)
    _note(f"{len(runs) - len(todo)} of {len(runs)} run(s) already have their rows; {len(todo)} to go")
    here = PRECISION_NAMES[resolve_amp("auto", "cpu")]
    for run in todo:  # a main pair split over machines of different bf16 support is no longer paired
        other = {"cam": "minmaxcam", "minmaxcam": "cam"}.get(run.variant.name)
        if other is None or "main" not in run.groups:
            continue
        partner = read_row(row_path(report_dir, run_key(run.benchmark, run.backbone, other, run.seed)))
        if partner and partner.get("precision") not in (None, here):
            _note(
                f"warning: {run.key} runs in {here} here, its pair {partner['key']} ran in "
                f"{partner['precision']} ({partner['machine']}); the report flags the pair"
            )
    if not todo:
        return
    roots = {name: BENCHMARKS[name].prepare(shared, DATA_CACHE) for name in {r.benchmark for r in todo}}
    by_folder: dict[str, StudyRun] = {}
    plan_runs = []
    for run in todo:
        folder = _folder(out, run)
        by_folder[str(folder)] = run
        plan_runs.append(Run(run.key, run.seed, folder, run.flags(roots[run.benchmark])))

    def finished(plan_run: Run, wall_s: float) -> None:
        _write_row(
            by_folder[str(plan_run.folder)],
            plan_run,
            wall_s,
            report_dir,
            kind,
            dispersion_groups,
            shared,
            out,
        )

    run_all(plan_runs, jobs, note=_note, on_done=finished)


def run_folder(out: Path, benchmark: str, backbone: str, key: str, config_hash: str) -> Path:
    """Where a study run trains: ``<out>/<benchmark>/<backbone>/<key>-<config hash>``."""
    return out / benchmark / backbone / f"{key}-{config_hash}"


def _folder(out: Path, run: StudyRun) -> Path:
    return run_folder(out, run.benchmark, run.backbone, run.key, run.config_hash())


_TESTS: dict[str, Any] = {}


def _write_row(
    run: StudyRun,
    plan_run: Run,
    wall_s: float | None,
    report_dir: Path,
    kind: str,
    dispersion_groups: tuple[str, ...],
    shared: Path,
    out: Path,
) -> None:
    """The run's row, with the Sec. 4.3 dispersion analysis on the test split for ``dispersion_groups``."""
    result = None
    if kind == "study" and set(run.groups) & set(dispersion_groups):
        if run.benchmark not in _TESTS:
            root = BENCHMARKS[run.benchmark].prepare(shared, DATA_CACHE)
            _TESTS[run.benchmark] = build_datasets(
                "tiny-imagenet", root, image_size=run.recipe.image_size
            ).test
        result = dispersion_of(plan_run, _TESTS[run.benchmark])
    row = make_row(run, plan_run.folder, wall_s, result, kind)
    path = row_path(report_dir, run.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(row, indent=1) + "\n")
    _note(f"row {path}")


def gate_runs(names: list[str], backbone: str, pretrained_dir: Path | None = None) -> list[StudyRun]:
    unknown = sorted(set(names) - set(GATE))
    if unknown:
        raise ConfigError(f"--recipes: unknown {', '.join(unknown)}; known: {', '.join(GATE)}")
    cam = Variant("cam", ("gate",), 0.0, 0.0)
    return [
        StudyRun("wsol20", backbone, cam, 0, GATE[name], groups=("gate",), pretrained_dir=pretrained_dir)
        for name in names
    ]
