"""The fast engine in fp32 on a CPU without native bf16: where its time goes, and which memory format.

    python benchmarks/cpu_layouts.py [CASE ...] [--threads N] [--bf16]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/cpu_layouts.py   # emulate AVX2

On such a CPU ``--amp auto`` runs the fast engine in fp32 (emulated bf16 is several times slower), so
its gains over the reference are what fp32 allows: no folded BatchNorm (off in fp32, engine.py says
why), the memory format, fused SGD. This script times, alternately in one process (the ratios see
the same machine), the reference step, the fast step contiguous and channels-last, and the three
engines' plain CE steps, for the cases of ``test_bench_step.py``; one more step of each under
``torch.profiler`` gives the share of the step spent in convolution kernels, the floor no engine with
those convolutions goes below. Writes ``benchmarks/results/cpu_layouts_<capability>_<N>thread.md``.
On an AVX-512 machine the environment variables above limit oneDNN and ATen to AVX2 kernels, which
is how the figures in docs/engine.md were taken; the layout default (``--channels-last`` unset:
contiguous for fp32 on a CPU) follows from them.

``--bf16`` adds the fast engine in bf16 (``--amp bf16``, contiguous), MinMaxCAM and CE: on a CPU
without native bf16 its "vs reference" is the cost ``--amp auto`` avoids by picking fp32 there.
Those rows go to ``cpu_layouts_<capability>_<N>thread_bf16.md`` (ResNet50 at 224 px in emulated bf16
takes minutes a step on one thread: ``resnet18_64`` alone is the usual case for it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_bench_step as bench  # noqa: E402  (the step cases, make_step, conv_seconds)

CE = {"lambda_crr": 0.0, "lambda_frr": 0.0}
LAYOUTS = {
    "reference": {"impl": "reference"},
    "fast-contiguous": {"impl": "fast", "amp": "off", "channels_last": False},
    "fast-channels-last": {"impl": "fast", "amp": "off", "channels_last": True},
    "reference-ce": {"impl": "reference", **CE},
    "fast-contiguous-ce": {"impl": "fast", "amp": "off", "channels_last": False, **CE},
    "fast-channels-last-ce": {"impl": "fast", "amp": "off", "channels_last": True, **CE},
}
BF16 = {
    "fast-bf16": {"impl": "fast", "amp": "bf16", "channels_last": False},
    "fast-bf16-ce": {"impl": "fast", "amp": "bf16", "channels_last": False, **CE},
}
ROUNDS = 3


def measure(case: str, bf16: bool = False) -> list[dict]:
    layouts = {**LAYOUTS, **(BF16 if bf16 else {})}
    bench.IMPLS.update(layouts)
    steps = {impl: bench.make_step(case, impl)[0] for impl in layouts}
    spent = dict.fromkeys(steps, 0.0)
    for _ in range(ROUNDS):
        for impl, step in steps.items():
            start = time.perf_counter()
            step()
            spent[impl] += time.perf_counter() - start
    rows = []
    for impl, step in steps.items():
        seconds = spent[impl] / ROUNDS
        reference = spent["reference-ce" if impl.endswith("-ce") else "reference"] / ROUNDS
        conv = bench.conv_seconds(step)
        twin = None if impl.endswith("-ce") else spent[f"{impl}-ce"] / ROUNDS
        rows.append({"case": case, "impl": impl, "step_s": seconds, "vs_reference": reference / seconds,
                     "conv_share": conv / seconds, "in_ce_steps": None if twin is None else seconds / twin})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(bench.CASES), choices=list(bench.CASES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="also time the fast engine in bf16 (--amp bf16)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    measured = []
    lines = ["| case | impl | s / step | vs reference | MinMaxCAM / CE | share in conv kernels |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for case in args.cases:
        for r in measure(case, args.bf16):
            measured.append(r)
            ce = "" if r["in_ce_steps"] is None else f"{r['in_ce_steps']:.2f}"
            lines.append(f"| {case} | {r['impl']} | {r['step_s']:.3f} | {r['vs_reference']:.2f}x | {ce} "
                         f"| {100 * r['conv_share']:.0f} % |")
            print(lines[-1], flush=True)
    model = bench.cpu_description()["cpu_model"]
    lines += ["", f"CPU {model}, ATen capability {capability}, oneDNN native bf16: {native}, "
              f"{args.threads} thread(s), load average at the end "
              f"{', '.join(f'{x:.2f}' for x in bench.os.getloadavg())}. "
              "All fast rows but the bf16 ones fp32 (`--amp off`, what `--amp auto` picks without native "
              "bf16)."]
    suffix = "_bf16" if args.bf16 else ""
    path = bench.RESULTS / f"cpu_layouts_{capability.lower()}_{args.threads}thread{suffix}.md"
    path.write_text("\n".join(lines) + "\n")
    print(path)
    return measured


if __name__ == "__main__":
    main()
