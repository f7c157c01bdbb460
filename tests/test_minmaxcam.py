"""The reference Stage II losses against an independent explicit-pair, per-image-loop implementation."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from mmcam_fast.minmaxcam import CAM_EPS, stage1_loss, stage2_losses
from mmcam_fast.models import create_model


class TinyBackbone(nn.Module):
    """conv-BN-ReLU x2, stride 4: small enough for fp64 loops, with BatchNorm to test eval mode."""

    def __init__(self, k: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, k, 3, stride=2, padding=1), nn.BatchNorm2d(k), nn.ReLU())

    def forward(self, x):
        return self.body(x)


def _randomize_bn(module: nn.Module, gen: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=m.running_mean.dtype) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=m.running_var.dtype) + 0.5)


def bilinear_upsample_loop(small: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Bilinear resize with align_corners=False written out per output pixel (half-pixel centres)."""
    h, w = small.shape
    out = small.new_zeros(out_h, out_w)
    for i in range(out_h):
        sy = max((i + 0.5) * h / out_h - 0.5, 0.0)
        y0 = min(int(math.floor(sy)), h - 1)
        y1 = min(y0 + 1, h - 1)
        ly = sy - y0
        for j in range(out_w):
            sx = max((j + 0.5) * w / out_w - 0.5, 0.0)
            x0 = min(int(math.floor(sx)), w - 1)
            x1 = min(x0 + 1, w - 1)
            lx = sx - x0
            out[i, j] = ((1 - ly) * ((1 - lx) * small[y0, x0] + lx * small[y0, x1])
                         + ly * ((1 - lx) * small[y1, x0] + lx * small[y1, x1]))
    return out


def explicit_stage2(backbone, weight, images, labels, set_size):
    """docs/method.md Stage II, one image at a time, CRR over explicit pairs i<j."""
    backbone = copy.deepcopy(backbone).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    feats, f_o, f = [], [], []
    for b in range(images.shape[0]):
        with torch.no_grad():
            fmap = backbone(images[b:b + 1])[0]  # [K, h, w]
        feats.append(fmap)
        f_o.append(fmap.mean(dim=(1, 2)))
        cam = sum(weight[labels[b], k] * fmap[k] for k in range(fmap.shape[0]))
        norm = (cam - cam.min()) / (cam.max() - cam.min() + CAM_EPS)
        up = bilinear_upsample_loop(norm, images.shape[2], images.shape[3])
        masked = images[b] * up
        f.append(backbone(masked[None])[0].mean(dim=(1, 2)))
    n_sets = images.shape[0] // set_size
    crr = 0.0
    for n in range(n_sets):
        pairs = list(itertools.combinations(range(n * set_size, (n + 1) * set_size), 2))
        crr = crr + sum(((f[i] - f[j]) ** 2).mean() for i, j in pairs) / len(pairs)
    crr = crr / n_sets
    frr = sum(((f[b] - f_o[b]) ** 2).mean() for b in range(images.shape[0])) / images.shape[0]
    return crr, frr


@pytest.mark.parametrize("num_sets,set_size,k,size", [
    (1, 2, 4, 12),    # one set, the smallest set
    (2, 5, 8, 16),    # the paper's S=5
    (3, 3, 6, 13),    # odd input size: feature map 4x4 upsampled to 13x13
])
def test_stage2_reference_matches_explicit_loop(num_sets, set_size, k, size):
    gen = torch.Generator().manual_seed(num_sets * 100 + set_size)
    backbone = TinyBackbone(k).double()
    _randomize_bn(backbone, gen)
    fc = nn.Linear(k, num_sets + 2).double()
    images = torch.randn(num_sets * set_size, 3, size, size, generator=gen, dtype=torch.float64)
    labels = torch.arange(num_sets).repeat_interleave(set_size)

    crr, frr = stage2_losses(backbone, fc, images, labels, set_size)
    grad = torch.autograd.grad(crr + 0.5 * frr, fc.weight)[0]

    w = fc.weight.detach().clone().requires_grad_(True)
    crr_ref, frr_ref = explicit_stage2(backbone, w, images, labels, set_size)
    grad_ref = torch.autograd.grad(crr_ref + 0.5 * frr_ref, w)[0]

    # float64 throughout (unit roundoff 1.1e-16): the losses pass two backbone passes and a min-max
    # division whose amplification is max|CAM| / range; the gradient also differences nearly equal
    # features (CRR), which costs up to two more orders
    torch.testing.assert_close(crr, crr_ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(frr, frr_ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-8, atol=1e-12)
    assert grad.abs().sum() > 0, "the losses must reach fc.weight"
    # Rows of classes absent from the batch get no gradient.
    assert torch.all(grad[num_sets:] == 0)


def test_stage2_only_fc_weight_gets_gradient_and_mode_is_restored():
    model = create_model("resnet18", 3)
    model.train()
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 0, 1, 1])
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    crr, frr = stage2_losses(model.backbone, model.fc, images, labels, 2)
    (crr + frr).backward()
    assert model.training and model.backbone.training
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0
    others = [n for n, p in model.named_parameters() if p.grad is not None and n != "fc.weight"]
    assert others == [], f"parameters other than fc.weight got gradients: {others[:5]}"
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), f"{key} changed in a Stage II forward"


