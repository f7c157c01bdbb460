"""How the ops launch their kernels: the one config table, the launch call, and a launch recorder.

Every kernel is declared with ``@config(num_warps=..., BLOCK_...=...)`` right above ``@triton.jit``.
That registers the kernel's single configuration in ``KERNEL_CONFIGS``; the host launchers read it
through :func:`launch`, and the ahead-of-time compile (``mmcam_kernels.aot``) compiles exactly those
configurations. There is no second table to keep in sync, and no autotuning: a launch depends only
on the input's dtypes, layout and shape, so the set of compiled kernels is known in advance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton
from torch.library import wrap_triton

# Triton decides at decoration time whether @triton.jit gives an interpreted (numpy) kernel; the
# kernels of this package are decorated when it is imported, right after this line runs.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


@dataclass(frozen=True)
class KernelConfig:
    """The compile-time block sizes and warp count a kernel is always launched with."""

    kernel: Any  # triton JITFunction (or InterpretedFunction under TRITON_INTERPRET=1)
    blocks: tuple[tuple[str, int], ...]
    num_warps: int

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def meta(self) -> dict[str, int]:
        return dict(self.blocks)

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.blocks) + f" warps={self.num_warps}"


# kernel name -> its one configuration; filled by @config, read by launch() and by the AOT compile.
KERNEL_CONFIGS: dict[str, KernelConfig] = {}


def config(num_warps: int, **blocks: int) -> Callable[[Any], Any]:
    """Register the configuration of the ``@triton.jit`` kernel below it (block sizes, warps)."""

    def register(kernel: Any) -> Any:
        entry = KernelConfig(kernel, tuple(blocks.items()), num_warps)
        if entry.name in KERNEL_CONFIGS:
            raise RuntimeError(f"kernel {entry.name} registered twice")
        KERNEL_CONFIGS[entry.name] = entry
        return kernel

    return register


def block_size(kernel: Any, name: str) -> int:
    """A block size of ``kernel``'s registered config (for host-side buffer shapes)."""
    return KERNEL_CONFIGS[kernel.fn.__name__].meta[name]


@dataclass(frozen=True)
class RecordedLaunch:
    """One launch a launcher would have made: what the AOT compile specializes and compiles."""

    config: KernelConfig
    args: tuple[Any, ...]
    constexprs: dict[str, Any]


_recorder: list[RecordedLaunch] | None = None


def launch(
    kernel: Any, grid: Callable[[dict[str, int]], tuple[int, ...]], *args: Any, **constexprs: Any
) -> None:
    """Launch ``kernel`` with its registered configuration.

    ``wrap_triton`` makes the launch visible to torch.compile / torch.export inside a
    ``torch.library.triton_op``; in eager mode (GPU or interpreter) it simply runs the kernel.

    Args:
        kernel: a kernel registered with :func:`config`.
        grid: maps the config's block sizes to the launch grid.
        *args: the kernel's runtime arguments, in order.
        **constexprs: compile-time arguments other than the block sizes (e.g. ``EPS``).
    """
    cfg = KERNEL_CONFIGS[kernel.fn.__name__]
    meta = cfg.meta
    if _recorder is not None:
        _recorder.append(RecordedLaunch(cfg, args, {**constexprs, **meta}))
        return
    wrap_triton(kernel)[grid(meta)](*args, **constexprs, **meta, num_warps=cfg.num_warps)


@contextlib.contextmanager
def record_launches() -> Iterator[list[RecordedLaunch]]:
    """Within this block, launchers record their launches instead of running them (for AOT)."""
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous


def spatially_flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its last two dims flatten into one strided dim (contiguous, channels-last), else a copy.

    The kernels address an ``[..., h, w]`` map as ``[..., h*w]`` with one stride, which keeps the
    unit-stride dim visible to the compiler (vectorised loads) in both memory formats.
    """
    if t.shape[-1] == 1 or t.stride(-2) == t.shape[-1] * t.stride(-1):
        return t
    return t.contiguous()


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; returns it. Raises ValueError naming the odd one out."""
    items = list(tensors.items())
    device = items[0][1].device
    for name, t in items[1:]:
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but {items[0][0]} is on {device}")
    return device


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{op}: {name} has dtype {t.dtype}; the Triton kernels take float32, bfloat16 or float16 "
            "(use impl='reference' for other dtypes)"
        )
