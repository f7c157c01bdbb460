"""One-line messages a training run prints between its progress bars."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# (key of the validation result, label), in the order printed; absent keys are left out
_VAL_FIELDS = (("maxboxacc_v2", "MaxBoxAccV2"), ("maxboxacc", "MaxBoxAcc"), ("pxap", "PxAP"),
               ("top1_cls", "top-1"))


def _pct(value: Any) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "?"
    return f"{value:.1f}" if math.isfinite(value) else str(value)


def format_validation(val: Mapping[str, Any], *, epochs: int | None = None, best: float | None = None,
                      best_epoch: int | None = None, saved: Sequence[str] | str = ()) -> str:
    """One line for a finished validation, e.g.

    ``epoch 3/10  val MaxBoxAccV2 41.2  MaxBoxAcc 55.0  top-1 37.5  best 41.2 (this epoch)  saved
    best.pt, last.pt``

    Args:
        val: the validation result (a row of ``val_metrics.jsonl``: ``epoch`` and the metrics in %).
        epochs: the run's number of epochs (shown as ``epoch 3/10``).
        best: the best selection score so far (this epoch's included).
        best_epoch: the epoch it was reached; ``(this epoch)`` when it is ``val["epoch"]``.
        saved: the checkpoint files written after this validation.
    """
    parts = []
    epoch = val.get("epoch")
    if epoch is not None:
        parts.append(f"epoch {epoch}/{epochs}" if epochs else f"epoch {epoch}")
    scores = [f"{label} {_pct(val[key])}" for key, label in _VAL_FIELDS if key in val]
    parts.append("val " + "  ".join(scores) if scores else "val (no metrics)")
    if best is not None:
        if best_epoch is None:
            parts.append(f"best {_pct(best)}")
        elif epoch is not None and best_epoch == epoch:
            parts.append(f"best {_pct(best)} (this epoch)")
        else:
            parts.append(f"best {_pct(best)} (epoch {best_epoch})")
    files = [saved] if isinstance(saved, str) else list(saved)
    if files:
        parts.append("saved " + ", ".join(files))
    return "  ".join(parts)
