"""``python -m mmcam_fast.tiny_wsol`` (``mmcam-tiny-wsol``): the pretrained-backbone study
of :mod:`mmcam_fast.experiments.tiny_wsol_study` (gate, study, report)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from mmcam_fast.cli import ArgumentParser, console_entry, folder_value, int_at_least, seed_value
from mmcam_fast.errors import ConfigError
from mmcam_fast.experiments import tiny_wsol_report
from mmcam_fast.experiments import tiny_wsol_study as study
from mmcam_fast.experiments.execute import add_jobs_flag, resolve_jobs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="mmcam_fast.tiny_wsol",
        description=study.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=("gate", "study", "report"))
    parser.add_argument(
        "--shared",
        type=Path,
        default=Path(os.environ["MMCAM_SHARED_DATA"]) if os.environ.get("MMCAM_SHARED_DATA") else None,
        help="the data folder holding tiny-imagenet-192/ and tiny-imagenet-5/ (default: $MMCAM_SHARED_DATA; "
        "`make experiments` passes it)",
    )
    parser.add_argument("--out", type=folder_value, default=Path("runs/tiny-wsol"),
                        help="run folders and data")
    parser.add_argument(
        "--report-dir", type=folder_value, default=study.REPORT_DIR, help="result rows and the report"
    )
    parser.add_argument(
        "--benchmarks", nargs="+", default=list(study.BENCHMARKS), choices=list(study.BENCHMARKS)
    )
    parser.add_argument(
        "--backbones", nargs="+", default=list(study.BACKBONES), choices=list(study.BACKBONES)
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=list(study.GROUPS),
        choices=list(study.GROUPS),
        help="analyses to run (default: all)",
    )
    parser.add_argument("--recipes", nargs="+", default=list(study.GATE), help="gate: the recipes to try")
    parser.add_argument(
        "--pretrained-dir",
        type=Path,
        default=study.PRETRAINED_DIR,
        help="where <backbone>-172.pth and its .sha256 are",
    )
    parser.add_argument(
        "--seeds", type=seed_value, nargs="+", default=list(study.SEEDS), help="seeds of the main comparison"
    )
    parser.add_argument("--sweep-seeds", type=seed_value, nargs="+", default=list(study.SWEEP_SEEDS))
    smoke = parser.add_argument_group("cut-down runs (tests; their rows carry another config hash)")
    smoke.add_argument("--epochs", type=int_at_least(1), default=None, help="instead of the recipe's")
    smoke.add_argument("--max-steps-per-epoch", type=int_at_least(1), default=None)
    add_jobs_flag(parser)
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done")
    args = parser.parse_args(argv)
    if args.shared is None and args.action != "report":
        raise ConfigError("--shared: the data folder is needed (or set MMCAM_SHARED_DATA)")
    if args.shared is not None and not args.shared.is_dir():
        raise ConfigError(f"--shared {args.shared}: not a folder (expected the project's data folder, "
                          "with tiny-imagenet-192/ and tiny-imagenet-5/)")
    args.jobs = resolve_jobs(args.jobs)
    return args


def _cut(recipe: study.Recipe, epochs: int | None, max_steps: int | None) -> study.Recipe:
    """A cut-down copy of a recipe (tests, smoke runs): another name, so another config hash."""
    epochs = epochs or recipe.epochs
    return replace(
        recipe,
        name=f"{recipe.name}-cut",
        epochs=epochs,
        lr_milestones=tuple(m for m in recipe.lr_milestones if m < epochs) or (max(1, epochs - 1),),
        max_steps_per_epoch=max_steps if max_steps is not None else recipe.max_steps_per_epoch,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    jobs = args.jobs
    recipe, sweep_recipe = study.RECIPE, study.SWEEP_RECIPE
    if args.epochs is not None or args.max_steps_per_epoch is not None:
        recipe, sweep_recipe = (
            _cut(r, args.epochs, args.max_steps_per_epoch) for r in (recipe, sweep_recipe)
        )
    if args.action == "gate":
        runs = [
            run
            for backbone in args.backbones
            for run in study.gate_runs(args.recipes, backbone, args.pretrained_dir)
        ]
        report_dir = args.report_dir / "gate"
    else:
        runs = study.build_plan(
            args.benchmarks,
            args.backbones,
            args.only,
            recipe,
            tuple(args.seeds),
            tuple(args.sweep_seeds),
            args.pretrained_dir,
            sweep_recipe,
        )
        report_dir = args.report_dir
    if args.dry_run:
        for run in runs:
            row = study.read_row(study.row_path(report_dir, run.key))
            state = "done" if row and row.get("config_hash") == run.config_hash() else "to run"
            print(f"{run.key:48s} {','.join(run.groups):32s} {state}")
        return
    if args.action != "report":
        study.execute(
            runs,
            shared=args.shared,
            out=args.out,
            report_dir=report_dir,
            jobs=jobs,
            kind="gate" if args.action == "gate" else "study",
        )

    def prepare(name: str) -> Path:
        return study.BENCHMARKS[name].prepare(args.shared, study.DATA_CACHE)

    tiny_wsol_report.write_report(args.report_dir, prepare, args.out)


cli = console_entry(main, "mmcam-tiny-wsol")
