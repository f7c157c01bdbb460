"""Training-step benchmark: the reference step against the fast engine, in one run.

    pytest benchmarks/test_bench_step.py --benchmark-only          # pytest-benchmark table
    python benchmarks/test_bench_step.py [THREADS]                  # ratios, FLOP/s, matmul peak

Cases: resnet50_cam at 224 (N=2, S=5) and resnet18_cam at 64 (N=4, S=5), at the project's default
feature-map geometry (the table names it), each with ids
``reference`` and ``fast`` (the fast engine as a run gets it by default: on CPU without
torch.compile), ``fast-compiled`` (the fast engine with ``--compile``) and ``fast-no-fold`` (the
fast engine with ``--no-fold-bn``: Stage II's BatchNorm not folded into the convolutions). The same run
measures this machine's matmul throughput (bf16 and fp32) so that the step's achieved FLOP/s can be
given as a fraction of it; the step's FLOPs are counted with ``torch.utils.flop_counter``.

Each engine's plain cross-entropy step (lambda_crr = lambda_frr = 0: Stage I only) is measured in the
same run (ids ``reference-ce``, ``fast-ce``, ``fast-compiled-ce``), so that the MinMaxCAM step's cost
can be given in CE steps of the same engine (``fast-no-fold`` against ``fast-ce``: folding only
touches Stage II); the script times each engine's two steps alternately. Stage II is one no-grad
forward and one forward with an input-gradient backward through the frozen backbone, so with the
backbone dominating a MinMaxCAM step costs about two CE steps.

The script also measures what bounds the ratio: the throughput of a 3x3 convolution in bf16 and in
fp32 (oneDNN, channels-last; on CPUs without AMX bf16 convolutions are faster than the bf16 matmul) and,
with ``torch.profiler``, the time each step spends inside convolution kernels (forward and backward).
The reference step's time divided by the fast step's convolution time is the most the fast step could
gain if every other operation were free.
"""

from __future__ import annotations

import json
import os
import time
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from mmcam_fast.config import TrainConfig
from mmcam_fast.engine import Trainer
from mmcam_fast.models import create_model

CASES = {"resnet50_224": ("resnet50", 224, 2), "resnet18_64": ("resnet18", 64, 4)}
CE = {"lambda_crr": 0.0, "lambda_frr": 0.0}  # plain CAM: Stage II is skipped
IMPLS = {"reference": {"impl": "reference"}, "fast": {"impl": "fast"},
         "fast-compiled": {"impl": "fast", "compile": True},
         "fast-no-fold": {"impl": "fast", "fold_bn": False},
         "reference-ce": {"impl": "reference", **CE}, "fast-ce": {"impl": "fast", **CE},
         "fast-compiled-ce": {"impl": "fast", "compile": True, **CE}}
# each MinMaxCAM row's CE step of the same engine, and each row's reference
CE_TWIN = {"reference": "reference-ce", "fast": "fast-ce", "fast-compiled": "fast-compiled-ce",
           "fast-no-fold": "fast-ce"}
REFERENCE = {impl: "reference-ce" if impl.endswith("-ce") else "reference" for impl in IMPLS}
# the script times each group's steps alternately (IMPLS order within a case is kept for the table)
TIMED_TOGETHER = (("reference", "reference-ce"), ("fast", "fast-ce"), ("fast-compiled", "fast-compiled-ce"),
                  ("fast-no-fold",))
SET_SIZE = 5


def make_step(case: str, impl: str):
    """A trainer on random data of the case's shape, warmed up (compiled) before timing."""
    backbone, size, num_sets = CASES[case]
    torch.manual_seed(0)
    model = create_model(backbone, 10)
    trainer = Trainer(model, TrainConfig(set_size=SET_SIZE, sets_per_batch=num_sets, lr=1e-3, **IMPLS[impl]))
    images = torch.randn(num_sets * SET_SIZE, 3, size, size)
    labels = torch.arange(num_sets).repeat_interleave(SET_SIZE)
    for _ in range(2):  # compile + first-call allocations
        trainer.train_step(images, labels)
    return lambda: trainer.train_step(images, labels), images.shape[0]


