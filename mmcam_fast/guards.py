"""Non-finite losses: the step is skipped, counted, and too many in a row stop the run.

A loss that is NaN or infinite on any rank makes every rank skip that optimizer step (the way the
fp16 GradScaler skips a step whose gradients overflowed), so no non-finite value reaches the weights,
the momentum buffers or a checkpoint. Stage I's forward pass also updates BatchNorm running
statistics; :class:`BufferSnapshot` puts them back when the step is skipped. The counters live on
the device and are read only at log intervals and checkpoints (:meth:`NonFiniteGuard.check`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmcam_fast.errors import MMCamError


class NonFiniteLossError(MMCamError):
    """Too many consecutive training steps had a non-finite loss (``--max-nonfinite-steps``)."""


class NonFiniteGuard:
    """Device-side counters of skipped (non-finite) steps.

    Args:
        limit: stop after this many consecutive non-finite steps (``--max-nonfinite-steps``); 0 never
            stops. Checked by :meth:`check`, i.e. at the next log interval or checkpoint.
        device: where the counters live (the model's device).
    """

    def __init__(self, limit: int, device: torch.device):
        self.limit = int(limit)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self.longest = torch.zeros((), dtype=torch.int64, device=device)  # since the last check
        self.last = torch.zeros((), device=device)  # 1.0 when the latest step was skipped

    def record(self, finite: torch.Tensor) -> torch.Tensor:
        """Count one training step; ``finite`` is False when it was skipped. Returns 1.0 if skipped."""
        bad = (~finite).to(torch.int64)
        self.skipped.add_(bad)
        self.consecutive.add_(1).mul_(bad)
        torch.maximum(self.longest, self.consecutive, out=self.longest)
        self.last = bad.float()
        return self.last

    def check(self, step: int) -> int:
        """Read the counters (one host transfer); raise past the limit. Returns the skipped steps."""
        longest, skipped = torch.stack([self.longest, self.skipped]).tolist()
        if self.limit and longest >= self.limit:
            raise NonFiniteLossError(
                f"{longest} consecutive training steps had a non-finite loss (NaN or inf), reaching "
                f"--max-nonfinite-steps {self.limit}; stopped at step {step} ({skipped} step(s) skipped "
                "in all). Every skipped step left the weights unchanged, so the last checkpoint is "
                "finite: lower --lr, try --amp off, or check the data, then continue with --resume auto")
        self.longest.copy_(self.consecutive)
        return int(skipped)

    def state_dict(self) -> dict[str, Any]:
        skipped, consecutive = torch.stack([self.skipped, self.consecutive]).tolist()
        return {"skipped": int(skipped), "consecutive": int(consecutive)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped.fill_(int(state.get("skipped", 0)))
        self.consecutive.fill_(int(state.get("consecutive", 0)))
        self.longest.copy_(self.consecutive)


class BufferSnapshot:
    """A copy of a module's buffers (BatchNorm running statistics) to undo a skipped step's update.

    One flat copy per dtype, so saving and restoring are a handful of kernels whatever the depth of
    the network, and restoring chooses on the device (no host synchronisation).
    """

    def __init__(self, module: nn.Module):
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in module.buffers():
            groups.setdefault(buffer.dtype, []).append(buffer)
        self._groups = list(groups.values())
        self._saved: list[torch.Tensor] = []

    def save(self) -> None:
        self._saved = [torch.cat([b.reshape(-1) for b in group]) for group in self._groups]

    def restore_unless(self, keep: torch.Tensor) -> None:
        """Put the saved values back where ``keep`` (a bool scalar tensor) is False."""
        for group, saved in zip(self._groups, self._saved, strict=True):
            current = torch.cat([b.reshape(-1) for b in group])
            chosen = torch.where(keep, current, saved)
            parts = chosen.split([b.numel() for b in group])
            torch._foreach_copy_(group, [p.view_as(b) for p, b in zip(parts, group, strict=True)])
