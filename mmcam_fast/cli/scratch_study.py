"""``python -m mmcam_fast.scratch_study`` (``mmcam-scratch-study``): the paper's claims in miniature
on Tiny-ImageNet-5 at 64 px.

Trains ResNet18-CAM from scratch: per seed, one Stage I pretraining (plain CAM), then every variant
of the study fine-tuned from it (see :mod:`mmcam_fast.experiments.plan`); evaluates each on the test
split with the protocol (model selected on val by MaxBoxAccV2); writes the report (tables and plots)
to ``--report-dir``. Runs go to ``--out`` and are skipped when finished, so an interrupted study
continues where it stopped; ``--report-only`` rebuilds the report from the finished runs.

    python -m mmcam_fast.scratch_study                        # the whole study, docs/results.md figures
    python -m mmcam_fast.scratch_study --only main --seeds 0  # plain CAM vs MinMaxCAM, one seed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mmcam_fast.cli import ArgumentParser, console_entry, folder_value, int_at_least, seed_value
from mmcam_fast.data.converters import ensure_prepared
from mmcam_fast.data.splits import build_datasets
from mmcam_fast.errors import ConfigError
from mmcam_fast.experiments import report
from mmcam_fast.experiments.execute import add_jobs_flag, resolve_jobs, run_all
from mmcam_fast.experiments.plan import IMAGE_SIZE, Schedule, build_plan, select_variants


def _note(message: str) -> None:
    print(f"mmcam_fast.scratch_study: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="mmcam_fast.scratch_study", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True,
                        help="the raw Tiny-ImageNet-5 folder (`make experiments` passes "
                             "$(SHARED_DATA)/tiny-imagenet-5)")
    parser.add_argument("--out", type=folder_value, default=Path("runs/experiments"), help="run folders")
    parser.add_argument("--report-dir", type=folder_value, default=Path("experiments/tiny-imagenet-5"),
                        help="tables and plots (docs/results.md shows this folder's files)")
    parser.add_argument("--seeds", type=seed_value, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="*", default=None,
                        help="variants or groups (main, lambda_crr, lambda_frr, set_size, masking)")
    parser.add_argument("--pretrain-epochs", type=int, default=Schedule.pretrain_epochs)
    parser.add_argument("--epochs", type=int, default=Schedule.epochs, help="fine-tuning epochs per variant")
    parser.add_argument("--max-steps-per-epoch", type=int_at_least(1), default=None,
                        help="cut epochs (smoke runs)")
    add_jobs_flag(parser)
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report")
    parser.add_argument("--no-dispersion", action="store_true", help="skip the dispersion analysis")
    parser.add_argument("--overlay-images", type=int, default=8)
    args = parser.parse_args(argv)
    if args.pretrain_epochs < 1 or args.epochs < 2:
        raise ConfigError("--pretrain-epochs must be >= 1 and --epochs >= 2 (the last epoch runs at lr / 10)")
    args.jobs = resolve_jobs(args.jobs)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        variants = select_variants(args.only)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    schedule = Schedule(pretrain_epochs=args.pretrain_epochs, epochs=args.epochs,
                        max_steps_per_epoch=args.max_steps_per_epoch)
    if not args.src.is_dir():
        raise ConfigError(f"--src {args.src}: folder not found (the raw Tiny-ImageNet-5 folder)")
    # converted once here, before the training processes start (they would race on the cache)
    data_root = ensure_prepared("tiny-imagenet", args.src, args.out / "data")
    pretrain, runs = build_plan(args.out, data_root, args.seeds, schedule, variants)
    jobs = args.jobs
    began = time.perf_counter()
    if not args.report_only:
        for stage in (pretrain, runs):
            run_all(stage, jobs, note=_note)

    args.report_dir.mkdir(parents=True, exist_ok=True)
    test = build_datasets("tiny-imagenet", data_root, image_size=IMAGE_SIZE).test  # every run's test split
    rows = report.collect(runs, None if args.no_dispersion else test)
    if not rows:
        raise ConfigError(f"{args.out}: no finished run to report")
    summary = report.summarize(rows)
    report.write_csv(args.report_dir / "results.csv", rows)
    report.write_csv(args.report_dir / "summary.csv", summary)
    table = report.markdown_table(summary)
    (args.report_dir / "summary.md").write_text(table)
    report.plot_curves(runs, pretrain, args.report_dir / "curves.png")
    prior = report.centre_prior(test.metadata)
    report.plot_sweeps(summary, args.report_dir / "sweeps.png", prior)
    seed = args.seeds[0]
    pair = [r for r in runs if r.seed == seed and r.name in ("cam", "minmaxcam") and r.done]
    if len(pair) == 2 and args.overlay_images > 0:
        cam_run, minmax_run = sorted(pair, key=lambda r: r.name != "cam")
        report.plot_overlays(cam_run, minmax_run, test, args.report_dir / "overlays.png",
                             args.overlay_images)
    study_wall = time.perf_counter() - began
    walls = [float((r.folder / "wall_time.txt").read_text()) for r in pretrain + runs
             if (r.folder / "wall_time.txt").is_file()]
    record = args.report_dir / "study.json"
    info = {"seeds": args.seeds, "schedule": vars(schedule), "runs": len(rows), "jobs": jobs,
            "sum_of_run_walls_s": round(sum(walls), 1), "centre_prior": prior}
    if not args.report_only:
        info["study_wall_s"] = round(study_wall, 1)  # training and report, this invocation
    elif record.is_file():  # a rebuilt report keeps the wall time of the study that trained
        info["study_wall_s"] = json.loads(record.read_text()).get("study_wall_s")
    record.write_text(json.dumps(info, indent=2) + "\n")
    print(table)
    print(json.dumps(info))


cli = console_entry(main, "mmcam-scratch-study")
