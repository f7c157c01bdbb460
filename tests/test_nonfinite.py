"""Non-finite losses: the step is skipped (weights, momentum, BatchNorm statistics untouched), counted,
and too many in a row stop the run with one clear error; no checkpoint ever holds a NaN."""

from __future__ import annotations

import json

import pytest
import torch

from mmcam_fast import engine
from mmcam_fast.checkpoint import check_finite
from mmcam_fast.cli import run_main
from mmcam_fast.cli.train import main
from mmcam_fast.config import TrainConfig
from mmcam_fast.data.synthetic import make_synthetic
from mmcam_fast.engine import Trainer
from mmcam_fast.errors import MMCamError
from mmcam_fast.guards import NonFiniteGuard, NonFiniteLossError
from mmcam_fast.models import create_model


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 0, 0, 2, 2, 2])
    return [(torch.randn(6, 3, 32, 32, generator=generator), labels) for _ in range(count)]


def _poisoned(images: torch.Tensor) -> torch.Tensor:
    images = images.clone()
    images[1, 2, 3, 4] = float("inf")
    return images


def _trainer(**options) -> Trainer:
    torch.manual_seed(0)
    config = TrainConfig(set_size=3, sets_per_batch=2, lr=0.01, **{"impl": "reference", **options})
    return Trainer(create_model("resnet18", 3), config)


def _full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    for i, s in trainer.optimizer.state_dict()["state"].items():
        state[f"momentum.{i}"] = s["momentum_buffer"].clone()
    return state


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == [], f"{len(differ)} entries differ, first: {differ[:5]}"


@pytest.mark.parametrize("options", [
    {"impl": "reference"},  # foreach SGD: the host reads the flag
    {"impl": "fast", "amp": "off", "compile": False},  # fused SGD (the fast default): read on the device
], ids=["reference", "fused-sgd"])
def test_a_skipped_step_leaves_no_trace(options):
    """Training with an inf batch in between (first, then later) equals training without it."""
    fused = options["impl"] == "fast"
    batches = _batches()
    clean = _trainer(**options)
    for images, labels in batches:
        clean.train_step(images, labels)

    noisy = _trainer(**options)
    assert noisy._fused is bool(fused)
    noisy.train_step(_poisoned(batches[0][0]), batches[0][1])  # the very first step is skipped too
    assert noisy.guard.last.item() == 1.0
    for i, (images, labels) in enumerate(batches):
        noisy.train_step(images, labels)
        if i == 0:
            before = _full_state(noisy)
            metrics = noisy.train_step(_poisoned(images), labels)
            assert not torch.isfinite(metrics["ce"])
            _assert_same(_full_state(noisy), before)  # weights, momentum, BatchNorm statistics
    _assert_same(_full_state(noisy), _full_state(clean))
    assert noisy.guard.state_dict() == {"skipped": 2, "consecutive": 0}
    assert noisy.guard.last.item() == 0.0


def test_fp16_grad_scaler_skips_a_nonfinite_loss():
    trainer = _trainer(impl="fast", amp="fp16", compile=False)
    assert trainer.scaler.is_enabled()
    images, labels = _batches(1)[0]
    trainer.train_step(images, labels)
    before, scale = _full_state(trainer), trainer.scaler.get_scale()
    trainer.train_step(_poisoned(images), labels)
    _assert_same(_full_state(trainer), before)
    assert trainer.scaler.get_scale() < scale
    assert trainer.guard.state_dict()["skipped"] == 1


def test_guard_stops_after_the_configured_number_of_consecutive_steps():
    guard = NonFiniteGuard(3, torch.device("cpu"))
    for finite in (False, False, True, False, False):
        guard.record(torch.tensor(finite))
    assert guard.check(step=5) == 4  # never three in a row
    guard.record(torch.tensor(False))
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive .* --max-nonfinite-steps 3; stopped at "
                                                 r"step 6 \(5 step\(s\) skipped"):
        guard.check(step=6)
    never = NonFiniteGuard(0, torch.device("cpu"))
    for _ in range(50):
        never.record(torch.tensor(False))
    assert never.check(step=50) == 50


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    with pytest.raises(MMCamError, match="non-finite values in fc.weight"):
        check_finite({"fc.bias": torch.zeros(2), "fc.weight": torch.tensor([1.0, float("nan")]),
                      "steps": torch.tensor(3)}, tmp_path / "last.pt")


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return make_synthetic(tmp_path_factory.getbasetemp() / "synthetic-shared")


def _flags(out, data_root, *extra: str) -> list[str]:
    return ["--data", "synthetic", "--data-root", str(data_root), "--backbone", "resnet18",
            "--feature-stride", "16", "--image-size", "32", "--epochs", "1", "--max-steps-per-epoch", "3",
            "--sets-per-batch", "2", "--set-size", "3", "--impl", "reference", "--loader", "torch",
            "--workers", "0", "--log-every", "1", "--eval-every", "0", "--out", str(out), *extra]


def _nan_loss_at(calls: set[int] | None):
    """A Stage I loss that is NaN at the given calls (1-based; None: always)."""
    count = 0

    def loss(logits, labels):
        nonlocal count
        count += 1
        value = torch.nn.functional.cross_entropy(logits, labels)
        return value * float("nan") if calls is None or count in calls else value

    return loss


def test_run_with_a_nonfinite_step_skips_counts_and_keeps_finite_checkpoints(tmp_path, synthetic_root,
                                                                            monkeypatch, capsys):
    monkeypatch.setattr(engine, "stage1_loss", _nan_loss_at({2}))
    assert run_main(main, _flags(tmp_path, synthetic_root, "--checkpoint-every", "1")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped_steps"] == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0.0, 1.0, 0.0]
    assert "ce" not in rows[1]  # NaN values are left out of the log
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert last["nonfinite"] == {"skipped": 1, "consecutive": 0}
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_run_stops_after_too_many_consecutive_nonfinite_steps(tmp_path, synthetic_root, monkeypatch, capsys):
    monkeypatch.setattr(engine, "stage1_loss", _nan_loss_at(None))
    status = run_main(main, _flags(tmp_path, synthetic_root, "--checkpoint-every", "1",
                                   "--max-nonfinite-steps", "2"))
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "error: 2 consecutive training steps had a non-finite loss" in err and "stopped at step 2" in err
    # the checkpoint of step 1 (a skipped step) was written; none after the limit was reached
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert (last["step"], last["nonfinite"]["skipped"]) == (1, 1)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
