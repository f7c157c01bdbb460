"""benchmarks/gpu_check.py (``make gpu-check``) without a GPU: the dry run writes the JSON a GPU run
writes, with every CUDA-only part skipped with its reason; a stage that hangs, crashes or raises is
recorded and the next stage still runs; without CUDA and without --dry-run it is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402  (benchmarks/ is not a package)

KEYS = [stage.key for stage in gpu_check.STAGES]


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def check_schema(doc: dict, keys: list[str]) -> None:
    """The JSON a run writes (the same for the dry run and a GPU run)."""
    assert doc["schema"] == gpu_check.SCHEMA
    for key, kind in {"name": str, "dry_run": bool, "gpu": dict, "started": str, "command": list,
                      "budget_s": (int, float), "seconds": (int, float), "verdict": str, "exit_status": int,
                      "stages": list}.items():
        assert isinstance(doc[key], kind), (key, doc[key])
    assert doc["verdict"] in ("pass", "fail") and doc["exit_status"] in (0, 1)
    assert [s["key"] for s in doc["stages"]] == keys
    for stage in doc["stages"]:
        assert stage["status"] in gpu_check.STATUSES, stage
        assert stage["kind"] in ("correctness", "timing")
        for key, kind in {"title": str, "proves": str, "seconds": (int, float), "budget_s": (int, float),
                          "summary": str, "checks": list, "metrics": dict}.items():
            assert isinstance(stage[key], kind), (stage["key"], key)
        assert stage["seconds"] <= stage["budget_s"] + 5
        for check in stage["checks"]:
            assert check["status"] in gpu_check.CHECK_STATUSES and isinstance(check["name"], str)
            if check["status"] != "pass":
                assert check["detail"], f"stage {stage['key']}: {check['name']} {check['status']}, no reason"
        if stage["status"] in ("error", "timeout", "fail"):
            assert stage["error"] and stage["log_tail"] is not None


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    result = _run("--dry-run", "--out", str(out))
    doc = json.loads((out / "dry-run.json").read_text()) if (out / "dry-run.json").exists() else None
    return result, doc, out


@pytest.mark.slow
def test_dry_run_passes_with_one_verdict_line_per_stage(dry_run):
    result, doc, out = dry_run
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert [line.split()[0] for line in result.stdout.splitlines()] == KEYS
    check_schema(doc, KEYS)
    assert doc["dry_run"] and doc["name"] == "dry-run" and doc["verdict"] == "pass"
    assert all(s["status"] == "pass" for s in doc["stages"] if s["key"] != "d")  # d: skip without DALI
    assert (out / "dry-run.md").read_text().startswith("# GPU check: dry run")


@pytest.mark.slow
def test_dry_run_skips_what_needs_cuda_with_the_reason(dry_run):
    _, doc, _ = dry_run
    stages = {s["key"]: s for s in doc["stages"]}
    skipped = {(key, c["name"]): c["detail"] for key, s in stages.items() for c in s["checks"]
               if c["status"] == "skip"}
    assert "needs CUDA" in skipped[("a", "CUDA works")]
    assert "needs CUDA" in skipped[("c", "Stage II replayed from CUDA graphs")]
    assert "needs two CUDA GPUs" in skipped[("g", "NCCL")]
    if stages["d"]["status"] != "skip":
        assert "needs CUDA" in skipped[("d", "DALI 'mixed' (nvJPEG) decoding")]
    # the checks that do run on a CPU ran and passed
    passed = {(key, c["name"]) for key, s in stages.items() for c in s["checks"] if c["status"] == "pass"}
    assert ("f", "fast counts == reference counts") in passed
    assert any(key == "c" and name.startswith("fp32 ") for key, name in passed)
    assert any(key == "b" and name.startswith("tests/interpret/test_cam_mask.py") for key, name in passed)
    assert ("g", "gloo: identical weights on both ranks") in passed


@pytest.mark.slow
def test_dry_run_step_benchmark_rows(dry_run):
    _, doc, _ = dry_run
    e = next(s for s in doc["stages"] if s["key"] == "e")
    rows = e["metrics"]["rows"]
    maps = list(dict.fromkeys(r["map"] for r in rows))
    assert len(maps) == 2 and sum(r["default"] for r in rows) == len(rows) // 2  # both geometries
    for row in rows:
        assert row["status"] in ("ok", "skip", "fail") and row["step"] in ("MinMaxCAM", "CE")
        if row["engine"] == "fast + compile + CUDA graphs":
            assert row["status"] == "skip" and row["reason"] == "needs CUDA"
        elif row["status"] == "ok":
            assert row["s_per_step"] > 0 and row["images_per_s"] > 0 and "vs_reference" in row
            if row["step"] == "MinMaxCAM":
                assert row["in_ce_steps"] > 0 and row["ce_twin"] == f"{row['engine']} CE"
    measured = {(r["engine"], r["step"]) for r in rows if r["status"] == "ok"}
    assert {("reference", "MinMaxCAM"), ("reference", "CE"), ("fast eager", "MinMaxCAM"),
            ("fast eager", "CE")} <= measured


def test_a_hang_a_crash_and_an_error_are_recorded_and_the_next_stage_runs(tmp_path):
    result = _run("--dry-run", "--stages", "a,d,f", "--inject", "a=hang", "--inject", "d=crash",
                  "--budget", "a=6", "--out", str(tmp_path))
    assert result.returncode == 1, result.stderr
    doc = json.loads((tmp_path / "dry-run.json").read_text())
    check_schema(doc, ["a", "d", "f"])
    a, d, f = doc["stages"]
    assert a["status"] == "timeout" and "time limit of 6 s" in a["error"]
    assert d["status"] == "error" and "SIGABRT" in d["error"]
    assert f["status"] == "pass"
    assert (tmp_path / "dry-run.a.log").exists() and (tmp_path / "dry-run.d.log").exists()
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["a", "TIMEOUT"], ["d", "ERROR"], ["f", "PASS"]]


def test_a_slow_timing_stage_is_not_a_failure_but_an_exception_is(tmp_path):
    slow = _run("--dry-run", "--stages", "e", "--inject", "e=hang", "--budget", "e=4", "--out", str(tmp_path))
    assert slow.returncode == 0 and slow.stdout.split()[:2] == ["e", "TIMEOUT"], slow.stdout + slow.stderr
    raised = _run("--dry-run", "--stages", "e", "--inject", "e=error", "--out", str(tmp_path))
    assert raised.returncode == 1 and raised.stdout.split()[:2] == ["e", "ERROR"]
    doc = json.loads((tmp_path / "dry-run.json").read_text())
    assert doc["stages"][0]["error"] == "RuntimeError: injected error" and doc["stages"][0]["traceback"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_and_without_dry_run_one_line_and_exit_2(tmp_path):
    result = _run("--out", str(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "--dry-run" in result.stderr
    assert not list(tmp_path.iterdir())


def test_bad_arguments_are_one_line_and_exit_2():
    for args in (["--stages", "a,x"], ["--budget", "z=3"], ["--budget", "e"], ["--budget", "e=abc"],
                 ["--budget", "e=-5"], ["--time-scale", "-1"]):
        result = _run("--dry-run", *args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
