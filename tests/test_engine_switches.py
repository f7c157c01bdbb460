"""The trainer's switches: which autocast dtype ``--amp`` resolves to, and when Stage II runs.

A tiny conv-BN-ReLU model and the reference step keep these fast; what is checked is the decision
(and that the step it selects really ran), not the numerics, which tests/test_engine_fast.py and
tests/interpret/test_engine_production.py cover.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmcam_fast import engine
from mmcam_fast.config import TrainConfig
from mmcam_fast.engine import Trainer, native_bf16, resolve_amp
from mmcam_fast.models.cam_model import CAMModel


def _tiny_model() -> CAMModel:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    return CAMModel(backbone, 16, 4)


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 24, 24, generator=gen), torch.tensor([0, 0, 0, 2, 2, 2])


# ---------------------------------------------------------------------------------------------
# --amp
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("device", "native", "expected"), [
    ("cpu", True, torch.bfloat16),  # AVX512-BF16 / AMX
    ("cpu", False, None),  # emulated bf16 is several times slower than fp32: no autocast
    ("cuda", True, torch.bfloat16),  # sm_80 and later
    ("cuda", False, torch.float16),  # older GPUs: fp16 (with a GradScaler)
])
def test_auto_amp_picks_bf16_exactly_where_it_is_native(monkeypatch, device, native, expected):
    asked = []
    monkeypatch.setattr(engine, "native_bf16", lambda device_type: asked.append(device_type) or native)
    assert resolve_amp("auto", device) == expected
    assert asked == [device], "auto must ask the hardware"


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_forced_amp_ignores_the_hardware(monkeypatch, device, native):
    monkeypatch.setattr(engine, "native_bf16", lambda device_type: native)
    assert resolve_amp("off", device) is None
    assert resolve_amp("fp16", device) == torch.float16
    assert resolve_amp("bf16", device) == torch.bfloat16


def test_native_bf16_asks_the_device_s_own_query(monkeypatch):
    for answer in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda answer=answer: answer)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda answer=not answer: answer)
        assert native_bf16("cpu") is answer
        assert native_bf16("cuda") is (not answer)
        assert native_bf16("mps") is False  # neither query speaks for other devices


def test_auto_amp_on_this_machine_follows_its_cpu():
    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    assert resolve_amp("auto", "cpu") == expected
    trainer = Trainer(_tiny_model(), TrainConfig(set_size=3, sets_per_batch=2, impl="fast", compile=False))
    assert trainer.amp_dtype == expected
    assert trainer.scaler.is_enabled() is False  # the scaler is for fp16 only


# ---------------------------------------------------------------------------------------------
# Stage II on or off
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("lambda_crr", "lambda_frr"), [(0.0, 1.0), (1.0, 0.0), (0.5, 2.0)],
                         ids=["frr-only", "crr-only", "both"])
def test_stage2_runs_when_either_lambda_is_set(lambda_crr, lambda_frr):
    # the study's crr0 / frr0 ablations: one regulariser alone is still MinMaxCAM, not plain CAM
    model = _tiny_model()
    trainer = Trainer(model, TrainConfig(set_size=3, sets_per_batch=2, lr=0.01, impl="reference",
                                         lambda_crr=lambda_crr, lambda_frr=lambda_frr))
    assert trainer.stage2_enabled
    images, labels = _batch()
    metrics = trainer.train_step(images, labels)
    assert set(metrics) == {"ce", "acc", "crr", "frr", "loss2"}
    expected = lambda_crr * metrics["crr"] + lambda_frr * metrics["frr"]
    assert float(metrics["loss2"]) == pytest.approx(float(expected), rel=1e-6)  # fp32 sum of two terms
    assert float(metrics["crr"]) > 0 and float(metrics["frr"]) > 0


def test_plain_cam_when_both_lambdas_are_zero():
    trainer = Trainer(_tiny_model(), TrainConfig(set_size=3, sets_per_batch=2, impl="reference",
                                                 lambda_crr=0.0, lambda_frr=0.0))
    assert not trainer.stage2_enabled
    assert set(trainer.train_step(*_batch())) == {"ce", "acc"}


def test_stage2_with_one_lambda_moves_fc_weight_beyond_stage1():
    """Stage I alone and Stage I + Stage II (FRR only) leave different fc.weights."""
    images, labels = _batch()
    weights = []
    for lambda_frr in (0.0, 1.0):
        model = _tiny_model()
        trainer = Trainer(model, TrainConfig(set_size=3, sets_per_batch=2, lr=0.01, impl="reference",
                                             lambda_crr=0.0, lambda_frr=lambda_frr))
        trainer.train_step(images, labels)
        weights.append(model.fc.weight.detach().clone())
    assert not torch.equal(weights[0], weights[1])


# ---------------------------------------------------------------------------------------------
# compilation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("compile_option", "compiled"), [(True, True), (False, False), (None, False)],
                         ids=["on", "off", "default-on-cpu"])
def test_compile_options(monkeypatch, compile_option, compiled):
    """Static shapes for both stages, Stage II whole (fullgraph); CUDA graphs only on CUDA."""
    calls = []
    record = lambda fn, **kwargs: calls.append((fn.__name__, kwargs)) or fn
    monkeypatch.setattr(engine.torch, "compile", record)
    trainer = Trainer(_tiny_model(), TrainConfig(set_size=3, sets_per_batch=2, impl="fast", amp="off",
                                                 compile=compile_option))
    if not compiled:
        assert calls == [] and trainer._stage2 == trainer._stage2_forward
        return
    assert calls == [("_stage1_forward", {"dynamic": False}),
                     ("_stage2_forward", {"fullgraph": True, "mode": None, "dynamic": False})]


@pytest.mark.parametrize(("impl", "channels_last", "expected"), [
    ("fast", True, torch.channels_last), ("fast", False, torch.contiguous_format),
    ("reference", True, torch.contiguous_format),  # the reference is plain eager PyTorch, whatever the flag
])
def test_memory_format(impl, channels_last, expected):
    trainer = Trainer(_tiny_model(), TrainConfig(set_size=3, sets_per_batch=2, impl=impl, amp="off",
                                                 compile=False, channels_last=channels_last))
    assert trainer.memory_format == expected


@pytest.mark.parametrize(("amp", "expected"), [
    ("off", torch.contiguous_format),  # fp32 on a CPU: oneDNN's fp32 channels-last is slower on AVX2
    ("bf16", torch.channels_last),  # under autocast channels-last is oneDNN's fast layout
])
def test_memory_format_by_default_follows_the_precision_on_cpu(amp, expected):
    trainer = Trainer(_tiny_model(), TrainConfig(set_size=3, sets_per_batch=2, impl="fast", amp=amp,
                                                 compile=False))
    assert trainer.memory_format == expected
    assert engine.resolve_channels_last(None, "cuda", None)
    assert not engine.resolve_channels_last(False, "cuda", None)


def test_build_optimizer_takes_fused_by_keyword_only():
    model = _tiny_model()
    with pytest.raises(TypeError):
        engine.build_optimizer(model, TrainConfig(), True)
    assert engine.build_optimizer(model, TrainConfig(), fused=False).defaults["foreach"] is True
