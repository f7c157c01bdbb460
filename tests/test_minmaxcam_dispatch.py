"""Which code Stage II runs for each ``impl``: every impl goes through mmcam_fast.ops, the one dispatch
point, with the impl it was given ("reference": each op's plain-PyTorch reference; None: the ops' rule).

The paths give the same numbers on CPU (the ops resolve to the references there), so comparing values
cannot tell them apart: the calls are recorded instead.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmcam_fast import ops
from mmcam_fast.minmaxcam import stage2_core, stage2_losses


def _setup():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU())
    fc = nn.Linear(6, 3)
    images = torch.randn(4, 3, 12, 10)
    labels = torch.tensor([0, 0, 2, 2])
    return backbone, fc, images, labels


@pytest.fixture
def calls(monkeypatch):
    """Records the Stage II functions called, with the ``impl`` the ops were given."""
    seen = []
    for name in ("cam_mask", "set_regularizers"):
        original = getattr(ops, name)

        def record(*args, impl=None, _f=original, _n=name):
            seen.append((f"ops.{_n}", impl))
            return _f(*args, impl="reference")  # the plain ops: no interpreter needed here

        monkeypatch.setattr(ops, name, record)
    return seen


@pytest.mark.parametrize(("impl", "expected"), [
    ("reference", [("ops.cam_mask", "reference"), ("ops.set_regularizers", "reference")]),
    (None, [("ops.cam_mask", None), ("ops.set_regularizers", None)]),  # ops' rule decides
    ("triton", [("ops.cam_mask", "triton"), ("ops.set_regularizers", "triton")]),
])
def test_stage2_losses_take_the_path_impl_names(calls, impl, expected):
    backbone, fc, images, labels = _setup()
    crr, frr = stage2_losses(backbone, fc, images, labels, 2, impl=impl)
    assert calls == expected
    reference = stage2_losses(backbone, fc, images, labels, 2, impl="reference")
    # fp32, the same operations in both paths up to their order: a few ulps of values of order 1
    torch.testing.assert_close(torch.stack([crr, frr]), torch.stack(reference), rtol=1e-5, atol=1e-7)


def test_stage2_core_with_reference_kernels_runs_the_ops_references(calls):
    backbone, fc, images, labels = _setup()
    stage2_core(backbone.eval(), fc.weight, images, labels, 2, kernels="reference")
    assert calls == [("ops.cam_mask", "reference"), ("ops.set_regularizers", "reference")]
    calls.clear()
    stage2_core(backbone, fc.weight, images, labels, 2, kernels=None)
    assert calls == [("ops.cam_mask", None), ("ops.set_regularizers", None)]


def test_an_unknown_impl_is_refused():
    backbone, fc, images, labels = _setup()
    with pytest.raises(ValueError, match="impl='fast' is not a kernel implementation; choose one of "
                                         "'reference', 'triton'"):
        stage2_losses(backbone, fc, images, labels, 2, impl="fast")
