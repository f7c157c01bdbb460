"""Per-step training metrics kept on the device and written as JSON lines (``metrics.jsonl``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class MetricLog:
    """Per-step metrics kept on the device, written as JSON lines at the log interval.

    Args:
        path: the JSONL file (appended to); None keeps ``last`` only (ranks other than 0).
        every: flush interval in steps; each flush reads the buffered steps back in one transfer.
        reduce: applied to the ``[steps, metrics]`` table before it is read back, e.g. the mean over
            the ranks (every rank must then flush at the same steps).
    """

    def __init__(self, path: str | Path | None, every: int,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.path = Path(path) if path is not None else None
        self.every = max(1, every)
        self.reduce = reduce
        self._pending: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []
        self.last: dict[str, float] = {}

    def add(self, info: dict[str, Any], metrics: dict[str, torch.Tensor]) -> bool:
        """Buffer one step; returns True when this call flushed (so callers may refresh displays)."""
        self._pending.append((info, metrics))
        if len(self._pending) >= self.every:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        if not self._pending:
            return
        keys = sorted({k for _, m in self._pending for k in m})
        device = next(iter(self._pending[0][1].values())).device
        nan = torch.tensor(float("nan"), device=device)
        table = torch.stack([torch.stack([m.get(k, nan).float() for k in keys])
                             for _, m in self._pending])
        if self.reduce is not None:
            table = self.reduce(table)
        records = [{**info, **{k: v for k, v in zip(keys, row, strict=True) if v == v}}
                   for (info, _), row in zip(self._pending, table.cpu().tolist(), strict=True)]
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in records)
        self.last = records[-1]
        self._pending.clear()
