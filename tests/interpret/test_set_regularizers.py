"""The fused set_regularizers kernels (Triton interpreter) against set_regularizers_ref: CRR, FRR, dL/df."""

from __future__ import annotations

import pytest
import torch
from _checks import assert_close, assert_within_torch_error
from mmcam_kernels import SetRegularizersFunction, set_regularizers, set_regularizers_ref

# (dtype, atol for the losses, atol for dL/df relative to its max); fp32 tight, half: flash rule.
# fp32: the losses are sums of B*K squares (1e-6 absolute on losses of order 1e-2 to 1, rtol 1e-5:
# ~100 fp32 roundings of headroom); half: the kernels read the same half values and sum in fp32, so
# only the output's one rounding to bf16 (2^-8 ~ 4e-3 relative, 1e-3 absolute on losses < 0.3) or
# fp16 (2^-11 ~ 5e-4, 1e-4 absolute) remains, plus twice PyTorch's own error in that dtype.
DTYPES = [
    pytest.param(torch.float32, 1e-6, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-3, 1e-3, id="bf16"),
    pytest.param(torch.float16, 1e-4, 1e-3, id="fp16"),
]

# (B, K, S)
SHAPES = [
    pytest.param(2, 64, 2, id="B2-K64-S2"),  # one set, the smallest set
    pytest.param(10, 1024, 5, id="B10-K1024-S5"),  # the paper's S=5, two sets
    pytest.param(10, 2048, 2, id="B10-K2048-S2"),  # five sets of two
    pytest.param(5, 100, 5, id="B5-K100-S5"),  # one set, K not a multiple of the block (masked tail)
    pytest.param(100, 16, 5, id="B100-K16-S5"),  # twenty sets, K smaller than a block
]

CRR_WEIGHT, FRR_WEIGHT = 0.7, 1.3  # distinct, so swapped CRR/FRR gradients would show


def make_inputs(batch, channels, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Features of one set are similar (as for one class), the originals close to them: realistic
    # magnitudes for the differences that CRR and FRR square.
    base = torch.randn(batch, channels, generator=gen).relu()
    f = base + 0.1 * torch.randn(batch, channels, generator=gen)
    f_orig = base + 0.05 * torch.randn(batch, channels, generator=gen)
    return f.to(dtype), f_orig.to(dtype)


def losses_and_grad(fn, f, f_orig, set_size, **kwargs):
    f = f.clone().requires_grad_(True)
    crr, frr = fn(f, f_orig, set_size, **kwargs)
    (CRR_WEIGHT * crr + FRR_WEIGHT * frr).backward()
    return crr.detach(), frr.detach(), f.grad


@pytest.mark.parametrize("dtype,loss_atol,grad_atol", DTYPES)
@pytest.mark.parametrize("batch,channels,set_size", SHAPES)
def test_set_regularizers_match_reference(batch, channels, set_size, dtype, loss_atol, grad_atol):
    f, f_orig = make_inputs(batch, channels, dtype)
    crr, frr, grad = losses_and_grad(set_regularizers, f, f_orig, set_size)
    crr_ref, frr_ref, grad_ref = losses_and_grad(set_regularizers_ref, f, f_orig, set_size)
    assert crr.dtype == frr.dtype == torch.float32 and grad.dtype == dtype
    assert crr_ref > 0 and frr_ref > 0
    grad_scale = float(grad_ref.float().abs().max())
    if dtype == torch.float32:
        assert_close(crr, crr_ref, atol=loss_atol, rtol=1e-5, what="CRR")
        assert_close(frr, frr_ref, atol=loss_atol, rtol=1e-5, what="FRR")
        assert_close(grad, grad_ref, atol=grad_atol * grad_scale, rtol=1e-4, what="dL/df")
    else:
        crr_t, frr_t, grad_t = losses_and_grad(set_regularizers_ref, f, f_orig, set_size, compute_dtype=dtype)
        assert_within_torch_error(crr, crr_ref, crr_t, atol=loss_atol, what="CRR")
        assert_within_torch_error(frr, frr_ref, frr_t, atol=loss_atol, what="FRR")
        assert_within_torch_error(grad, grad_ref, grad_t, atol=grad_atol * grad_scale, what="dL/df")


def test_f_orig_is_a_constant():
    f, f_orig = make_inputs(4, 32, torch.float32)
    f_orig.requires_grad_(True)
    f.requires_grad_(True)
    crr, frr = set_regularizers(f, f_orig, 2)
    (crr + frr).backward()
    assert f.grad is not None and f_orig.grad is None


def test_strided_inputs_and_expanded_gradient():
    # f a non-contiguous view (every other column), f_orig transposed storage; the incoming gradient
    # of the [CRR, FRR] vector is the stride-0 expansion that .sum() produces (VERIFY.md trap (a)).
    f_full, f_orig = make_inputs(6, 96, torch.float32, seed=2)
    f = f_full[:, ::2].detach().requires_grad_(True)
    f_orig_t = f_orig[:, :48].t().contiguous().t()
    assert not f.is_contiguous() and not f_orig_t.is_contiguous()
    losses = SetRegularizersFunction.apply(f, f_orig_t, 3)
    seen = []
    losses.register_hook(lambda g: seen.append(g.stride()))
    losses.sum().backward()
    assert seen == [(0,)], f"the incoming gradient is not stride-0 ({seen}): the case is not tested"

    f_ref = f.detach().clone().requires_grad_(True)
    crr_ref, frr_ref = set_regularizers_ref(f_ref, f_orig_t, 3)
    (crr_ref + frr_ref).backward()
    assert_close(losses, torch.stack([crr_ref, frr_ref]), atol=1e-6, rtol=1e-5, what="[CRR, FRR]")
    assert_close(f.grad, f_ref.grad, atol=1e-5 * float(f_ref.grad.abs().max()), rtol=1e-4, what="dL/df")


def test_backward_tail_block_writes_only_its_own_row():
    # K one block and a 3-wide tail: the last K block of each row must stop at column K - 1. A mask
    # that let column K through would write row s's tail gradient into row s + 1's column 0 after
    # the first block had written it (programs run block by block), and past the end of the buffer
    # for the last row. fp32 with B * K * 4 bytes a multiple of 16: such a write past the end would
    # land in the allocation's slack, so the wrong values fail the comparison instead of a crash.
    from mmcam_kernels import KERNEL_CONFIGS

    block = KERNEL_CONFIGS["_set_regularizers_bwd_kernel"].meta["BLOCK_K"]
    f, f_orig = make_inputs(4, block + 3, torch.float32, seed=3)
    f[:, 0] += torch.arange(4.0)  # column 0 differs from row to row: a stray write shows
    crr, frr, grad = losses_and_grad(set_regularizers, f, f_orig, 2)
    crr_ref, frr_ref, grad_ref = losses_and_grad(set_regularizers_ref, f, f_orig, 2)
    # fp32 against fp32: two-pass sums of B * K = 2 * 515 squares in either order, rounding ~1e-7
    assert_close(torch.stack([crr, frr]), torch.stack([crr_ref, frr_ref]), atol=1e-6, rtol=1e-5,
                 what="[CRR, FRR]")
    assert_close(grad, grad_ref, atol=1e-5 * float(grad_ref.abs().max()), rtol=1e-4, what="dL/df")
