"""Fused set regularizers of MinMaxCAM (Stage II step 8): CRR and FRR in one pass over the features.

With mse(a, b) = mean over the K dims of (a - b)^2 and the batch in set-major order (N sets of S):
    CRR = mean over sets n of ( mean over pairs i < j in set n of mse(f_i, f_j) )
    FRR = mean over samples b of mse(f_b, f_o_b)                  (f_o is a constant)
CRR uses the identity  mean over pairs ||f_i - f_j||^2 = 2/(S-1) * sum_i ||f_i - mean(f)||^2,
which is O(S*K) per set instead of O(S^2*K), so
    CRR = 2 / (N (S-1) K) * sum_n sum_i ||f_i - mean_n||^2,     FRR = 1 / (B K) * sum_b ||f_b - f_o_b||^2
    dCRR/df_i = 4 / (N (S-1) K) * (f_i - mean_n),                dFRR/df_b = 2 / (B K) * (f_b - f_o_b)
(the mean's own dependence on f_i cancels because the deviations sum to zero).

Forward kernel, grid (N, K blocks): the scaled partial sums of one set and K block into an fp32
buffer [N, K blocks, 2], summed afterwards (deterministic, no atomics). Backward kernel, same grid:
writes dL/df for the set's S rows. Both take the set mean in a first pass over the S rows and the
deviations in a second one (two-pass, not sum-of-squares, so no cancellation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._launch import block_size, check_float_dtype, check_same_device, config, launch

MIN_SET_SIZE = 2  # CRR compares pairs within a set; the one bound (mmcam_fast.config validates with it)


def check_set_batch(batch_size: int, set_size: int) -> None:
    """Raise ValueError unless the batch holds whole sets of ``set_size >= MIN_SET_SIZE`` samples."""
    if set_size < MIN_SET_SIZE:
        raise ValueError(
            f"set_size must be at least {MIN_SET_SIZE} (CRR compares pairs within a set), "
            f"got set_size={set_size}"
        )
    if batch_size % set_size != 0:
        raise ValueError(
            f"set_size={set_size} does not divide the batch of {batch_size} samples: the batch must hold "
            "whole sets of set_size images in set-major order"
        )


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@config(num_warps=4, BLOCK_K=512)
@triton.jit(do_not_specialize=["set_size"])
def _set_regularizers_fwd_kernel(
    f_ptr,  # [B, K] features of the masked images (fp32/bf16/fp16)
    f_orig_ptr,  # [B, K] features of the original images, a constant
    partial_ptr,  # [N, K blocks, 2] fp32 out: scaled (CRR, FRR) partial sums
    set_size,
    K,
    stride_fb,
    stride_fk,
    stride_ob,
    stride_ok,
    crr_scale,  # 2 / (N (S-1) K)
    frr_scale,  # 1 / (B K)
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    first = n * set_size
    total = tl.zeros([BLOCK_K], tl.float32)
    frr = tl.zeros([BLOCK_K], tl.float32)
    for s in range(0, set_size):
        row = (first + s).to(tl.int64)
        fv = tl.load(f_ptr + row * stride_fb + offs_k * stride_fk, mask=mask_k, other=0.0).to(tl.float32)
        fo = tl.load(f_orig_ptr + row * stride_ob + offs_k * stride_ok, mask=mask_k, other=0.0).to(tl.float32)
        total += fv
        frr += (fv - fo) * (fv - fo)
    mean = total / set_size
    crr = tl.zeros([BLOCK_K], tl.float32)
    for s in range(0, set_size):
        row = (first + s).to(tl.int64)
        fv = tl.load(f_ptr + row * stride_fb + offs_k * stride_fk, mask=mask_k, other=0.0).to(tl.float32)
        dev = tl.where(mask_k, fv - mean, 0.0)
        crr += dev * dev
    out = partial_ptr + (n * tl.num_programs(1) + pid_k) * 2
    tl.store(out, tl.sum(crr, axis=0) * crr_scale)
    tl.store(out + 1, tl.sum(frr, axis=0) * frr_scale)


@config(num_warps=4, BLOCK_K=512)
@triton.jit(do_not_specialize=["set_size"])
def _set_regularizers_bwd_kernel(
    grad_losses_ptr,  # [2] gradient w.r.t. (CRR, FRR), may be stride-0 expanded
    f_ptr,  # [B, K] features of the masked images
    f_orig_ptr,  # [B, K] features of the original images
    grad_f_ptr,  # [B, K] out: dL/df, f's dtype, contiguous
    set_size,
    K,
    stride_gl,
    stride_fb,
    stride_fk,
    stride_ob,
    stride_ok,
    crr_coef,  # 4 / (N (S-1) K)
    frr_coef,  # 2 / (B K)
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    g_crr = tl.load(grad_losses_ptr).to(tl.float32) * crr_coef
    g_frr = tl.load(grad_losses_ptr + stride_gl).to(tl.float32) * frr_coef
    first = n * set_size
    total = tl.zeros([BLOCK_K], tl.float32)
    for s in range(0, set_size):
        row = (first + s).to(tl.int64)
        total += tl.load(f_ptr + row * stride_fb + offs_k * stride_fk, mask=mask_k, other=0.0).to(tl.float32)
    mean = total / set_size
    for s in range(0, set_size):
        row = (first + s).to(tl.int64)
        fv = tl.load(f_ptr + row * stride_fb + offs_k * stride_fk, mask=mask_k, other=0.0).to(tl.float32)
        fo = tl.load(f_orig_ptr + row * stride_ob + offs_k * stride_ok, mask=mask_k, other=0.0).to(tl.float32)
        grad = g_crr * (fv - mean) + g_frr * (fv - fo)
        tl.store(grad_f_ptr + row * K + offs_k, grad.to(grad_f_ptr.dtype.element_ty), mask=mask_k)


# ----------------------------------------------------------------------------------------------
# Host launchers (registered with torch.library so torch.compile / torch.export see one op each)
# ----------------------------------------------------------------------------------------------
def _check_inputs(f: torch.Tensor, f_orig: torch.Tensor, set_size: int) -> None:
    op = "set_regularizers"
    check_same_device(op, f=f, f_orig=f_orig)
    if f.dim() != 2 or f_orig.shape != f.shape:
        raise ValueError(
            f"{op}: f and f_orig must both be [B, K], got {tuple(f.shape)} and {tuple(f_orig.shape)}"
        )
    check_float_dtype(op, "f", f)
    check_float_dtype(op, "f_orig", f_orig)
    check_set_batch(f.shape[0], set_size)


@triton_op("mmcam::set_regularizers_fwd", mutates_args=())
def set_regularizers_fwd(f: torch.Tensor, f_orig: torch.Tensor, set_size: int) -> torch.Tensor:
    """Forward of :func:`set_regularizers`: returns the fp32 vector ``[CRR, FRR]``."""
    _check_inputs(f, f_orig, set_size)
    B, K = f.shape
    N = B // set_size
    num_k_blocks = triton.cdiv(K, block_size(_set_regularizers_fwd_kernel, "BLOCK_K"))
    partial = torch.empty((N, num_k_blocks, 2), device=f.device, dtype=torch.float32)
    launch(
        _set_regularizers_fwd_kernel,
        lambda m: (N, num_k_blocks),
        f, f_orig, partial,
        set_size, K,
        f.stride(0), f.stride(1), f_orig.stride(0), f_orig.stride(1),
        2.0 / (N * (set_size - 1) * K), 1.0 / (B * K),
    )
    return partial.sum(dim=(0, 1))


@triton_op("mmcam::set_regularizers_bwd", mutates_args=())
def set_regularizers_bwd(
    grad_losses: torch.Tensor, f: torch.Tensor, f_orig: torch.Tensor, set_size: int
) -> torch.Tensor:
    """Backward of :func:`set_regularizers` w.r.t. ``f`` (``f_orig`` is a constant)."""
    B, K = f.shape
    N = B // set_size
    grad_f = torch.empty((B, K), device=f.device, dtype=f.dtype)
    launch(
        _set_regularizers_bwd_kernel,
        lambda m: (N, triton.cdiv(K, m["BLOCK_K"])),
        grad_losses, f, f_orig, grad_f,
        set_size, K,
        grad_losses.stride(0),
        f.stride(0), f.stride(1), f_orig.stride(0), f_orig.stride(1),
        4.0 / (N * (set_size - 1) * K), 2.0 / (B * K),
    )
    return grad_f


class SetRegularizersFunction(torch.autograd.Function):
    """Autograd of the fused op: differentiable w.r.t. ``f`` only.

    AMP: ``custom_fwd`` without ``cast_inputs``: ``f`` and ``f_orig`` come in the dtype the backbone
    gave them (no cast); the kernels accumulate in fp32 and the losses are fp32.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, f, f_orig, set_size):
        losses = torch.ops.mmcam.set_regularizers_fwd(f, f_orig, set_size)
        ctx.save_for_backward(f, f_orig)
        ctx.set_size = set_size
        return losses

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_losses):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        f, f_orig = ctx.saved_tensors
        return torch.ops.mmcam.set_regularizers_bwd(grad_losses, f, f_orig, ctx.set_size), None, None


