"""Fused CAM masking (MinMaxCAM Stage II steps 3-6): CAM, min-max normalisation, bilinear upsampling
and the multiply with the input images, with the gradient w.r.t. the classifier weight.

    H_raw[b] = sum_k W[y_b, k] * F[b, k]                       (no bias, no ReLU)
    H[b]     = (H_raw[b] - min) / (max - min + CAM_EPS)        (over the h*w cells of each map)
    out[b]   = x[b] * bilinear_up(H[b], (H, W), align_corners=False)

The unfused PyTorch version materialises the class-weight gather, the [B, h, w] map in several
copies, the [B, 1, H, W] upsampled map and the product, and its upsampling backward uses atomics on
CUDA. Here the forward reads F once and the images once; the backward reads F once and the images
and the incoming gradient 2 to 2.5 times (neighbouring source rows' stencils overlap), writing only
[B, h*w] and [B, K] fp32 scratch. Nothing uses atomics.

Forward: two kernels, because the min/max needs the whole map before any pixel can be written.
  ``_cam_mask_fwd_cam_kernel``    grid (B, h*w blocks): H_raw, a K-reduction, into fp32 scratch.
  ``_cam_mask_fwd_kernel``        grid (B, H blocks, W blocks): min/max of the map, normalise the
                                  four bilinear corners, interpolate, multiply the 3 channels.
Backward (gradient w.r.t. W only): four kernels.
  ``_cam_mask_bwd_map_kernel``    grid (B, h): dL/dH for source row i = the bilinear adjoint of
                                  sum_c dL/dout * x, gathered over the output pixels that touch i.
  ``_cam_mask_bwd_norm_kernel``   grid (B,): through the min-max normalisation, in place: the min
                                  and max are piecewise, their gradient is split evenly over tied
                                  cells (as autograd of ``amin``/``amax`` does).
  ``_cam_mask_bwd_kernel``        grid (B, K blocks): the K-contraction with F into a per-sample
                                  fp32 partial [B, K].
  ``_cam_mask_bwd_reduce_kernel`` grid (C, K blocks): dW[c] = sum of the partials of the samples
                                  labelled c, in batch order (rows of absent classes are zero).

CAM_EPS = 1e-6 keeps a constant map (max == min) finite: it becomes all zeros, so the image is
fully masked, and its gradient is finite (it scales with 1/CAM_EPS). Features are post-ReLU and
typically O(1), so 1e-6 is far below any real map's range and leaves normal maps unchanged to fp32
precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from ._launch import check_float_dtype, check_same_device, config, launch, spatially_flat

CAM_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _cam_min_max(
    cam_row,  # [P] fp32, one raw CAM
    P,
    BLOCK_P: tl.constexpr,
):
    lo = tl.full([BLOCK_P], float("inf"), tl.float32)
    hi = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        mask = offs < P
        v = tl.load(cam_row + offs, mask=mask, other=0.0)
        lo = tl.minimum(lo, tl.where(mask, v, float("inf")))
        hi = tl.maximum(hi, tl.where(mask, v, float("-inf")))
    return tl.min(lo, axis=0), tl.max(hi, axis=0)


@triton.jit
def _bilinear_source(dst, n_src, n_dst):
    # PyTorch's source index for bilinear, align_corners=False, no scale factor given:
    # src = max((dst + 0.5) * n_src / n_dst - 0.5, 0); i1 = i0 + 1 except at the last source cell.
    scale = n_src.to(tl.float32) / n_dst.to(tl.float32)
    src = tl.maximum((tl.cast(dst, tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = src.to(tl.int32)  # truncation == floor, src >= 0
    i1 = tl.where(i0 < n_src - 1, i0 + 1, i0)
    l1 = src - i0.to(tl.float32)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _bilinear_dst_range(i0, i1, n_src, n_dst):
    # Destination indices whose source coordinate lies in [i0 - 1, i1): the only ones whose stencil
    # can touch source cells i0 .. i1-1. Integer bounds, widened by one on each side, so rounding
    # (and C vs floor division of negative numerators) can only add indices; the exact stencil
    # weights give the added ones weight 0.
    lo = ((2 * i0 - 1) * n_dst - n_src) // (2 * n_src) - 1
    hi = ((2 * i1 + 1) * n_dst - n_src) // (2 * n_src) + 2
    return tl.maximum(lo, 0), tl.minimum(hi, n_dst)


@config(num_warps=8, BLOCK_K=32, BLOCK_P=128)
@triton.jit(do_not_specialize=["num_classes"])
def _cam_mask_fwd_cam_kernel(
    feat_ptr,  # [B, K, h*w] backbone features (fp32/bf16/fp16), contiguous or channels-last
    weight_ptr,  # [C, K] fp32 classifier weight
    labels_ptr,  # [B] int64 class of each sample
    cam_ptr,  # [B, h*w] fp32 out: raw CAM
    num_classes,
    K,
    P,  # h*w
    stride_fb,
    stride_fk,
    stride_fp,
    stride_wc,
    stride_wk,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    label = tl.load(labels_ptr + b)
    # An out-of-range label reads no memory: its map is all zeros (hence constant, fully masked).
    label_ok = (label >= 0) & (label < num_classes)
    feat_row = feat_ptr + b.to(tl.int64) * stride_fb
    weight_row = weight_ptr + label * stride_wc
    acc = tl.zeros([BLOCK_P], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        wk = tl.load(weight_row + offs_k * stride_wk, mask=mask_k & label_ok, other=0.0)
        f = tl.load(
            feat_row + offs_k[:, None] * stride_fk + offs_p[None, :] * stride_fp,
            mask=mask_k[:, None] & mask_p[None, :],
            other=0.0,
        )
        acc += tl.sum(f.to(tl.float32) * wk.to(tl.float32)[:, None], axis=0)
    tl.store(cam_ptr + b * P + offs_p, acc, mask=mask_p)


@config(num_warps=8, BLOCK_P=1024, BLOCK_Y=8, BLOCK_X=256)
@triton.jit(do_not_specialize=["h", "w", "H", "W"])
def _cam_mask_fwd_kernel(
    cam_ptr,  # [B, h*w] fp32 raw CAM
    img_ptr,  # [B, 3, H, W] images (fp32/bf16/fp16), any strides (contiguous, channels-last)
    out_ptr,  # [B, 3, H, W] out: masked images, the images' dtype and strides
    h,
    w,
    H,
    W,
    P,  # h*w
    stride_ib,
    stride_ic,
    stride_iy,
    stride_ix,
    stride_ob,
    stride_oc,
    stride_oy,
    stride_ox,
    EPS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    b = tl.program_id(0)
    cam_row = cam_ptr + b * P
    # Every program of sample b re-reads its h*w map (a few KB, cache-resident) for the min/max.
    lo, hi = _cam_min_max(cam_row, P, BLOCK_P)
    inv_range = 1.0 / (hi - lo + EPS)

    # A [BLOCK_Y, BLOCK_X] tile of output pixels: the bilinear stencil is separable, so source
    # rows/columns and their weights are computed once per row and once per column.
    offs_y = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    offs_x = tl.program_id(2) * BLOCK_X + tl.arange(0, BLOCK_X)
    mask = (offs_y < H)[:, None] & (offs_x < W)[None, :]
    y0, y1, ly0, ly1 = _bilinear_source(offs_y, h, H)
    x0, x1, lx0, lx1 = _bilinear_source(offs_x, w, W)
    row0 = cam_row + y0[:, None] * w
    row1 = cam_row + y1[:, None] * w
    # Normalise the four corners first (as the reference does), then interpolate: interpolating
    # the raw map and normalising after would lose precision when |min| >> max - min.
    c00 = (tl.load(row0 + x0[None, :], mask=mask, other=0.0) - lo) * inv_range
    c01 = (tl.load(row0 + x1[None, :], mask=mask, other=0.0) - lo) * inv_range
    c10 = (tl.load(row1 + x0[None, :], mask=mask, other=0.0) - lo) * inv_range
    c11 = (tl.load(row1 + x1[None, :], mask=mask, other=0.0) - lo) * inv_range
    heat = ly0[:, None] * (lx0[None, :] * c00 + lx1[None, :] * c01) + ly1[:, None] * (
        lx0[None, :] * c10 + lx1[None, :] * c11
    )

    img_tile = img_ptr + b.to(tl.int64) * stride_ib
    img_tile += offs_y[:, None] * stride_iy + offs_x[None, :] * stride_ix
    out_tile = out_ptr + b.to(tl.int64) * stride_ob
    out_tile += offs_y[:, None] * stride_oy + offs_x[None, :] * stride_ox
    for c in tl.static_range(3):
        img = tl.load(img_tile + c * stride_ic, mask=mask, other=0.0)
        masked = img.to(tl.float32) * heat
        tl.store(out_tile + c * stride_oc, masked.to(out_ptr.dtype.element_ty), mask=mask)


@config(num_warps=8, BLOCK_Y=16, BLOCK_X=64, BLOCK_J=16)
@triton.jit(do_not_specialize=["h", "w", "H", "W"])
def _cam_mask_bwd_map_kernel(
    grad_out_ptr,  # [B, 3, H, W] gradient w.r.t. the masked images (may be stride-0 expanded)
    img_ptr,  # [B, 3, H, W] images
    grad_map_ptr,  # [B, h*w] fp32 out: gradient w.r.t. the normalised map before upsampling
    h,
    w,
    H,
    W,
    P,  # h*w
    stride_gb,
    stride_gc,
    stride_gy,
    stride_gx,
    stride_ib,
    stride_ic,
    stride_iy,
    stride_ix,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    # The adjoint of bilinear upsampling, as a gather (no atomics): program (b, i) sums, for source
    # row i, the weighted gradient of every output pixel whose 2x2 stencil touches row i.
    b = tl.program_id(0)
    i = tl.program_id(1)
    y_lo, y_hi = _bilinear_dst_range(i, i + 1, h, H)
    grad_img = grad_out_ptr + b.to(tl.int64) * stride_gb
    img = img_ptr + b.to(tl.int64) * stride_ib
    for j0 in range(0, w, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        x_lo, x_hi = _bilinear_dst_range(j0, j0 + BLOCK_J, w, W)
        acc_j = tl.zeros([BLOCK_J], tl.float32)
        for xs in range(x_lo, x_hi, BLOCK_X):
            offs_x = xs + tl.arange(0, BLOCK_X)
            mask_x = offs_x < x_hi
            # Vertical pass: sum_c dL/dout * x over the rows touching i, weighted by their stencil
            # weight on row i (0 for the margin rows that do not touch it).
            acc_x = tl.zeros([BLOCK_X], tl.float32)
            for ys in range(y_lo, y_hi, BLOCK_Y):
                offs_y = ys + tl.arange(0, BLOCK_Y)
                mask = (offs_y < y_hi)[:, None] & mask_x[None, :]
                sy0, sy1, ly0, ly1 = _bilinear_source(offs_y, h, H)
                wy = tl.where(sy0 == i, ly0, 0.0) + tl.where(sy1 == i, ly1, 0.0)
                g_off = offs_y[:, None] * stride_gy + offs_x[None, :] * stride_gx
                i_off = offs_y[:, None] * stride_iy + offs_x[None, :] * stride_ix
                g = tl.zeros([BLOCK_Y, BLOCK_X], tl.float32)
                for c in tl.static_range(3):
                    go = tl.load(grad_img + c * stride_gc + g_off, mask=mask, other=0.0)
                    im = tl.load(img + c * stride_ic + i_off, mask=mask, other=0.0)
                    g += go.to(tl.float32) * im.to(tl.float32)
                acc_x += tl.sum(wy[:, None] * g, axis=0)
            # Horizontal pass: spread each output column onto its two source columns.
            sx0, sx1, lx0, lx1 = _bilinear_source(offs_x, w, W)
            wx = tl.where(sx0[:, None] == offs_j[None, :], lx0[:, None], 0.0) + tl.where(
                sx1[:, None] == offs_j[None, :], lx1[:, None], 0.0
            )
            acc_j += tl.sum(acc_x[:, None] * wx, axis=0)
        tl.store(grad_map_ptr + b * P + i * w + offs_j, acc_j, mask=offs_j < w)


@config(num_warps=4, BLOCK_P=1024)
@triton.jit
def _cam_mask_bwd_norm_kernel(
    cam_ptr,  # [B, h*w] fp32 raw CAM saved by the forward
    grad_map_ptr,  # [B, h*w] fp32, in: dL/dH (normalised map); out, in place: dL/dH_raw
    P,  # h*w
    EPS: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # H = (r - lo) / D with D = hi - lo + EPS:  dH/dr = 1/D,  dH/dlo = (H - 1) / D,  dH/dhi = -H / D.
    # lo and hi are piecewise: their gradient goes to the cells equal to them, split evenly among
    # ties (autograd of amin/amax). The map is the forward's saved fp32 map, so ties are exact.
    b = tl.program_id(0)
    cam_row = cam_ptr + b * P
    grad_row = grad_map_ptr + b * P
    lo, hi = _cam_min_max(cam_row, P, BLOCK_P)
    inv_range = 1.0 / (hi - lo + EPS)
    n_lo = tl.zeros([BLOCK_P], tl.float32)
    n_hi = tl.zeros([BLOCK_P], tl.float32)
    sum_g = tl.zeros([BLOCK_P], tl.float32)
    sum_gh = tl.zeros([BLOCK_P], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        r = tl.load(cam_row + offs_p, mask=mask_p, other=0.0)
        g = tl.load(grad_row + offs_p, mask=mask_p, other=0.0)
        n_lo += tl.where(mask_p & (r == lo), 1.0, 0.0)
        n_hi += tl.where(mask_p & (r == hi), 1.0, 0.0)
        sum_g += g
        sum_gh += g * ((r - lo) * inv_range)
    total_g = tl.sum(sum_g, axis=0)
    total_gh = tl.sum(sum_gh, axis=0)
    grad_lo_each = (total_gh - total_g) * inv_range / tl.sum(n_lo, axis=0)
    grad_hi_each = -total_gh * inv_range / tl.sum(n_hi, axis=0)
    # Each program rewrites only its own row, after reading all of it: in place is safe.
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        r = tl.load(cam_row + offs_p, mask=mask_p, other=0.0)
        g = tl.load(grad_row + offs_p, mask=mask_p, other=0.0)
        g_raw = g * inv_range + tl.where(r == lo, grad_lo_each, 0.0) + tl.where(r == hi, grad_hi_each, 0.0)
        tl.store(grad_row + offs_p, g_raw, mask=mask_p)


@config(num_warps=8, BLOCK_K=32, BLOCK_P=128)
@triton.jit
def _cam_mask_bwd_kernel(
    feat_ptr,  # [B, K, h*w] backbone features, contiguous or channels-last
    grad_cam_ptr,  # [B, h*w] fp32 dL/dH_raw
    partial_ptr,  # [B, K] fp32 out: gradient w.r.t. W[labels[b]] from sample b
    K,
    P,  # h*w
    stride_fb,
    stride_fk,
    stride_fp,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # dL/dW[y_b, k] = sum_p F[b, k, p] * dL/dH_raw[b, p]
    b = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    feat_row = feat_ptr + b.to(tl.int64) * stride_fb
    acc = tl.zeros([BLOCK_K], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        g = tl.load(grad_cam_ptr + b * P + offs_p, mask=mask_p, other=0.0)
        f = tl.load(
            feat_row + offs_k[:, None] * stride_fk + offs_p[None, :] * stride_fp,
            mask=mask_k[:, None] & mask_p[None, :],
            other=0.0,
        )
        acc += tl.sum(f.to(tl.float32) * g[None, :], axis=1)
    tl.store(partial_ptr + b * K + offs_k, acc, mask=mask_k)


@config(num_warps=4, BLOCK_K=512)
@triton.jit(do_not_specialize=["B"])
def _cam_mask_bwd_reduce_kernel(
    partial_ptr,  # [B, K] fp32 per-sample gradient rows
    labels_ptr,  # [B] int64
    grad_weight_ptr,  # [C, K] fp32 out
    B,
    K,
    BLOCK_K: tl.constexpr,
):
    # One program per (class row, K block): a fixed summation order (batch order), no atomics.
    c = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    acc = tl.zeros([BLOCK_K], tl.float32)
    for b in range(0, B):
        label = tl.load(labels_ptr + b)
        acc += tl.load(partial_ptr + b * K + offs_k, mask=mask_k & (label == c), other=0.0)
    tl.store(grad_weight_ptr + c.to(tl.int64) * K + offs_k, acc, mask=mask_k)


# ----------------------------------------------------------------------------------------------
# Host launchers (registered with torch.library so torch.compile / torch.export see one op each)
# ----------------------------------------------------------------------------------------------
def _check_cam_mask_inputs(
    features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, images: torch.Tensor
) -> None:
    op = "cam_mask"
    check_same_device(op, features=features, weight=weight, labels=labels, images=images)
    if features.dim() != 4:
        raise ValueError(f"{op}: features must be [B, K, h, w], got shape {tuple(features.shape)}")
    if weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"{op}: weight must be [C, K] with K={features.shape[1]} (the features' channels), "
            f"got shape {tuple(weight.shape)}"
        )
    if labels.shape != (features.shape[0],) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{op}: labels must be an int64 vector [B] with B={features.shape[0]}, "
            f"got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if images.dim() != 4 or images.shape[0] != features.shape[0] or images.shape[1] != 3:
        raise ValueError(
            f"{op}: images must be [B, 3, H, W] with B={features.shape[0]}, got shape {tuple(images.shape)}"
        )
    check_float_dtype(op, "features", features)
    check_float_dtype(op, "images", images)
    if not weight.is_floating_point():
        raise ValueError(f"{op}: weight must be floating point, got {weight.dtype}")


@triton_op("mmcam::cam_mask_fwd", mutates_args=())
def cam_mask_fwd(
    features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of :func:`cam_mask`; also returns the raw CAM [B, h*w] fp32 saved for the backward."""
    _check_cam_mask_inputs(features, weight, labels, images)
    B, K, h, w = features.shape
    H, W = images.shape[-2:]
    P = h * w
    features = spatially_flat(features)
    # The weight is [C, K], tiny next to F: reading it in fp32 keeps one kernel variant per
    # features dtype (a bf16-cast model gives a bf16 weight; autocast keeps it fp32).
    weight = weight.float()
    labels = labels.long().contiguous()
    cam = torch.empty((B, P), device=features.device, dtype=torch.float32)
    # Same dtype and strides as the images when they are dense (channels-last stays channels-last).
    masked = torch.empty_like(images)
    launch(
        _cam_mask_fwd_cam_kernel,
        lambda m: (B, triton.cdiv(P, m["BLOCK_P"])),
        features, weight, labels, cam,
        weight.shape[0], K, P,
        features.stride(0), features.stride(1), features.stride(3),
        weight.stride(0), weight.stride(1),
    )
    launch(
        _cam_mask_fwd_kernel,
        lambda m: (B, triton.cdiv(H, m["BLOCK_Y"]), triton.cdiv(W, m["BLOCK_X"])),
        cam, images, masked,
        h, w, H, W, P,
        *images.stride(), *masked.stride(),
        EPS=CAM_EPS,
    )
    return masked, cam


