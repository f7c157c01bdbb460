"""benchmarks/cpu_layouts.py on a tiny case: every layout is timed and its table is written."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import cpu_layouts  # noqa: E402  (benchmarks/ is not a package)


def test_the_layout_benchmark_measures_each_engine_and_writes_its_table(tmp_path, monkeypatch):
    bench = cpu_layouts.bench
    monkeypatch.setattr(bench, "CASES", {"tiny": ("resnet18", 32, 2)})
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(cpu_layouts, "ROUNDS", 1)
    monkeypatch.setattr(bench, "IMPLS", dict(bench.IMPLS))  # measure() adds the layouts to it
    threads = torch.get_num_threads()
    try:
        rows = cpu_layouts.main(["tiny", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert [r["impl"] for r in rows] == list(cpu_layouts.LAYOUTS)
    assert all(r["step_s"] > 0 and 0 < r["conv_share"] for r in rows)
    assert {r["impl"] for r in rows if r["in_ce_steps"] is None} == {k for k in cpu_layouts.LAYOUTS
                                                                      if k.endswith("-ce")}
    assert next(r for r in rows if r["impl"] == "reference")["vs_reference"] == 1.0
    (table,) = tmp_path.glob("cpu_layouts_*_1thread.md")
    assert table.read_text().count("| tiny |") == len(cpu_layouts.LAYOUTS)
