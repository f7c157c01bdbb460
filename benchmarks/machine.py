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
