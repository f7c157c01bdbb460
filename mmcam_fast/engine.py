"""The trainer: one step is Stage I (classification, all parameters) then Stage II (CRR/FRR, fc.weight).

The trainer owns the optimizer and the schedule; the method's losses come from
:mod:`mmcam_fast.minmaxcam`. Per-step metrics stay on the device and are read by :class:`MetricLog`
at the log interval only, so a step has no host synchronisation.

Under torchrun the model is wrapped in DistributedDataParallel, which averages Stage I's gradients.
Stage II calls the unwrapped backbone with detached parameters (``torch.func.functional_call``), so
DDP never sees its backward: its one gradient, fc.weight's, is averaged over the ranks explicitly,
the same way DDP averages its buckets. A step whose loss is not finite on some rank is skipped on
every rank and counted (:mod:`mmcam_fast.guards`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmcam_fast import distributed, ops
from mmcam_fast.config import TrainConfig
from mmcam_fast.guards import BufferSnapshot, NonFiniteGuard
from mmcam_fast.minmaxcam import eval_mode, stage1_loss, stage2_core, stage2_losses
from mmcam_fast.models import unwrap
from mmcam_fast.models.backbones import NEW_LAYERS
from mmcam_fast.models.folding import FoldedBackbone


def build_optimizer(model: nn.Module, config: TrainConfig, *, fused: bool | None = None) -> torch.optim.SGD:
    """SGD (Nesterov momentum, weight decay) with the new layers (fc, conv6) at lr x classifier_lr_mult.

    ``fused`` None: torch's fused kernel for the fast engine (CUDA and CPU), foreach for the reference.
    """
    model = unwrap(model)
    new, pretrained = [], []
    for name, param in model.named_parameters():
        is_new = name.startswith("fc.") or name.removeprefix("backbone.").startswith(NEW_LAYERS)
        (new if is_new else pretrained).append(param)
    groups = [{"params": pretrained, "lr": config.lr, "name": "backbone"},
              {"params": new, "lr": config.lr * config.classifier_lr_mult, "name": "classifier"}]
    # fused SGD (one pass over each parameter instead of foreach's four; measured on ResNet50-CAM's
    # parameters on CPU: 7 ms against 33 ms a step), foreach for the reference; both skip parameters
    # whose gradient is None, which is what keeps Stage II away from everything but fc.weight.
    if fused is None:
        fused = config.impl == "fast" and next(model.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.weight_decay, foreach=None if fused else True,
                           fused=True if fused else None)


def native_bf16(device_type: str) -> bool:
    """Whether bf16 is a hardware format here (CUDA >= sm_80; CPUs with AVX512-BF16 or AMX)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    # Without AVX512-BF16/AMX oneDNN emulates bf16, which is several times slower than fp32.
    return device_type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


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


def resolve_channels_last(channels_last: bool | None, device_type: str,
                          amp_dtype: torch.dtype | None) -> bool:
    """The fast engine's memory format: ``--channels-last`` / ``--no-channels-last``, else (None) on
    CUDA and under autocast on a CPU, and off for fp32 on a CPU. Measured with oneDNN limited to AVX2
    (``ONEDNN_MAX_CPU_ISA=AVX2``, one thread; docs/engine.md): fp32 channels-last made a ResNet50-CAM
    step at 224 0.89-1.00x the reference's speed and its contiguous form 1.00-1.04x (two runs); on an
    AVX2-only machine channels-last measured 0.65x. With native bf16 channels-last is oneDNN's fast layout.
    """
    if channels_last is not None:
        return channels_last
    return device_type == "cuda" or amp_dtype is not None


