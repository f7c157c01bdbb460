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

from mmcam_fast import ops
from mmcam_fast.checkpoint import unwrap
from mmcam_fast.config import TrainConfig
from mmcam_fast.minmaxcam import eval_mode, stage1_loss, stage2_core, stage2_losses
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
    # fused SGD on CUDA (one kernel for all parameters), foreach elsewhere; both skip parameters
    # whose gradient is None, which is what keeps Stage II away from everything but fc.weight.
    fused = config.impl == "fast" and next(model.parameters()).device.type == "cuda"
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.weight_decay, foreach=None if fused else True,
                           fused=True if fused else None)


def native_bf16(device_type: str) -> bool:
    """Whether bf16 is a hardware format here (CUDA >= sm_80; CPUs with AVX512-BF16 or AMX)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    # Without AVX512-BF16/AMX oneDNN emulates bf16, which is several times slower than fp32.
    return device_type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_amp(amp: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype of the fast engine.

    ``auto``: bf16 where the hardware has it (measured on an AVX2-only CPU: emulated bf16 made a
    ResNet18 step 7x slower than fp32), else fp16 on CUDA, else fp32 (no autocast). ``bf16`` and
    ``fp16`` force the dtype; ``off`` is fp32.
    """
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or native_bf16(device_type):
        return torch.bfloat16
    return torch.float16 if device_type == "cuda" else None


class Trainer:
    """MinMaxCAM training step and the state that survives a restart.

    Two implementations of the same step (``config.impl``):

    - ``"reference"``: plain eager PyTorch in fp32, :func:`mmcam_fast.minmaxcam.stage2_losses`.
    - ``"fast"``: channels-last, autocast (bf16 by default, fp16 with a GradScaler on request),
      Stage I and Stage II computations compiled with ``torch.compile`` (Stage II whole, with
      ``fullgraph=True``; on CUDA in ``reduce-overhead`` mode, i.e. captured in CUDA graphs and
      replayed), Stage II's CAM/mask and set distances through :mod:`mmcam_fast.ops` (fused Triton
      kernels on CUDA), fused SGD on CUDA.

    Args:
        model: a :class:`~mmcam_fast.models.CAMModel` (or a DDP wrapper of one), on its device.
        config: the run's configuration (lambdas, set size, optimizer settings, impl).
    """

    def __init__(self, model: nn.Module, config: TrainConfig):
        self.model = model
        self.config = config
        self.device = next(model.parameters()).device
        self.fast = config.impl == "fast"
        self.optimizer = build_optimizer(model, config)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma)
        self.stage2_enabled = config.lambda_crr > 0 or config.lambda_frr > 0
        self.amp_dtype = resolve_amp(config.amp, self.device.type) if self.fast else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.memory_format = (torch.channels_last if self.fast and config.channels_last
                              else torch.contiguous_format)
        self._stage1 = self._stage1_forward
        self._stage2 = self._stage2_forward
        if self.fast:
            unwrap(model).to(memory_format=self.memory_format)
            self.kernels = ops.resolve_impl(None, self.device)
            if config.compile or (config.compile is None and self.device.type == "cuda"):
                self._stage1 = torch.compile(self._stage1_forward)
                # Static shapes every step (set batches): on CUDA the frozen-backbone pass, forward
                # and input-gradient backward, is captured once in CUDA graphs and replayed.
                # Parameters are static-address inputs of the graphs and the optimizer updates them
                # in place, so a replay reads Stage I's new weights: no re-capture is needed.
                mode = "reduce-overhead" if self.device.type == "cuda" and config.cuda_graphs else None
                self._stage2 = torch.compile(self._stage2_forward, fullgraph=True, mode=mode)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def _stage1_forward(self, images: torch.Tensor, labels: torch.Tensor):
        with self._autocast():
            logits, _ = self.model(images)
        logits = logits.float()
        return stage1_loss(logits, labels), logits

    def _stage2_forward(self, images: torch.Tensor, labels: torch.Tensor):
        plain = unwrap(self.model)
        with self._autocast():
            return stage2_core(plain.backbone, plain.fc.weight, images, labels, self.config.set_size,
                               kernels=self.kernels)

    def _step(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One mini-batch: Stage I step over all parameters, then Stage II step over fc.weight.

        Returns detached device tensors (ce, acc, crr, frr, loss2); nothing is read back to the host.
        """
        images = images.contiguous(memory_format=self.memory_format)
        metrics = self.stage1_step(images, labels)
        if self.stage2_enabled:  # lambda_crr = lambda_frr = 0 is plain CAM
            metrics.update(self.stage2_step(images, labels))
        return metrics

    def stage1_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage I: classification loss, backward, step over every parameter (train mode)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.fast:
            ce, logits = self._stage1(images, labels)
        else:
            logits, _ = self.model(images)
            ce = stage1_loss(logits, labels)
        self._step(ce)
        return {"ce": ce.detach(), "acc": (logits.detach().argmax(1) == labels).float().mean()}

    def stage2_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage II: CRR/FRR through the frozen backbone, backward into fc.weight only, step.

        Every gradient is None after zero_grad; the Stage II losses give fc.weight the only one, and
        SGD skips parameters without a gradient, so their values and momentum buffers stay
        bit-identical. BatchNorm buffers are untouched: the backbone runs in eval mode.
        """
        config = self.config
        self.optimizer.zero_grad(set_to_none=True)
        plain = unwrap(self.model)
        if self.fast:
            with eval_mode(plain.backbone):
                crr, frr = self._stage2(images, labels)
        else:
            crr, frr = stage2_losses(plain.backbone, plain.fc, images, labels, config.set_size)
        loss2 = config.lambda_crr * crr + config.lambda_frr * frr
        self._step(loss2)
        return {"crr": crr.detach(), "frr": frr.detach(), "loss2": loss2.detach()}

    def state_dict(self) -> dict[str, Any]:
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


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