def set_regularizers(
    f: torch.Tensor, f_orig: torch.Tensor, set_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Consistency (CRR) and feature (FRR) regularizers of MinMaxCAM, fused.

    Args:
        f: pooled features of the masked images ``[B, K]``, in set-major order (fp32/bf16/fp16).
        f_orig: pooled features of the original images ``[B, K]``; a constant (no gradient).
        set_size: images per set ``S >= 2``; must divide ``B``.

    Returns:
        ``(crr, frr)``, fp32 scalars.

    Raises:
        ValueError: ``set_size`` below 2 or not dividing the batch.
    """
    check_set_batch(f.shape[0], set_size)
    losses = SetRegularizersFunction.apply(f, f_orig, set_size)
    return losses[0], losses[1]


# ----------------------------------------------------------------------------------------------
# Reference: the specification, in plain PyTorch
# ----------------------------------------------------------------------------------------------
def set_regularizers_ref(
    f: torch.Tensor,
    f_orig: torch.Tensor,
    set_size: int,
    *,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch specification of :func:`set_regularizers`: the pair means taken literally.

    O(S^2 K) per set over the explicit pairs i < j; computed in ``compute_dtype`` (also under
    autocast), by default the inputs' promoted dtype, at least fp32 (fp64 inputs stay fp64).
    """
    check_set_batch(f.shape[0], set_size)
    if compute_dtype is None:
        compute_dtype = torch.promote_types(torch.promote_types(f.dtype, f_orig.dtype), torch.float32)
    batch, dims = f.shape
    with torch.autocast(f.device.type, enabled=False):  # compute_dtype, whatever autocast says
        sets = f.to(compute_dtype).reshape(batch // set_size, set_size, dims)
        first, second = torch.triu_indices(set_size, set_size, offset=1, device=f.device)
        pair_mse = ((sets[:, first] - sets[:, second]) ** 2).mean(dim=2)  # [N, S(S-1)/2]
        crr = pair_mse.mean(dim=1).mean()
        frr = ((f.to(compute_dtype) - f_orig.detach().to(compute_dtype)) ** 2).mean(dim=1).mean()
        return crr, frr
