"""Exact resume: a run killed with SIGKILL mid-epoch and resumed ends bit-identical to an uninterrupted one.

Also the checkpoint helpers: atomic writes, the choice of ``--resume auto``, RNG states, and the
settings a resumed run may not change. Subprocesses run with one thread (``OMP_NUM_THREADS=1``):
the same thread count in every run keeps the CPU kernels' results bit-identical.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcam_fast.checkpoint import (
    atomic_save,
    latest_checkpoint,
    remove_partial,
    resolve_resume,
    restore_rng,
    rng_state,
)
from mmcam_fast.cli import run_main
from mmcam_fast.cli.train import main
from mmcam_fast.data.synthetic import make_synthetic
from mmcam_fast.errors import ConfigError

STEPS_PER_EPOCH = 4
KILL_AFTER_STEP = 6  # epoch 2 runs steps 5..8; with a checkpoint every step the kill lands mid-epoch
FLAGS = ["--data", "synthetic", "--backbone", "resnet18", "--feature-stride", "16", "--image-size", "32",
         "--epochs", "2", "--max-steps-per-epoch", str(STEPS_PER_EPOCH), "--sets-per-batch", "2",
         "--set-size", "3", "--impl", "reference", "--loader", "torch", "--workers", "0", "--log-every", "1",
         "--eval-every", "1", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return make_synthetic(tmp_path_factory.getbasetemp() / "synthetic-shared")


def _train_command(out: Path, data_root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mmcam_fast.train", *FLAGS, "--data-root", str(data_root),
            "--out", str(out), *extra]


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-4000:]
    return stderr


def _logged_steps(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _differences(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, synthetic_root):
    """An uninterrupted run, and the same run killed (SIGKILL) after step 6 and resumed: their folders
    and the resumed run's stderr."""
    root = tmp_path_factory.mktemp("resume")
    uninterrupted = _start(_train_command(root / "uninterrupted", synthetic_root))
    killed_dir = root / "killed"
    victim = _start(_train_command(killed_dir, synthetic_root))
    deadline = time.monotonic() + 240
    while _logged_steps(killed_dir / "metrics.jsonl") < KILL_AFTER_STEP:
        assert victim.poll() is None, f"the run ended before the kill: {victim.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "the run did not reach the step to kill it at"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)  # wherever it is: between steps or writing a checkpoint
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    stderr = _finish(_start(_train_command(killed_dir, synthetic_root, "--resume", "auto")))
    _finish(uninterrupted)
    return root / "uninterrupted", killed_dir, stderr


def test_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(killed_and_resumed):
    uninterrupted_dir, killed_dir, stderr = killed_and_resumed
    assert "resuming from" in stderr and "steps into the epoch" in stderr
    assert not list((killed_dir / "checkpoints").glob(".*.tmp"))

    expected = _load(uninterrupted_dir / "checkpoints" / "last.pt")
    resumed = _load(killed_dir / "checkpoints" / "last.pt")
    [resumed_at] = resumed["resumed_at"]
    assert KILL_AFTER_STEP - 1 <= resumed_at and resumed_at % STEPS_PER_EPOCH != 0, resumed_at
    assert resumed["step"] == expected["step"] == 2 * STEPS_PER_EPOCH
    assert _differences(resumed["model"], expected["model"]) == []
    momentum = [{i: s["momentum_buffer"] for i, s in c["optimizer"]["state"].items()}
                for c in (resumed, expected)]
    assert _differences(*momentum) == []
    for key in ("scheduler", "scaler", "nonfinite", "val_history", "best_score", "loader"):
        assert resumed[key] == expected[key], key
    # the logs are the uninterrupted run's: rows past the checkpoint were dropped, then written again
    for name in ("metrics.jsonl", "val_metrics.jsonl"):
        assert (killed_dir / name).read_text() == (uninterrupted_dir / name).read_text(), name


def test_resume_refuses_changed_settings_and_missing_files(killed_and_resumed, tmp_path, synthetic_root,
                                                           capsys):
    state = _load(killed_and_resumed[1] / "checkpoints" / "last.pt")
    flags = [*FLAGS, "--data-root", str(synthetic_root), "--out", str(tmp_path)]
    atomic_save(state, tmp_path / "checkpoints" / "last.pt")
    assert run_main(main, [*flags, "--resume", "auto", "--set-size", "4"]) == 2
    assert "set_size: 3 in the checkpoint, 4 now" in capsys.readouterr().err
    # a checkpoint taken mid-epoch by two processes cannot continue in one
    atomic_save({**state, "epoch": 1, "epoch_step": 1, "world_size": 2}, tmp_path / "checkpoints" / "last.pt")
    assert run_main(main, [*flags, "--resume", "auto"]) == 2
    assert "taken 1 steps into an epoch by 2 process(es), this run has 1" in capsys.readouterr().err
    assert run_main(main, [*flags, "--resume", str(tmp_path / "nope.pt")]) == 2
    assert f"--resume {tmp_path / 'nope.pt'}: file not found" in capsys.readouterr().err


def test_a_resumed_runs_wall_time_counts_earlier_processes(killed_and_resumed, tmp_path, synthetic_root):
    state = _load(killed_and_resumed[1] / "checkpoints" / "last.pt")  # the end of the run's last epoch
    assert 0 < state["elapsed_s"] < 300
    atomic_save({**state, "elapsed_s": 1000.0}, tmp_path / "checkpoints" / "last.pt")
    assert run_main(main, [*FLAGS, "--data-root", str(synthetic_root), "--out", str(tmp_path),
                           "--resume", "auto"]) == 0
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert 1000.0 < final["wall_s"] < 1300.0  # the 1,000 s before it, then its own test
    assert final["resumed_at"] == [*state["resumed_at"], state["step"]]


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((2,), float(step))}, "optimizer": {}, "scheduler": {}, "config": {},
            "step": step, "epoch": 0}


def test_resume_auto_picks_the_newest_complete_checkpoint(tmp_path):
    assert resolve_resume("auto", tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    atomic_save(_state(4), tmp_path / "best.pt")
    atomic_save(_state(7), tmp_path / "last.pt")
    assert latest_checkpoint(tmp_path) == tmp_path / "last.pt"
    (tmp_path / "newer.pt").write_bytes(b"not a checkpoint")  # unreadable: skipped
    (tmp_path / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # a killed save
    torch.save({"model": {}}, tmp_path / "weights.pt")  # readable, but not resumable
    assert resolve_resume("auto", tmp_path) == tmp_path / "last.pt"
    assert remove_partial(tmp_path) == [tmp_path / ".last.pt.x1y2.tmp"]
    atomic_save(_state(9), tmp_path / "best.pt")
    assert latest_checkpoint(tmp_path) == tmp_path / "best.pt"
    assert resolve_resume(str(tmp_path / "last.pt"), tmp_path) == tmp_path / "last.pt"
    with pytest.raises(ConfigError, match="--resume .*nope.pt: file not found"):
        resolve_resume(str(tmp_path / "nope.pt"), tmp_path)


def test_atomic_save_leaves_no_partial_file_when_writing_fails(tmp_path):
    atomic_save(_state(1), tmp_path / "last.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({**_state(2), "bad": Unpicklable()}, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert _load(tmp_path / "last.pt")["step"] == 1


def test_rng_state_round_trip():
    state = rng_state(torch.device("cpu"))
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state, torch.device("cpu"))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_metric_rows_survive_a_resume_in_step_order(tmp_path):
    """The JSON lines written before the checkpoint stay; the ones after it are dropped."""
    from mmcam_fast.run_folder import keep_lines

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)))
    keep_lines(path, lambda row: row["step"] <= 5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
