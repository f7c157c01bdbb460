"""Ahead-of-time compile of every kernel launch for sm_80 (A100) and sm_90 (H100), without a GPU.

    python -m mmcam_kernels.aot [--arch 80 90] [--jobs N] [--variants]

What is compiled is exactly what a GPU run compiles: the launchers themselves are run on CPU
tensors (empty, never read) under :func:`mmcam_kernels._launch.record_launches`, for every input
dtype (fp32, bf16, fp16), both memory formats (contiguous, channels-last), a dense and a stride-0
expanded incoming gradient, and the shapes in ``SHAPES``. Each recorded launch is specialised by
Triton's own binder for the target (pointer dtypes and alignment, integer arguments equal to 1 or
divisible by 16, constexprs, the kernel's one registered config) and compiled to a cubin; register,
stack, shared and local memory use come from ``cuobjdump --dump-resource-usage`` (shipped in the
Triton wheel). The command prints one row per (kernel, config, arch) with the worst case over the
variants (``--variants``: one row per variant) and exits non-zero on a compile error or any spill
(non-zero stack or local memory).

The specialisation step uses Triton 3.8's binder (``create_function_from_signature`` and
``JITFunction._pack_args``), so the compiled variants match the runtime's cache keys; the project
pins that Triton release.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from ._launch import KERNEL_CONFIGS, RecordedLaunch, record_launches
from .cam_mask import cam_mask_bwd, cam_mask_fwd
from .set_regularizers import set_regularizers_bwd, set_regularizers_fwd

ARCHS = (80, 90)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Shape:
    """One training-batch geometry: B = N*S samples, K channels, h x w maps, H x W images, C classes."""

    label: str
    batch: int
    channels: int
    map_size: int
    image_size: int
    num_classes: int
    set_size: int


# The paper's geometries (K%16 == 0; h*w divisible by 16 or not) and an odd one (nothing divisible):
# Triton specialises integer arguments on divisibility by 16, so these give every variant a
# training run with these models compiles.
SHAPES = (
    Shape("resnet50-cam 28x28 @224, N=12 S=5", 60, 2048, 28, 224, 200, 5),
    Shape("vgg16-cam 14x14 @224, N=12 S=5", 60, 1024, 14, 224, 200, 5),
    Shape("odd: B=5 K=100 7x7 @97", 5, 100, 7, 97, 3, 5),
)

RESOURCE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _empty(shape: Sequence[int], dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, memory_format=fmt)


def record_all_launches(shapes: Iterable[Shape] = SHAPES) -> list[RecordedLaunch]:
    """Run every launcher on empty CPU tensors for each shape, dtype and layout; return the launches."""
    with record_launches() as launches:
        for s in shapes:
            labels = torch.zeros(s.batch, dtype=torch.int64)
            weight = torch.empty(s.num_classes, s.channels)
            for dtype in DTYPES:
                for channels_last in (False, True):
                    m, i = s.map_size, s.image_size
                    features = _empty((s.batch, s.channels, m, m), dtype, channels_last)
                    images = _empty((s.batch, 3, i, i), dtype, channels_last)
                    masked, cam = cam_mask_fwd(features, weight, labels, images)
                    expanded = torch.ones((), dtype=dtype).expand_as(masked)  # the gradient of .sum()
                    for grad in (torch.empty_like(masked), expanded):
                        cam_mask_bwd(grad, features, labels, images, cam, s.num_classes)
                f = _empty((s.batch, s.channels), dtype)
                losses = set_regularizers_fwd(f, _empty((s.batch, s.channels), dtype), s.set_size)
                for grad in (torch.empty_like(losses), torch.ones(()).expand(2)):
                    set_regularizers_bwd(grad, f, _empty((s.batch, s.channels), dtype), s.set_size)
    return launches


@dataclass(frozen=True)
class CompileJob:
    """A fully specialised kernel variant for one arch (picklable, for worker processes)."""

    kernel_name: str
    arch: int
    signature: dict[str, str]
    constexprs: dict[Any, Any]
    attrs: dict[Any, Any]
    options: dict[str, Any]

    @property
    def key(self) -> str:
        return repr((self.kernel_name, self.arch, self.signature, self.constexprs, self.attrs, self.options))

    def _declared_constexprs(self) -> set[str]:
        kernel = KERNEL_CONFIGS[self.kernel_name].kernel
        return {p.name for p in kernel.params if p.is_constexpr}

    def variant(self) -> str:
        """Pointer dtypes and integer specialisations, e.g. ``*bf16 *fp32 | K%16 stride_fp=1``."""
        params = KERNEL_CONFIGS[self.kernel_name].kernel.arg_names
        ptrs = [t for t in self.signature.values() if t.startswith("*")]
        ints = []
        for (index,), value in self.constexprs.items():
            name = params[index]
            # Runtime integers the binder turned into the constant 1 (declared constexprs are not).
            if name not in self._declared_constexprs() and value == 1:
                ints.append(f"{name}=1")
        for (index,), attr in self.attrs.items():
            if any(a[0] == "tt.divisibility" for a in attr) and self.signature[params[index]][0] != "*":
                ints.append(f"{params[index]}%16")
        return " ".join(ptrs) + (" | " + " ".join(ints) if ints else "")


def specialise(launch: RecordedLaunch, arch: int) -> CompileJob:
    """What Triton's runtime binder would compile for this launch on ``sm_<arch>``."""
    kernel = launch.config.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.constexprs, num_warps=launch.config.num_warps)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    return CompileJob(launch.config.name, arch, signature, constexprs, attrs, dict(options.__dict__))


