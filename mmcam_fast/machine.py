"""The CPU a benchmark ran on, from /proc/cpuinfo: its model name and its feature flags."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """``(model name, set of flags)``; the platform's processor name and no flags where unreadable."""
    model, flags = platform.processor() or platform.machine() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def describe() -> str:
    """One line naming the machine, for result files: CPU model, cores, and its bf16 support."""
    import os

    model, flags = cpu_model_and_flags()
    bf16 = ("AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags
            else "AVX2 (no native bf16)" if "avx2" in flags else "no AVX2")
    return f"{model}, {os.cpu_count()} cores, {bf16}"
