"""The trainer: one step is Stage I (classification, all parameters) then Stage II (CRR/FRR, fc.weight).

The trainer owns the optimizer and the schedule; the method's losses come from
:mod:`mmcam_fast.minmaxcam`. Per-step metrics stay on the device and are read by :class:`MetricLog`
at the log interval only, so a step has no host synchronisation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcam_fast.checkpoint import unwrap
from mmcam_fast.config import TrainConfig
from mmcam_fast.minmaxcam import stage1_loss, stage2_losses
from mmcam_fast.models.backbones import NEW_LAYERS


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD (Nesterov momentum, weight decay) with the new layers (fc, conv6) at lr x classifier_lr_mult."""
    model = unwrap(model)
    new, pretrained = [], []
    for name, param in model.named_parameters():
        is_new = name.startswith("fc.") or name.removeprefix("backbone.").startswith(NEW_LAYERS)
        (new if is_new else pretrained).append(param)
    groups = [{"params": pretrained, "lr": config.lr, "name": "backbone"},
              {"params": new, "lr": config.lr * config.classifier_lr_mult, "name": "classifier"}]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.weight_decay, foreach=True)


class Trainer:
    """MinMaxCAM training step and the state that survives a restart.

    Args:
        model: a :class:`~mmcam_fast.models.CAMModel` (or a DDP wrapper of one).
        config: the run's configuration (lambdas, set size, optimizer settings, impl).
    """

    def __init__(self, model: nn.Module, config: TrainConfig):
        self.model = model
        self.config = config
        self.optimizer = build_optimizer(model, config)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma)
        self.stage2_enabled = config.lambda_crr > 0 or config.lambda_frr > 0
        self.stage2_impl = "reference" if config.impl == "reference" else "auto"

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One mini-batch: Stage I step over all parameters, then Stage II step over fc.weight.

        Returns detached device tensors (ce, acc, crr, frr, loss2); nothing is read back to the host.
        """
        metrics = self.stage1_step(images, labels)
        if self.stage2_enabled:  # lambda_crr = lambda_frr = 0 is plain CAM
            metrics.update(self.stage2_step(images, labels))
        return metrics

    def stage1_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage I: classification loss, backward, step over every parameter (train mode)."""
        self.model.train()
        logits, _ = self.model(images)
        ce = stage1_loss(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        ce.backward()
        self.optimizer.step()
        return {"ce": ce.detach(), "acc": (logits.detach().argmax(1) == labels).float().mean()}

    def stage2_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage II: CRR/FRR through the frozen backbone, backward into fc.weight only, step.

        Every gradient is None after zero_grad; stage2_losses gives fc.weight the only one, and SGD
        skips parameters without a gradient, so their values and momentum buffers stay bit-identical.
        BatchNorm buffers are untouched: the backbone runs in eval mode.
        """
        config = self.config
        self.optimizer.zero_grad(set_to_none=True)
        plain = unwrap(self.model)
        crr, frr = stage2_losses(plain.backbone, plain.fc, images, labels, config.set_size,
                                 impl=self.stage2_impl)
        loss2 = config.lambda_crr * crr + config.lambda_frr * frr
        loss2.backward()
        self.optimizer.step()
        return {"crr": crr.detach(), "frr": frr.detach(), "loss2": loss2.detach()}

    def state_dict(self) -> dict[str, Any]:
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class MetricLog:
    """Per-step metrics kept on the device, written as JSON lines at the log interval.

    Args:
        path: the JSONL file (appended to).
        every: flush interval in steps; each flush reads the buffered steps back in one transfer.
    """

    def __init__(self, path: str | Path, every: int):
        self.path = Path(path)
        self.every = max(1, every)
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
                             for _, m in self._pending]).cpu().tolist()
        with self.path.open("a") as handle:
            for (info, _), row in zip(self._pending, table, strict=True):
                record = {**info, **{k: v for k, v in zip(keys, row, strict=True) if v == v}}
                handle.write(json.dumps(record) + "\n")
                self.last = record
        self._pending.clear()
