"""Running the plan: training processes side by side, one core each, resumable.

Each run is ``python -m mmcam_fast.train --config <run>/experiment.yaml --resume auto`` in its own
process with one intra-op thread (small convolutions at 64 px scale poorly over threads; separate
runs on separate cores scale fully). A run whose ``final_metrics.json`` exists is skipped, and an
interrupted one continues from its last checkpoint, so the whole study can be stopped and
restarted. Pretraining runs go first: every variant starts from its seed's pretrained checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import yaml

from mmcam_fast.errors import ConfigError, RunFailed
from mmcam_fast.evaluation.parallel import available_cores
from mmcam_fast.experiments.plan import Run

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def _command(run: Run) -> list[str]:
    run.folder.mkdir(parents=True, exist_ok=True)
    config = run.folder / "experiment.yaml"
    config.write_text(yaml.safe_dump({**run.flags, "out": str(run.folder)}, sort_keys=False))
    return [sys.executable, "-m", "mmcam_fast.train", "--config", str(config), "--resume", "auto"]


def _start(run: Run, threads: int) -> subprocess.Popen:
    env = {**os.environ, **dict.fromkeys(_THREAD_VARIABLES, str(threads))}
    command = _command(run)
    with (run.folder / "train.log").open("a") as log:  # the child keeps its own copy of the handle
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def add_jobs_flag(parser) -> None:
    """``--jobs``, the training processes a study runs at once (see :func:`resolve_jobs`)."""
    parser.add_argument("--jobs", type=int, default=None,
                        help="training processes at once, one core each (default: one per available core)")


def resolve_jobs(jobs: int | None) -> int:
    """``--jobs``: at least 1; None is one per core this process may use."""
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    return jobs or available_cores()


def run_all(runs: list[Run], jobs: int, threads: int = 1, note=print,
            on_done: Callable[[Run, float], None] | None = None) -> dict[str, float]:
    """Run every run not done yet, ``jobs`` at a time; returns wall seconds per run folder.

    ``on_done(run, wall_s)`` is called as each run finishes successfully (while the others go on).

    A study stopped by SIGTERM or Ctrl-C stops its training processes with it (each continues from
    its last checkpoint when the study is started again), rather than leaving them running unwatched.

    Raises:
        RunFailed: a run failed (its ``train.log`` names the error); the others finish first. The
            study's entry point reports it in one line, naming the logs.
        SystemExit: 143 on SIGTERM, after the training processes are stopped.
    """
    active: list[tuple[Run, subprocess.Popen, float]] = []
    main = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _raise_exit) if main else None
    try:
        return _run_all(runs, jobs, threads, note, on_done, active)
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        _stop(active, note)


def _raise_exit(signum, _frame):
    raise SystemExit(128 + signum)


def _stop(active: list[tuple[Run, subprocess.Popen, float]], note) -> None:
    """Stop the training processes still running (an interrupted study); they resume when restarted."""
    running = [(run, process) for run, process, _ in active if process.poll() is None]
    for _, process in running:
        process.terminate()
    for run, process in running:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        note(f"stopped {run.folder}; it continues from its last checkpoint when the study is started again")


def _run_all(runs: list[Run], jobs: int, threads: int, note, on_done,
             active: list[tuple[Run, subprocess.Popen, float]]) -> dict[str, float]:
    pending = deque(run for run in runs if not run.done)
    skipped = len(runs) - len(pending)
    if skipped:
        note(f"{skipped} run(s) already done, {len(pending)} to go")
    walls: dict[str, float] = {}
    failed: list[Run] = []
    while pending or active:
        while pending and len(active) < jobs:
            run = pending.popleft()
            if run.after is not None and not run.after.is_file():
                failed.append(run)
                note(f"{run.folder}: its starting checkpoint {run.after} is missing")
                continue
            note(f"start {run.folder}")
            active.append((run, _start(run, threads), time.perf_counter()))
        time.sleep(1.0)
        still = []
        for run, process, began in active:
            code = process.poll()
            if code is None:
                still.append((run, process, began))
                continue
            walls[str(run.folder)] = time.perf_counter() - began
            record_walls({str(run.folder): walls[str(run.folder)]})  # at once: a stopped study keeps it
            if code != 0 or not run.done:
                failed.append(run)
                note(f"FAILED {run.folder} (exit {code}); see {run.folder / 'train.log'}")
            else:
                note(f"done  {run.folder} in {walls[str(run.folder)]:.0f} s")
                if on_done is not None:
                    on_done(run, walls[str(run.folder)])
        active[:] = still  # the caller's list: what is still running when the study is stopped
    if failed:
        raise RunFailed("failed runs (see each folder's train.log): "
                        + ", ".join(str(r.folder) for r in failed))
    return walls


def record_walls(walls: dict[str, float]) -> None:
    """Add each run's wall time to its folder (``wall_time.txt``), for the report."""
    for folder, seconds in walls.items():
        (Path(folder) / "wall_time.txt").write_text(f"{seconds:.1f}\n")