RESULTS = Path(__file__).resolve().parent / "results"


def feature_map(case: str) -> str:
    """The case's feature-map size at the project's default geometry, e.g. ``28x28``."""
    backbone, size, _ = CASES[case]
    model = create_model(backbone, 10).eval()
    with torch.no_grad():
        side = model.backbone(torch.zeros(1, 3, size, size)).shape[-1]
    return f"{side}x{side}"


def cpu_description() -> dict:
    """The CPU's model name and whether it has native bf16 (AVX512-BF16, AMX), from /proc/cpuinfo."""
    from mmcam_fast.machine import cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    return {"cpu_model": model, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


@cache
def step_flops(case: str, impl: str = "reference") -> int:
    step, _ = make_step(case, impl)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def best_seconds(fn, repeats: int = 5) -> float:
    """Best of ``repeats`` timed calls, after two untimed ones."""
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops_per_s(dtype: torch.dtype, n: int = 4096) -> float:
    """Best of five timed n x n matmuls, after two untimed ones."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b)


def conv3x3(dtype: torch.dtype):
    """A 3x3 convolution 256 -> 256 channels at 56 x 56, batch 8, channels-last (oneDNN): (call, FLOPs)."""
    x = torch.randn(8, 256, 56, 56, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return (lambda: F.conv2d(x, w, padding=1)), 2 * 8 * 56 * 56 * 256 * 256 * 9


def conv_flops_per_s(dtype: torch.dtype) -> float:
    call, flops = conv3x3(dtype)
    return flops / best_seconds(call)


# oneDNN convolutions and their backward; the THNN ones are what fp32 1x1 convolutions with a batch
# under 16 get in a single-threaded process (a dispatch rule of torch's, slower than oneDNN here).
CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward",
            "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward")


def conv_seconds(step) -> float:
    """Seconds one step spends inside convolution kernels (self time, forward and backward)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in CONV_OPS) / 1e6


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", list(CASES))
def test_step(benchmark, case, impl):
    step, batch = make_step(case, impl)
    benchmark.group = f"step {case}"
    benchmark.extra_info["images_per_step"] = batch
    benchmark.extra_info["flops"] = step_flops(case, REFERENCE[impl])  # for FLOP/s against test_matmul_peak's
    benchmark.pedantic(step, rounds=3, iterations=1)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_conv_peak(benchmark, dtype):
    call, flops = conv3x3(torch.bfloat16 if dtype == "bf16" else torch.float32)
    benchmark.group = "conv3x3 256->256 56x56 batch 8 channels-last"
    benchmark.extra_info["flops"] = flops
    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_matmul_peak(benchmark, dtype):
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(4096, 4096, dtype=torch_dtype), torch.randn(4096, 4096, dtype=torch_dtype)
    benchmark.group = "matmul 4096x4096"
    benchmark.extra_info["flops"] = 2 * 4096**3
    benchmark.pedantic(lambda: a @ b, rounds=5, iterations=1, warmup_rounds=2)


def _in_ce_steps(row: dict) -> str:
    return "" if row["in_ce_steps"] is None else f"{row['in_ce_steps']:.2f}"


