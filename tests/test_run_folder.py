"""Run folders never lose work: refusal of an --out that holds a run, the lock against a second process,
logs that hold every step once after a kill (between steps, mid-checkpoint, mid-log-flush, before the
first checkpoint) and a resume, and a no-op resume that keeps the final metrics.

Killed runs die by ``os._exit`` at a chosen point (a monkeypatch in the child process, so the library
carries no test hooks): no ``finally`` block, no atexit handler, no buffered write runs, as with SIGKILL.
Subprocesses run with one thread: the same thread count in every run keeps CPU results bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mmcam_fast.data.synthetic import make_synthetic
from mmcam_fast.errors import ConfigError
from mmcam_fast.run_folder import LOCK_FILE, RunLock, check_output_folder, keep_lines, open_run_folder

STEPS_PER_EPOCH = 3
FLAGS = ["--data", "synthetic", "--backbone", "resnet18", "--feature-stride", "16", "--image-size", "32",
         "--epochs", "2", "--max-steps-per-epoch", str(STEPS_PER_EPOCH), "--sets-per-batch", "2",
         "--set-size", "3", "--impl", "reference", "--loader", "torch", "--workers", "0", "--log-every", "2",
         "--checkpoint-every", "2"]

# The child: patch one function so that its n-th call dies at the named point, then train.
_CHILD = textwrap.dedent("""
    import os, sys
    point, n = sys.argv[1], int(sys.argv[2])
    import mmcam_fast.training as training
    from mmcam_fast.engine import Trainer
    from mmcam_fast.metric_log import MetricLog
    calls = {"n": 0}

    def due():
        calls["n"] += 1
        return calls["n"] == n

    if point == "step":
        original_step = Trainer.train_step
        def train_step(self, *args, **kwargs):
            out = original_step(self, *args, **kwargs)
            if due():
                os._exit(137)
            return out
        Trainer.train_step = train_step
    elif point == "flush":
        original_flush = MetricLog.flush
        def flush(self):
            if self._pending and self.path is not None and due():
                with self.path.open("a") as handle:  # half a line, then death
                    handle.write('{"step": 99, "ep')
                os._exit(137)
            return original_flush(self)
        MetricLog.flush = flush
    elif point == "checkpoint":
        original_save = training.atomic_save
        def atomic_save(obj, path):
            if due():
                from pathlib import Path
                Path(path).parent.joinpath("." + Path(path).name + ".dead.tmp").write_bytes(b"PK\\x03\\x04")
                os._exit(137)
            return original_save(obj, path)
        training.atomic_save = atomic_save
    from mmcam_fast.cli.train import cli
    sys.argv = ["mmcam-train", *sys.argv[3:]]
    cli()
""")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(out: Path, data_root: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mmcam_fast.train", *FLAGS, "--data-root", str(data_root),
               "--out", str(out)]
    result = subprocess.run([*command, *extra], env=_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _killed(out: Path, data_root: Path, point: str, n: int) -> None:
    command = [sys.executable, "-c", _CHILD, point, str(n), *FLAGS, "--data-root", str(data_root),
               "--out", str(out)]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 137, result.stderr[-3000:]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic(tmp_path_factory.getbasetemp() / "synthetic-shared")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("whole") / "run"
    _train(out, data_root)
    return out


def _same_as_uninterrupted(run: Path, uninterrupted: Path) -> None:
    for name in ("metrics.jsonl", "val_metrics.jsonl"):
        assert (run / name).read_text() == (uninterrupted / name).read_text(), name
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    ours = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]
    theirs = torch.load(uninterrupted / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    final = json.loads((run / "final_metrics.json").read_text())
    expected = json.loads((uninterrupted / "final_metrics.json").read_text())
    assert final["test"] == expected["test"] and final["last_train"] == expected["last_train"]
    assert not list(run.rglob("*.tmp")) and not (run / LOCK_FILE).exists()


# (point, n): die at the n-th call. "step" 4: mid-epoch 2 after the step-4 checkpoint was written
# (step 4 is a --checkpoint-every step); "flush" 2: the second log flush (step 4), half a line written,
# before the step-4 checkpoint; "checkpoint" 3: writing the third checkpoint (end of epoch 1 is the
# second, then best.pt/last.pt at step 4); "step" 1: before any checkpoint (a fresh start).
@pytest.mark.parametrize("point,n", [("step", 4), ("flush", 2), ("checkpoint", 3), ("step", 1)])
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_run(point, n, tmp_path, data_root, uninterrupted):
    out = tmp_path / "run"
    _killed(out, data_root, point, n)
    assert (out / LOCK_FILE).exists()  # left by the dead process: a stale lock the resume takes over
    result = _train(out, data_root, "--resume", "auto")
    assert "stale lock" in result.stderr
    _same_as_uninterrupted(out, uninterrupted)


def test_a_run_into_a_folder_holding_a_run_is_refused_and_changes_nothing(tmp_path, data_root, uninterrupted):
    before = _digest(uninterrupted)
    result = _train(uninterrupted, data_root, check=False)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert str(uninterrupted) in line and "--resume" in line and "--overwrite" in line
    assert _digest(uninterrupted) == before


def test_a_no_op_resume_of_a_finished_run_keeps_its_final_metrics(tmp_path, data_root, uninterrupted):
    out = tmp_path / "copy"
    _train(out, data_root)
    before = json.loads((out / "final_metrics.json").read_text())
    assert before["last_train"]
    _train(out, data_root, "--resume", "auto")
    after = json.loads((out / "final_metrics.json").read_text())
    assert after["last_train"] == before["last_train"] and after["test"] == before["test"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))


def test_overwrite_starts_the_run_over(tmp_path, data_root, uninterrupted):
    out = tmp_path / "over"
    _train(out, data_root)
    (out / "notes.txt").write_text("the user's own file")
    _train(out, data_root, "--overwrite")
    _same_as_uninterrupted(out, uninterrupted)
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_a_second_process_into_the_same_folder_exits_2_naming_the_first(tmp_path, data_root):
    out = tmp_path / "busy"
    first = subprocess.Popen([sys.executable, "-m", "mmcam_fast.train", *FLAGS, "--data-root", str(data_root),
                              "--out", str(out), "--epochs", "3"], env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_FILE).exists() or not (out / LOCK_FILE).read_text():
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        second = _train(out, data_root, "--epochs", "3", "--resume", "auto", check=False)
        assert second.returncode == 2
        [line] = second.stderr.strip().splitlines()
        assert f"pid {first.pid}" in line and str(out) in line
    finally:
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    steps = [json.loads(row)["step"] for row in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 3 * STEPS_PER_EPOCH + 1))  # the first run's logs, untouched


def test_lock_is_exclusive_and_a_stale_one_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from mmcam_fast.run_folder import RunLock
        RunLock(Path({str(tmp_path)!r})).acquire()
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path).acquire()  # the dead holder's file is still there: stale
    assert lock.describe_stale() is not None and str(holder.pid) in lock.describe_stale()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_out_must_be_a_creatable_writable_folder(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="--out .*afile: is a file"):
        check_output_folder(afile)
    with pytest.raises(ConfigError, match="--out .*afile/below: cannot create"):
        check_output_folder(afile / "below")
    with pytest.raises(ConfigError, match="contradict"):
        open_run_folder(tmp_path / "x", resume="auto", overwrite=True)


def test_keep_lines_drops_a_line_cut_short(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "ce"')
    keep_lines(path, lambda row: row["step"] <= 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
