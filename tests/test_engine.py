"""The trainer step: Stage II moves fc.weight only; plain CAM skips Stage II; metrics log."""

from __future__ import annotations

import json

import torch

from mmcam_fast.config import TrainConfig
from mmcam_fast.engine import Trainer
from mmcam_fast.metric_log import MetricLog
from mmcam_fast.models import create_model


def _setup(lambda_crr=1.0, lambda_frr=1.0):
    torch.manual_seed(0)
    model = create_model("resnet18", 3)
    config = TrainConfig(set_size=2, sets_per_batch=2, lr=0.001, lambda_crr=lambda_crr, lambda_frr=lambda_frr,
                         impl="reference")
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 0, 2, 2])
    return model, Trainer(model, config), images, labels


def _snapshot(trainer):
    model_state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    opt_state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()}
    return model_state, opt_state


def test_stage2_step_changes_only_fc_weight_and_its_momentum():
    model, trainer, images, labels = _setup()
    trainer.stage1_step(images, labels)  # creates momentum buffers for every parameter
    trainer.stage1_step(images, labels)
    before_model, before_opt = _snapshot(trainer)
    trainer.stage2_step(images, labels)
    after_model, after_opt = _snapshot(trainer)
    changed = [k for k in before_model if not torch.equal(before_model[k], after_model[k])]
    assert changed == ["fc.weight"], changed
    fc_id = id(model.fc.weight)
    for pid, state in before_opt.items():
        for key, value in state.items():
            same = torch.equal(value, after_opt[pid][key])
            assert same != (pid == fc_id), f"optimizer state {key} of a parameter changed={not same}"


def test_plain_cam_runs_stage1_only():
    model, trainer, images, labels = _setup(0.0, 0.0)
    metrics = trainer.train_step(images, labels)
    assert set(metrics) == {"ce", "acc"}


def test_train_step_reduces_the_losses_over_steps():
    model, trainer, images, labels = _setup()
    first = trainer.train_step(images, labels)
    for _ in range(8):
        last = trainer.train_step(images, labels)
    assert last["ce"] < first["ce"]
    assert all(torch.isfinite(v) for v in last.values())


def test_classifier_group_has_ten_times_the_lr():
    model, trainer, _, _ = _setup()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["classifier"]["lr"] == 10 * groups["backbone"]["lr"]
    ids = {id(p) for p in groups["classifier"]["params"]}
    assert ids == {id(model.fc.weight), id(model.fc.bias)}


def test_metric_log_writes_every_step_at_the_interval(tmp_path):
    log = MetricLog(tmp_path / "m.jsonl", every=3)
    flushed = [log.add({"step": i}, {"ce": torch.tensor(float(i))}) for i in range(5)]
    assert flushed == [False, False, True, False, False]
    log.flush()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["ce"] for r in rows] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_loading_a_checkpoint_keeps_this_trainers_optimizer_kernel():
    """A reference (foreach) checkpoint resumed by the fast engine keeps fused SGD, and back."""
    model, reference, images, labels = _setup()
    reference.train_step(images, labels)
    fast = Trainer(create_model("resnet18", 3), TrainConfig(set_size=2, sets_per_batch=2, impl="fast",
                                                            compile=False))
    assert fast._fused and all(g["fused"] for g in fast.optimizer.param_groups)
    fast.load_state_dict(reference.state_dict())
    assert all(g["fused"] and not g["foreach"] for g in fast.optimizer.param_groups)
    reference.load_state_dict(fast.state_dict())
    assert all(g["foreach"] and not g["fused"] for g in reference.optimizer.param_groups)
    pairs = zip(reference.optimizer.param_groups[0]["params"], fast.optimizer.param_groups[0]["params"],
                strict=True)
    for p_ref, p_fast in pairs:
        torch.testing.assert_close(reference.optimizer.state[p_ref]["momentum_buffer"],
                                   fast.optimizer.state[p_fast]["momentum_buffer"])