class Trainer:
    """MinMaxCAM training step and the state that survives a restart.

    Two implementations of the same step (``config.impl``):

    - ``"reference"``: plain eager PyTorch in fp32, :func:`mmcam_fast.minmaxcam.stage2_losses`.
    - ``"fast"``: channels-last, autocast (bf16 by default, fp16 with a GradScaler on request),
      Stage I and Stage II computations compiled with ``torch.compile`` (Stage II whole, with
      ``fullgraph=True``; on CUDA in ``reduce-overhead`` mode, i.e. captured in CUDA graphs and
      replayed), Stage II's eval-mode BatchNorm folded into the convolutions
      (:mod:`mmcam_fast.models.folding`), Stage II's CAM/mask and set distances through
      :mod:`mmcam_fast.ops` (fused Triton kernels on CUDA), fused SGD.

    Under torchrun (a process group of several ranks) the model is wrapped here, after the
    fast engine's memory-format change and before compilation: ``trainer.model`` is then the
    DistributedDataParallel wrapper (``unwrap(trainer.model)`` is the model passed in).

    A step whose loss is NaN or infinite on any rank is skipped on every rank (no parameter,
    momentum or BatchNorm statistic changes) and counted by ``trainer.guard``.

    Args:
        model: a :class:`~mmcam_fast.models.CAMModel` (or a DDP wrapper of one), on its device.
        config: the run's configuration (lambdas, set size, optimizer settings, impl).
    """

    def __init__(self, model: nn.Module, config: TrainConfig):
        self.config = config
        self.device = next(model.parameters()).device
        self.fast = config.impl == "fast"
        self.amp_dtype = resolve_amp(config.amp, self.device.type) if self.fast else None
        self.memory_format = (torch.channels_last
                              if self.fast and resolve_channels_last(config.channels_last, self.device.type,
                                                                     self.amp_dtype)
                              else torch.contiguous_format)
        if self.fast:  # before DDP: its gradient buckets take the parameters' layout at wrapping
            unwrap(model).to(memory_format=self.memory_format)
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            model = distributed.wrap(model, self.device, sync_bn=config.sync_bn)
        self.model = model
        self.optimizer = build_optimizer(model, config)
        self._fused = bool(self.optimizer.defaults.get("fused"))
        if self._fused:
            # The fused kernel skips a step on the device when found_inf is set, but on the very
            # first step it would leave uninitialised momentum buffers behind; zero buffers give the
            # same first update (buf = 0.9 * 0 + g = g, dampening 0) and make every step a later one.
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    self.optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
        self.guard = NonFiniteGuard(config.max_nonfinite_steps, self.device)
        self._buffers = BufferSnapshot(unwrap(model))
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma)
        self.stage2_enabled = config.lambda_crr > 0 or config.lambda_frr > 0
        # Stage II's eval-mode BatchNorm folded into the convolutions, under autocast only: in fp32
        # the folded form loses digits where a running mean is large against the spread (measured:
        # FRR 4e-4 relative off the reference after 6 ResNet18 steps, against 1.5e-5 unfolded),
        # which bf16 rounding (4e-3) hides. Built after wrapping (--sync-bn replaces BatchNorms);
        # None when off, for the reference, in fp32, or when the backbone has nothing to fold.
        self.folded = (FoldedBackbone.build(unwrap(model).backbone)
                       if self.fast and config.fold_bn and self.amp_dtype is not None else None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self._stage1 = self._stage1_forward
        self._stage2 = self._stage2_forward
        if self.fast:
            self.kernels = ops.resolve_impl(None, self.device)
            if config.compile or (config.compile is None and self.device.type == "cuda"):
                self._stage1 = torch.compile(self._stage1_forward, dynamic=False)
                # Static shapes every step (set batches): on CUDA the frozen-backbone pass, forward
                # and input-gradient backward, is captured once in CUDA graphs and replayed.
                # Parameters are static-address inputs of the graphs and the optimizer updates them
                # in place, so a replay reads Stage I's new weights: no re-capture is needed.
                mode = "reduce-overhead" if self.device.type == "cuda" and config.cuda_graphs else None
                self._stage2 = torch.compile(self._stage2_forward, fullgraph=True, mode=mode, dynamic=False)
        # The step's two implementations, chosen here once: the stages call these.
        self._stage1_losses = self._stage1 if self.fast else self._reference_stage1
        self._stage2_losses = self._fast_stage2 if self.fast else self._reference_stage2

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
        backbone = self.folded.module if self.folded is not None else plain.backbone
        with self._autocast():
            return stage2_core(backbone, plain.fc.weight, images, labels, self.config.set_size,
                               kernels=self.kernels, mask=self.config.stage2_mask)

    def _reference_stage1(self, images: torch.Tensor, labels: torch.Tensor):
        logits, _ = self.model(images)
        return stage1_loss(logits, labels), logits

    def _reference_stage2(self, images: torch.Tensor, labels: torch.Tensor):
        plain = unwrap(self.model)
        return stage2_losses(plain.backbone, plain.fc, images, labels, self.config.set_size,
                             mask=self.config.stage2_mask)

    def _fast_stage2(self, images: torch.Tensor, labels: torch.Tensor):
        if self.folded is not None:
            # Stage I's new weights and BatchNorm statistics into the folded convolutions (in
            # place); kept in bf16 under bf16 autocast (no cast per pass), in fp32 under fp16
            # autocast (a folded weight could overflow fp16 where a BatchNorm variance is tiny).
            self.folded.refresh(torch.bfloat16 if self.amp_dtype == torch.bfloat16 else None)
        with eval_mode(unwrap(self.model).backbone):
            return self._stage2(images, labels)

    def _step(self, loss: torch.Tensor, average: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """Backward and optimizer step, skipped on every rank if the loss is not finite on one.

        Args:
            loss: the scalar loss.
            average: parameters whose gradients DDP does not reduce (Stage II's fc.weight); their
                gradients are averaged over the ranks before the step.

        Returns:
            A bool scalar on the device: True when the step was taken.
        """
        finite = distributed.all_true(torch.isfinite(loss.detach()))
        if self.scaler.is_enabled():
            # NaN gradients on every rank when some rank's loss is not finite: the scaler then skips
            # the step everywhere (and lowers its scale), as for an overflow.
            loss = loss * torch.where(finite, 1.0, float("nan"))
        self.scaler.scale(loss).backward()
        distributed.average_gradients(list(average))
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self._fused:  # the fused kernel reads the flag on the device: no host synchronisation
            self.optimizer.found_inf = (~finite).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif finite:  # one host read: free on CPU, the reference step's simplicity elsewhere
            self.optimizer.step()
        return finite

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One mini-batch: Stage I step over all parameters, then Stage II step over fc.weight.

        Returns detached device tensors (ce, acc, crr, frr, loss2); nothing is read back to the host.
        A stage whose loss is not finite skips its update; the step is then counted in
        ``self.guard`` (``self.guard.last`` is 1.0 for a skipped step).
        """
        images = images.contiguous(memory_format=self.memory_format)
        metrics, finite = self._stage1_update(images, labels)
        if self.stage2_enabled:  # lambda_crr = lambda_frr = 0 is plain CAM
            metrics2, finite2 = self._stage2_update(images, labels)
            metrics.update(metrics2)
            finite = finite & finite2
        self.guard.record(finite)
        return metrics

    def stage1_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage I: classification loss, backward, step over every parameter (train mode)."""
        return self._stage1_update(images, labels)[0]

    def _stage1_update(self, images: torch.Tensor, labels: torch.Tensor
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self._buffers.save()  # the forward pass moves BatchNorm statistics; a skipped step undoes it
        ce, logits = self._stage1_losses(images, labels)
        finite = self._step(ce)
        self._buffers.restore_unless(finite)
        return {"ce": ce.detach(), "acc": (logits.detach().argmax(1) == labels).float().mean()}, finite

    def stage2_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage II: CRR/FRR through the frozen backbone, backward into fc.weight only, step.

        With ``stage2_step="fc_weight"`` (the paper recipe) every gradient is None after zero_grad;
        the Stage II losses give fc.weight the only one, and SGD skips parameters without a
        gradient, so their values and momentum buffers stay bit-identical. With ``"all"`` (the
        authors recipe) the other gradients are zeros and the step moves them by weight decay and
        momentum, as the released code's step does. BatchNorm buffers are untouched: the backbone runs
        in eval mode. Under DDP the fc.weight gradient is averaged over the ranks here (DDP's reducer
        does not see this backward).
        """
        return self._stage2_update(images, labels)[0]

    def _stage2_update(self, images: torch.Tensor, labels: torch.Tensor
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        config = self.config
        # "fc_weight" (the paper): every gradient None, so SGD moves fc.weight (and its momentum)
        # alone. "all" (the released code, under the PyTorch 1.x it was written for, where
        # zero_grad() zeroed the gradients in place): Stage I's gradients become zeros, so the step
        # applies weight decay and Nesterov momentum to every parameter that has one.
        self.optimizer.zero_grad(set_to_none=config.stage2_step != "all")
        plain = unwrap(self.model)
        crr, frr = self._stage2_losses(images, labels)
        loss2 = config.lambda_crr * crr + config.lambda_frr * frr
        finite = self._step(loss2, average=(plain.fc.weight,))
        if self._stage2 is not self._stage2_forward and self.device.type == "cuda" and config.cuda_graphs:
            # Outputs of a CUDA-graph replay live in the graph's memory and are overwritten by the
            # next replay; MetricLog keeps them for --log-every steps, so it gets copies (scalars).
            crr, frr = crr.detach().clone(), frr.detach().clone()
        return {"crr": crr.detach(), "frr": frr.detach(), "loss2": loss2.detach()}, finite

    def state_dict(self) -> dict[str, Any]:
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "nonfinite": self.guard.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        # torch restores each group's settings from the checkpoint, kernel choice included; a run
        # saved by another engine or on another device keeps this trainer's (fused SGD reads the
        # skip flag on the device, foreach does not look at it).
        kernels = [{key: group.get(key) for key in ("fused", "foreach")}
                   for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, keys in zip(self.optimizer.param_groups, kernels, strict=True):
            group.update(keys)
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if "nonfinite" in state:
            self.guard.load_state_dict(state["nonfinite"])
