"""Stage II losses through the fused kernels (impl="triton", Triton interpreter) equal the reference path.

impl="reference" runs each fused op's plain-PyTorch reference (mmcam_kernels.*_ref); here the
whole Stage II (frozen eval-mode backbone, CAM masking, second backbone pass, CRR/FRR, backward into
fc.weight) runs both ways on a real ResNet18-CAM at a small input size.
"""

from __future__ import annotations

import mmcam_kernels
import pytest
import torch
from _checks import assert_close

from mmcam_fast.minmaxcam import stage2_losses
from mmcam_fast.models import create_model


def stage2_with_grad(model, images, labels, set_size, impl):
    model.zero_grad(set_to_none=True)
    crr, frr = stage2_losses(model.backbone, model.fc, images, labels, set_size, impl=impl)
    (crr + 10.0 * frr).backward()  # lambda_frr = 10: the paper's best VGG16 setting
    return crr.detach(), frr.detach(), model.fc.weight.grad.clone()


@pytest.mark.parametrize(
    "num_sets,set_size,size,channels_last",
    [
        pytest.param(2, 5, 64, False, id="N2-S5-64"),  # the paper's S=5; 4x4 feature maps
        pytest.param(3, 2, 72, True, id="N3-S2-72-channels_last"),  # 5x5 maps, channels-last activations
    ],
)
def test_stage2_triton_equals_reference(num_sets, set_size, size, channels_last, monkeypatch):
    calls = []
    for name in ("cam_mask", "set_regularizers"):  # count that the kernels really run
        original = getattr(mmcam_kernels, name)
        monkeypatch.setattr(mmcam_kernels, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    torch.manual_seed(0)
    num_classes = num_sets + 2  # two classes absent from the batch
    model = create_model("resnet18", num_classes)
    images = torch.randn(num_sets * set_size, 3, size, size)
    labels = torch.arange(num_sets).repeat_interleave(set_size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.to(memory_format=torch.channels_last)

    crr_ref, frr_ref, grad_ref = stage2_with_grad(model, images, labels, set_size, "reference")
    assert calls == []
    crr, frr, grad = stage2_with_grad(model, images, labels, set_size, "triton")
    assert calls == ["cam_mask", "set_regularizers"]

    assert crr_ref > 0 and frr_ref > 0 and grad_ref.abs().sum() > 0
    # fp32 through a real ResNet18-CAM twice (the masked pass): the convolutions' summation order
    # differs between the kernels' masked images and the reference's in the last bits, amplified
    # along the layers; 1e-4 is the engine's fp32 contract (tests/test_engine_fast.py)
    assert_close(crr, crr_ref, atol=1e-7, rtol=1e-4, what="CRR")
    assert_close(frr, frr_ref, atol=1e-7, rtol=1e-4, what="FRR")
    assert_close(grad, grad_ref, atol=1e-4 * float(grad_ref.abs().max()), rtol=1e-3, what="fc.weight grad")
    assert torch.all(grad[num_sets:] == 0), "classes absent from the batch get no gradient"