@triton_op("mmcam::cam_mask_bwd", mutates_args=())
def cam_mask_bwd(
    grad_masked: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    images: torch.Tensor,
    cam: torch.Tensor,
    num_classes: int,
) -> torch.Tensor:
    """Backward of :func:`cam_mask` w.r.t. the weight: returns dW [C, K] in fp32."""
    B, K, h, w = features.shape
    H, W = images.shape[-2:]
    P = h * w
    if grad_masked.shape != images.shape:
        raise ValueError(
            f"cam_mask backward: gradient of shape {tuple(grad_masked.shape)}, expected {tuple(images.shape)}"
        )
    # The incoming gradient may be an expanded stride-0 tensor (the gradient of .sum()): the
    # kernel indexes it through its own strides, so it is read correctly without a copy.
    features = spatially_flat(features)
    labels = labels.long().contiguous()
    grad_cam = torch.empty((B, P), device=features.device, dtype=torch.float32)
    partial = torch.empty((B, K), device=features.device, dtype=torch.float32)
    grad_weight = torch.empty((num_classes, K), device=features.device, dtype=torch.float32)
    launch(
        _cam_mask_bwd_map_kernel,
        lambda m: (B, h),
        grad_masked, images, grad_cam,
        h, w, H, W, P,
        *grad_masked.stride(), *images.stride(),
    )
    launch(_cam_mask_bwd_norm_kernel, lambda m: (B,), cam, grad_cam, P, EPS=CAM_EPS)
    launch(
        _cam_mask_bwd_kernel,
        lambda m: (B, triton.cdiv(K, m["BLOCK_K"])),
        features, grad_cam, partial,
        K, P,
        features.stride(0), features.stride(1), features.stride(3),
    )
    launch(
        _cam_mask_bwd_reduce_kernel,
        lambda m: (num_classes, triton.cdiv(K, m["BLOCK_K"])),
        partial, labels, grad_weight,
        B, K,
    )
    return grad_weight


