"""Checkpoints that are never half-written, and what a run needs to continue exactly where it stopped.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed onto its
name, so a file named ``*.pt`` is always complete: a process killed while writing leaves at most a
hidden ``.<name>.*.tmp`` behind, which :func:`remove_partial` clears. :func:`latest_checkpoint` is
what ``--resume auto`` uses. The RNG helpers capture every generator a step draws from (Python,
NumPy, torch on the CPU and on this process's GPU).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcam_fast.errors import ConfigError, MMCamError
from mmcam_fast.run_folder import atomic_write

log = logging.getLogger(__name__)

# The entries of a checkpoint a run can be resumed from (best.pt and last.pt both have them).
RESUMABLE_KEYS = ("model", "optimizer", "scheduler", "config", "step", "epoch")


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace`` onto ``path``."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def load_checkpoint(path: str | Path, *, flag: str = "--checkpoint") -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` (on CPU), with a clear error if unreadable.

    Args:
        path: the checkpoint file.
        flag: the command-line flag that named it, for error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{flag} {path}: not a readable checkpoint ({exc})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ConfigError(f"{flag} {path}: not an mmcam_fast checkpoint (no 'model'/'config' entries)")
    return state


def remove_partial(folder: str | Path) -> list[Path]:
    """Delete the temporary files of saves that never finished (a process killed mid-write)."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _resumable_step(path: Path) -> int | None:
    """The training step a checkpoint was taken at, or None if it cannot be resumed from."""
    try:
        # mmap: only the small entries are read; the tensors stay on disk.
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, with the reason
        log.warning("%s: skipped, not a readable checkpoint (%s)", path, exc)
        return None
    if not isinstance(state, dict) or any(key not in state for key in RESUMABLE_KEYS):
        log.warning("%s: skipped, not a resumable checkpoint (needs %s)", path, ", ".join(RESUMABLE_KEYS))
        return None
    return int(state["step"])


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete, readable checkpoint in ``folder`` (by training step, then time), or None."""
    best: tuple[int, int, Path] | None = None
    for path in Path(folder).glob("*.pt"):
        if path.name.startswith(".") or not path.is_file():
            continue
        step = _resumable_step(path)
        if step is None:
            continue
        key = (step, path.stat().st_mtime_ns, path)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


def resolve_resume(resume: str | None, folder: str | Path) -> Path | None:
    """The checkpoint ``--resume`` names: ``auto`` is the newest in ``folder`` (None when there is none).

    Raises:
        ConfigError: an explicit file that does not exist.
    """
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(folder) if Path(folder).is_dir() else None
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(f"--resume {resume}: file not found (pass 'auto' for the newest checkpoint "
                          f"in {folder}, if any)")
    return path


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator this process draws from: Python, NumPy, torch (CPU and ``device``)."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Put back what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def check_finite(model_state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse to write a checkpoint whose model holds NaN or infinite values.

    Raises:
        MMCamError: naming the first non-finite entries.
    """
    bad = [name for name, value in model_state.items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise MMCamError(f"{path}: not written, the model has non-finite values in {', '.join(bad[:5])}"
                         + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