def main(threads: int | None = None) -> None:
    """Print and write (``benchmarks/results/step*.{json,md}``) the table; ``threads``: torch threads."""
    if threads is not None:
        torch.set_num_threads(threads)
    suffix = "" if threads is None else f"_{threads}thread"
    peaks = {"bf16": matmul_flops_per_s(torch.bfloat16), "fp32": matmul_flops_per_s(torch.float32)}
    conv_peaks = {"bf16": conv_flops_per_s(torch.bfloat16), "fp32": conv_flops_per_s(torch.float32)}
    load_before = os.getloadavg()
    rows = []
    for case in CASES:
        flops = {ref: step_flops(case, ref) for ref in ("reference", "reference-ce")}
        geometry = feature_map(case)
        batch = CASES[case][2] * SET_SIZE
        times, conv = {}, {}
        for group in TIMED_TOGETHER:
            # a MinMaxCAM step and its engine's CE step alternate, so that their ratio sees the same
            # machine (the load of a shared machine drifts within minutes)
            steps = {impl: make_step(case, impl) for impl in group}
            spent = dict.fromkeys(group, 0.0)
            for _ in range(3):
                for impl, (step, _) in steps.items():
                    start = time.perf_counter()
                    step()
                    spent[impl] += time.perf_counter() - start
            for impl, (step, _) in steps.items():
                times[impl] = spent[impl] / 3
                conv[impl] = conv_seconds(step)  # one more step, under the profiler
            del steps
        for impl in IMPLS:
            seconds = times[impl]
            reference, step_flop = times[REFERENCE[impl]], flops[REFERENCE[impl]]
            twin = CE_TWIN.get(impl)
            rows.append({"case": case, "map": geometry, "impl": impl, "step_s": round(seconds, 3),
                         "images_per_s": round(batch / seconds, 2),
                         "speedup": round(reference / seconds, 2),
                         "in_ce_steps": round(seconds / times[twin], 2) if twin else None,
                         "gflop_per_s": round(step_flop / seconds / 1e9, 1),
                         "of_bf16_peak": round(step_flop / seconds / peaks["bf16"], 3),
                         "of_fp32_peak": round(step_flop / seconds / peaks["fp32"], 3),
                         "of_bf16_conv": round(step_flop / seconds / conv_peaks["bf16"], 3),
                         "conv_s": round(conv[impl], 3),
                         "speedup_bound": round(reference / conv[impl], 2)})
    peak_line = {"matmul_gflop_per_s": {k: round(v / 1e9, 1) for k, v in peaks.items()},
                 "conv3x3_gflop_per_s": {k: round(v / 1e9, 1) for k, v in conv_peaks.items()},
                 "threads": torch.get_num_threads(),
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(), **cpu_description(),
                 "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                 "load_average": {"before": [round(x, 2) for x in load_before],
                                  "after": [round(x, 2) for x in os.getloadavg()]}}
    print(json.dumps(peak_line))
    for row in rows:
        print(json.dumps(row))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"step{suffix}.json").write_text(json.dumps({**peak_line, "rows": rows}, indent=2) + "\n")
    lines = ["| case | map | impl | s / step | images / s | vs reference | MinMaxCAM / CE | GFLOP/s "
             "| of bf16 matmul peak | of bf16 conv peak | s in conv kernels | bound: reference s / conv s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['case']} | {r['map']} | {r['impl']} | {r['step_s']:.3f} | {r['images_per_s']:.2f} "
              f"| {r['speedup']:.2f}x | {_in_ce_steps(r)} "
              f"| {r['gflop_per_s']:.1f} | {100 * r['of_bf16_peak']:.1f} % "
              f"| {100 * r['of_bf16_conv']:.1f} % | {r['conv_s']:.3f} | {r['speedup_bound']:.2f}x |"
              for r in rows]
    yes_no = {True: "yes", False: "no"}
    lines += ["", f"CPU {peak_line['cpu_model']}: AVX512-BF16 {yes_no[peak_line['avx512_bf16']]}, AMX-BF16 "
              f"{yes_no[peak_line['amx_bf16']]} (oneDNN native bf16: {yes_no[peak_line['native_bf16']]}). "
              f"Threads {peak_line['threads']}, {peak_line['cpu_capability']}; GFLOP/s: "
              f"matmul 4096^2 bf16 {peak_line['matmul_gflop_per_s']['bf16']}, "
              f"fp32 {peak_line['matmul_gflop_per_s']['fp32']}; 3x3 conv bf16 "
              f"{peak_line['conv3x3_gflop_per_s']['bf16']}, fp32 {peak_line['conv3x3_gflop_per_s']['fp32']}. "
              "Load average (1, 5, 15 min) before "
              f"{', '.join(map(str, peak_line['load_average']['before']))}, after "
              f"{', '.join(map(str, peak_line['load_average']['after']))}.",
              "", "vs reference: against the reference step of the same kind (MinMaxCAM rows against "
              "`reference`, CE rows against `reference-ce`). MinMaxCAM / CE: the MinMaxCAM step's time in "
              "CE steps of the same engine (`fast-no-fold` against `fast-ce`)."]
    (RESULTS / f"step{suffix}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    import sys

    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