class CamMaskFunction(torch.autograd.Function):
    """Autograd of the fused op: differentiable w.r.t. ``weight`` only.

    AMP: ``custom_fwd`` without ``cast_inputs`` (and ``custom_bwd``): under CUDA autocast the inputs
    arrive as they are (bf16/fp16 features from the backbone, the fp32 weight, the images in the
    loader's dtype) and are not cast, because the kernels read mixed dtypes and accumulate in fp32;
    a cast would only add a full pass over F. The backward runs under the forward's autocast state.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, features, weight, labels, images):
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            raise ValueError(
                "cam_mask differentiates w.r.t. weight only (Stage II): pass features and images "
                "that do not require grad (compute them under torch.no_grad() or .detach() them)"
            )
        masked, cam = torch.ops.mmcam.cam_mask_fwd(features, weight, labels, images)
        ctx.save_for_backward(features, labels, images, cam)
        ctx.num_classes = weight.shape[0]
        ctx.weight_dtype = weight.dtype
        return masked

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_masked):
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        features, labels, images, cam = ctx.saved_tensors
        grad_weight = torch.ops.mmcam.cam_mask_bwd(
            grad_masked, features, labels, images, cam, ctx.num_classes
        )
        return None, grad_weight.to(ctx.weight_dtype), None, None


def cam_mask(
    features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, images: torch.Tensor
) -> torch.Tensor:
    """Mask images with their min-max normalised, bilinearly upsampled class activation maps.

    Args:
        features: backbone feature maps ``[B, K, h, w]`` (fp32/bf16/fp16, contiguous or channels-last),
            not requiring grad.
        weight: classifier weight ``[C, K]``; the only input that receives a gradient.
        labels: class of each sample ``[B]`` (int64), in ``[0, C)``.
        images: the (normalised) input images ``[B, 3, H, W]`` (fp32/bf16/fp16), not requiring grad.

    Returns:
        The masked images ``[B, 3, H, W]`` in ``images``' dtype and memory format.
    """
    return CamMaskFunction.apply(features, weight, labels, images)


# ----------------------------------------------------------------------------------------------
# Reference: the specification, in plain PyTorch
# ----------------------------------------------------------------------------------------------
def cam_mask_ref(
    features: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    images: torch.Tensor,
    *,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain-PyTorch specification of :func:`cam_mask` (docs/method.md Stage II steps 3-6).

    Computed literally in ``compute_dtype``, also under autocast; by default the inputs' promoted
    dtype, at least fp32 (the kernels accumulate in fp32; fp64 inputs stay fp64). The tests also run
    it in bf16/fp16 to measure PyTorch's own rounding error. The min/max are ``amin``/``amax``, whose
    gradient is split evenly among tied cells. Differentiable w.r.t. every input. Returns ``images``'
    dtype.
    """
    if compute_dtype is None:
        compute_dtype = at_least_fp32_dtype(features, weight, images)
    # Autocast would run the einsum in bf16/fp16 whatever compute_dtype says: the reference opts out.
    with torch.autocast(features.device.type, enabled=False):
        class_weights = weight.to(compute_dtype)[labels]  # [B, K]
        cam = torch.einsum("bk,bkhw->bhw", class_weights, features.to(compute_dtype))
        lo = cam.amin(dim=(1, 2), keepdim=True)
        hi = cam.amax(dim=(1, 2), keepdim=True)
        heat = (cam - lo) / (hi - lo + CAM_EPS)
        heat_up = F.interpolate(
            heat[:, None], size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False
        )
        return (images.to(compute_dtype) * heat_up).to(images.dtype)


def at_least_fp32_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The tensors' promoted dtype, at least fp32 (fp64 stays fp64)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
