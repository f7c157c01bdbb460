"""`python -m mmcam_kernels.aot`: every kernel configuration compiles for sm_80 and sm_90, no spills.

Runs in the normal process (and the command in a subprocess without TRITON_INTERPRET). A cold run
compiles about 220 variants (a minute or two on 2 cores); Triton's cache makes later runs fast.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from mmcam_kernels import KERNEL_CONFIGS, aot
from mmcam_kernels._launch import KernelConfig, RecordedLaunch


def parse_table(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_aot_command_compiles_every_kernel_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "mmcam_kernels.aot", "--arch", "80", "90", "--jobs", "2"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, f"aot failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    rows = parse_table(run.stdout)
    expected = {(kernel, arch) for kernel in KERNEL_CONFIGS for arch in ("sm_80", "sm_90")}
    assert {(row["kernel"], row["arch"]) for row in rows} == expected
    for row in rows:
        # The table is built from the launchers' own config table: one list, not a copy.
        assert row["config"] == KERNEL_CONFIGS[row["kernel"]].describe()
        assert 0 < int(row["registers"]) <= 255, row
        assert row["stack"] == "0" and row["local"] == "0", f"spill: {row}"
        assert int(row["variants"]) >= 2, row  # dtypes / layouts / shapes were specialised
    assert "0 errors, 0 with spills" in run.stdout


@triton.jit
def _not_a_power_of_two_kernel(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)


def test_a_compile_error_is_reported(monkeypatch):
    # What the interpreter forgives and the compiler does not: a block size that is not a power of 2.
    config = KernelConfig(_not_a_power_of_two_kernel, (("BLOCK", 3),), 4)
    monkeypatch.setitem(KERNEL_CONFIGS, config.name, config)
    launch = RecordedLaunch(config, (torch.empty(8),), {"BLOCK": 3})
    report = aot.compile_launches([launch], [90])
    assert not report.ok and len(report.errors) == 1
    assert "power of 2" in report.errors[0].error


@pytest.mark.parametrize("problem", ["error", "spill"])
def test_command_exits_nonzero_on_an_error_or_a_spill(problem, monkeypatch, capsys):
    name = next(iter(KERNEL_CONFIGS))
    job = aot.CompileJob(name, 90, {}, {}, {}, {"num_warps": 4})
    result = aot.CompileResult(job, registers=40)
    if problem == "error":
        result.error = "CompilationError: boom"
    else:
        result.stack = 8
    monkeypatch.setattr(aot, "run_aot", lambda archs, jobs: aot.AotReport([result]))
    assert aot.main(["--arch", "90"]) == 1
    assert ("ERROR" if problem == "error" else "SPILL") in capsys.readouterr().err