@dataclass
class CompileResult:
    job: CompileJob
    registers: int = 0
    stack: int = 0
    shared: int = 0
    local: int = 0
    error: str = ""

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_job(job: CompileJob) -> CompileResult:
    """Compile one variant to a cubin and read its resource usage with cuobjdump."""
    result = CompileResult(job)
    try:
        kernel = KERNEL_CONFIGS[job.kernel_name].kernel
        src = ASTSource(kernel, job.signature, job.constexprs, job.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / f"{job.kernel_name}.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            command = [str(_cuobjdump()), "--dump-resource-usage", str(cubin)]
            usage = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        match = RESOURCE_RE.search(usage)
        if match is None:
            raise RuntimeError(f"no resource usage in cuobjdump output:\n{usage}")
        result.registers, result.stack, result.shared, result.local = map(int, match.groups())
        # Triton allocates dynamic shared memory itself (reductions, layout conversions).
        result.shared = max(result.shared, int(compiled.metadata.shared))
    except Exception as exc:  # reported per variant; the command exits non-zero
        result.error = f"{type(exc).__name__}: {exc}".strip()
    return result


@dataclass
class AotReport:
    results: list[CompileResult] = field(default_factory=list)

    @property
    def errors(self) -> list[CompileResult]:
        return [r for r in self.results if r.error]

    @property
    def spilled(self) -> list[CompileResult]:
        return [r for r in self.results if not r.error and r.spills]

    @property
    def ok(self) -> bool:
        return bool(self.results) and not self.errors and not self.spilled


def compile_launches(launches: Iterable[RecordedLaunch], archs: Sequence[int], jobs: int = 1) -> AotReport:
    """Specialise and compile each distinct (launch variant, arch); ``jobs`` worker processes."""
    unique: dict[str, CompileJob] = {}
    for launch in launches:
        for arch in archs:
            job = specialise(launch, arch)
            unique.setdefault(job.key, job)
    work = list(unique.values())
    if jobs > 1 and len(work) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(compile_job, work))
    else:
        results = [compile_job(job) for job in work]
    return AotReport(results)


def run_aot(archs: Sequence[int] = ARCHS, jobs: int = 1) -> AotReport:
    """Compile every launch the launchers make for ``SHAPES`` x dtypes x layouts, for each arch."""
    return compile_launches(record_all_launches(), archs, jobs)


def format_table(report: AotReport, variants: bool = False) -> str:
    """Resource table: per (kernel, config, arch) the worst variant, or every variant."""
    header = ["kernel", "config", "arch", "variants", "registers", "stack", "shared (B)", "local"]
    groups: dict[tuple, list[CompileResult]] = {}
    for r in report.results:
        cfg = KERNEL_CONFIGS[r.job.kernel_name].describe()
        key = (r.job.kernel_name, cfg, f"sm_{r.job.arch}") + ((r.job.variant(),) if variants else ())
        groups.setdefault(key, []).append(r)
    if variants:
        header[3] = "variant"
    rows = []
    for key, results in groups.items():
        good = [r for r in results if not r.error]
        count = key[3] if variants else str(len(results))
        if len(good) < len(results):
            rows.append([*key[:3], count, "ERROR", "", "", ""])
            continue
        rows.append([
            *key[:3],
            count,
            str(max(r.registers for r in good)),
            str(max(r.stack for r in good)),
            str(max(r.shared for r in good)),
            str(max(r.local for r in good)),
        ])  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmcam_kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=[80, 90],
                        help="CUDA compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compile processes (default: 1)")
    parser.add_argument("--variants", action="store_true", help="one row per specialised variant")
    args = parser.parse_args(argv)
    report = run_aot(args.arch, args.jobs)
    print(format_table(report, args.variants))
    print(f"\n{len(report.results)} variants compiled for {', '.join(f'sm_{a}' for a in args.arch)}; "
          f"{len(report.errors)} errors, {len(report.spilled)} with spills")
    for r in report.errors:
        print(f"ERROR {r.job.kernel_name} sm_{r.job.arch} [{r.job.variant()}]: {r.error}", file=sys.stderr)
    for r in report.spilled:
        where = f"{r.job.kernel_name} sm_{r.job.arch} [{r.job.variant()}]"
        print(f"SPILL {where}: stack={r.stack} local={r.local}", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