def test_constant_cam_gives_finite_zero_mask():
    backbone = TinyBackbone(4).double()
    fc = nn.Linear(4, 2).double()
    with torch.no_grad():
        fc.weight.zero_()  # every CAM is the constant 0
    images = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    crr, frr = stage2_losses(backbone, fc, images, torch.tensor([0, 0, 1, 1]), 2)
    (crr + frr).backward()
    assert torch.isfinite(crr) and torch.isfinite(frr)
    assert torch.isfinite(fc.weight.grad).all()


@pytest.mark.parametrize("batch,set_size", [(6, 4), (5, 1)])
def test_stage2_rejects_bad_set_layout(batch, set_size):
    backbone = TinyBackbone(4)
    with pytest.raises(ValueError, match="set_size"):
        stage2_losses(backbone, nn.Linear(4, 2), torch.randn(batch, 3, 8, 8),
                      torch.zeros(batch, dtype=torch.long), set_size)


def test_stage1_loss_is_mean_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    expected = (-torch.log_softmax(logits, 1)[0, 0] - torch.log_softmax(logits, 1)[1, 0]) / 2
    torch.testing.assert_close(stage1_loss(logits, labels), expected)


def test_feature_masking_ablation_matches_explicit_formula():
    # Table 3's ablation: f = g(F * H), H the min-max CAM at the feature map's resolution
    gen = torch.Generator().manual_seed(3)
    backbone = TinyBackbone(6).double()
    _randomize_bn(backbone, gen)
    fc = nn.Linear(6, 4).double()
    images = torch.randn(6, 3, 16, 16, generator=gen, dtype=torch.float64)
    labels = torch.tensor([1, 1, 1, 3, 3, 3])
    crr, frr = stage2_losses(backbone, fc, images, labels, 3, mask="feature")
    crr.backward(retain_graph=True)
    grad_crr = fc.weight.grad.clone()
    assert fc.bias.grad is None and all(p.grad is None for p in backbone.parameters())
    weight = fc.weight.detach().clone().requires_grad_(True)
    with torch.no_grad():
        fmaps = copy.deepcopy(backbone).eval()(images)
    f, f_o = [], []
    for b in range(6):
        cam = sum(weight[labels[b], k] * fmaps[b, k] for k in range(6))
        h = (cam - cam.min()) / (cam.max() - cam.min() + CAM_EPS)
        f.append((fmaps[b] * h).mean(dim=(1, 2)))
        f_o.append(fmaps[b].mean(dim=(1, 2)))
    pairs = [(i, j) for n in range(2) for i, j in itertools.combinations(range(3 * n, 3 * n + 3), 2)]
    want_crr = sum(((f[i] - f[j]) ** 2).mean() for i, j in pairs) / len(pairs)
    want_frr = sum(((f[b] - f_o[b]) ** 2).mean() for b in range(6)) / 6
    torch.testing.assert_close(crr, want_crr)
    torch.testing.assert_close(frr, want_frr)
    (want_grad,) = torch.autograd.grad(want_crr, weight)
    torch.testing.assert_close(grad_crr, want_grad)
    # and it differs from masking the image
    assert not torch.isclose(crr, stage2_losses(backbone, fc, images, labels, 3)[0])
    with pytest.raises(ValueError, match="mask='pixels'"):
        stage2_losses(backbone, fc, images, labels, 3, mask="pixels")
