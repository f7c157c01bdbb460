"""Property tests of the fused kernels (Triton interpreter) against their plain-PyTorch references.

Values and gradients on:

- every tail: for each blocked dimension of each kernel (block sizes read from the one config
  table, ``KERNEL_CONFIGS``), a size one below, at and one above the block, and one over a whole
  second block: K, the h*w cells, the output rows and columns, the source columns;
- the complete dtype x layout grid: features fp32 / bf16 / fp16, images in the same dtype or fp32
  (the autocast case: half-precision backbone features, fp32 images), contiguous or channels-last;
- random shapes (hypothesis, a bounded number of derandomized examples): h != w, odd sizes, one
  row or one column, K not a multiple of any block, S from 2 to 6, classes absent from the batch;
- exact ties: integer-valued features and weights make CAMs with several cells exactly at the
  minimum and at the maximum, where the gradient is split evenly between the tied cells.

Tolerances. Both paths read the same input values and compute in fp32 (the references promote to
at least fp32), so they differ only in the order of fp32 sums: ``FP32`` below. A half-precision
output is the fp32 result rounded once to its dtype in both paths, so the two roundings of nearly
equal fp32 numbers are equal or adjacent: at most one unit in the last place of the output dtype,
``eps(dtype) * |value|``, on top.
"""

from __future__ import annotations

import pytest
import torch
from _checks import assert_close, assert_within_torch_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mmcam_kernels import (
    CAM_EPS,
    KERNEL_CONFIGS,
    cam_mask,
    cam_mask_ref,
    set_regularizers,
    set_regularizers_ref,
)

PROPERTY = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# fp32 summation-order differences: the longest sums here have about 1000 terms (K up to 1025, or
# the h*w cells of a map), whose rounding error is below n * 2^-24 ~ 6e-5 of the sum of |terms|
# in the worst case and ~ sqrt(n) * 2^-24 ~ 2e-6 typically; values are of order 1. rtol 1e-5 with
# an absolute floor of 1e-5 of the largest value leaves a factor of 5 over the typical error.
FP32_RTOL = 1e-5
FP32_ATOL_OF_MAX = 1e-5

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def block(kernel: str, name: str) -> int:
    return KERNEL_CONFIGS[kernel].meta[name]


def half_ulp(dtype: torch.dtype) -> float:
    """Relative spacing of ``dtype``'s numbers: the most two roundings of near-equal values differ by."""
    return 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps


# ---------------------------------------------------------------------------------------------
# cam_mask
# ---------------------------------------------------------------------------------------------
def cam_inputs(batch, channels, h, w, height, width, num_classes, feature_dtype, image_dtype,
               channels_last, seed, integer=False):
    gen = torch.Generator().manual_seed(seed)
    if integer:  # exact CAMs in every dtype: small integers, ties at the min and the max
        features = torch.randint(0, 3, (batch, channels, h, w), generator=gen).float()
        weight = torch.randint(-1, 3, (num_classes, channels), generator=gen).float()
    else:
        features = torch.randn(batch, channels, h, w, generator=gen).relu()  # post-ReLU
        weight = torch.randn(num_classes, channels, generator=gen) * channels**-0.5
    images = torch.randn(batch, 3, height, width, generator=gen)
    grad_out = torch.randn(batch, 3, height, width, generator=gen)
    labels = torch.randint(0, max(1, num_classes - 1), (batch,), generator=gen)  # the last class absent
    features, images = features.to(feature_dtype), images.to(image_dtype)
    if channels_last:
        features = features.to(memory_format=torch.channels_last)
        images = images.to(memory_format=torch.channels_last)
    return features, weight, labels, images, grad_out


def value_and_weight_grad(fn, features, weight, labels, images, grad_out):
    weight = weight.clone().requires_grad_(True)
    out = fn(features, weight, labels, images)
    (out.float() * grad_out).sum().backward()
    return out, weight.grad


def check_cam_mask(features, weight, labels, images, grad_out, what=""):
    out, grad = value_and_weight_grad(cam_mask, features, weight, labels, images, grad_out)
    out_ref, grad_ref = value_and_weight_grad(cam_mask_ref, features, weight, labels, images, grad_out)
    assert out.dtype == images.dtype and out.shape == images.shape and out.stride() == images.stride()
    absent = sorted(set(range(weight.shape[0])) - set(labels.tolist()))
    assert torch.all(grad[absent] == 0), f"{what}: classes absent from the batch got a gradient"
    value_scale = float(out_ref.detach().float().abs().max())
    # the masked images: one rounding to the images' dtype in each path (see the module docstring)
    assert_close(out, out_ref, atol=FP32_ATOL_OF_MAX * value_scale, rtol=FP32_RTOL + half_ulp(images.dtype),
                 what=f"masked images {what}")
    # dL/dW is fp32 in both paths, from the same (half-rounded) incoming gradient. Its terms can
    # cancel (the min-max normalisation is nearly invariant to scaling the CAM: a map of two cells
    # has a gradient of order CAM_EPS), so an error relative to the result means nothing there. The
    # yardstick is the fp64 reference on the same values; the kernel may be off it by twice as much
    # as the fp32 reference is (flash-attention's rule) plus fp32's rounding of the terms before
    # they cancel, or of the result, whichever is larger.
    _, grad_64 = value_and_weight_grad(cam_mask_ref, features.double(), weight.double(), labels,
                                       images.double(), grad_out.to(images.dtype).double())
    floor = max(FP32_ATOL_OF_MAX * float(grad_64.abs().max()),
                cancellation_floor(features, weight, labels, images, grad_out))
    assert_within_torch_error(grad, grad_64, grad_ref, atol=floor, what=f"dL/dW {what}")


def cancellation_floor(features, weight, labels, images, grad_out) -> float:
    """fp32's rounding of the terms of dL/dW, which may cancel to a much smaller result.

    dL/dW[y_b] = sum_p F[b, :, p] dL/dH_raw[b, p] with |dL/dH_raw| <= 3 sum |dL/dout * x| / D_b (the
    direct term and the min's and the max's shares; the bilinear adjoint's weights sum to 1), where
    D_b = max - min + CAM_EPS of sample b's CAM. One unit roundoff, 2^-24, of the largest term of
    each sample, summed over the samples.
    """
    f64 = features.double()
    cams = torch.einsum("bk,bkhw->bhw", weight.double()[labels], f64).flatten(1)
    spread = cams.amax(dim=1) - cams.amin(dim=1) + CAM_EPS
    incoming = (grad_out.to(images.dtype).double() * images.double()).abs().flatten(1).sum(dim=1)
    terms = f64.abs().flatten(1).amax(dim=1) * 3 * incoming / spread
    return float(terms.sum()) * 2.0**-24


def cam_tail_cases():
    """(B, K, h, w, H, W): each blocked dimension below, at and above its block, and past two."""
    k_cam, p_cam = block("_cam_mask_fwd_cam_kernel", "BLOCK_K"), block("_cam_mask_fwd_cam_kernel", "BLOCK_P")
    y_fwd, x_fwd = block("_cam_mask_fwd_kernel", "BLOCK_Y"), block("_cam_mask_fwd_kernel", "BLOCK_X")
    p_minmax = block("_cam_mask_fwd_kernel", "BLOCK_P")
    assert p_minmax == block("_cam_mask_bwd_norm_kernel", "BLOCK_P")
    y_map, x_map = block("_cam_mask_bwd_map_kernel", "BLOCK_Y"), block("_cam_mask_bwd_map_kernel", "BLOCK_X")
    j_map = block("_cam_mask_bwd_map_kernel", "BLOCK_J")
    k_reduce = block("_cam_mask_bwd_reduce_kernel", "BLOCK_K")
    assert block("_cam_mask_bwd_kernel", "BLOCK_K") == k_cam
    assert block("_cam_mask_bwd_kernel", "BLOCK_P") == p_cam
    cases = [
        # K, h*w and the output rows one past a block; W past the forward's and the adjoint's columns
        pytest.param(2, k_cam + 1, 11, p_cam // 11 + 1, y_fwd + 1, x_fwd + 1, id="tails-K-P-Y-X"),
        # exact multiples everywhere: no tail at all
        pytest.param(2, k_cam, p_cam // j_map, j_map, y_map, x_map, id="exact-blocks"),
        # one below: K, rows, columns of the source map
        pytest.param(2, k_cam - 1, 3, j_map - 1, y_map - 1, x_fwd - 1, id="below-blocks"),
        # source columns past one block of the adjoint's gather, rows past its block
        pytest.param(1, 2 * k_cam + 3, 3, j_map + 1, y_map + 1, 3 * x_map + 5, id="tails-J-Ymap"),
        # K past the reduction's block
        pytest.param(1, k_reduce + 1, 2, 3, 5, 7, id="tail-K-reduce"),
        pytest.param(1, k_reduce, 3, 2, 7, 5, id="exact-K-reduce"),
        # the min/max over more cells than one block of the forward and the normalisation backward
        pytest.param(1, 3, 32, p_minmax // 32 + 1, 35, 38, id="tail-P-minmax"),
    ]
    return cases


@pytest.mark.parametrize("batch,channels,h,w,height,width", cam_tail_cases())
def test_cam_mask_every_block_tail(batch, channels, h, w, height, width):
    inputs = cam_inputs(batch, channels, h, w, height, width, 3, torch.float32, torch.float32, False,
                        seed=h * w)
    check_cam_mask(*inputs, what=f"B{batch} K{channels} {h}x{w} -> {height}x{width}")


GRID = [(f, i, cl) for f in DTYPES for i in dict.fromkeys([f, torch.float32]) for cl in (False, True)]


@pytest.mark.parametrize("feature_dtype,image_dtype,channels_last", GRID,
                         ids=[f"{str(f)[6:]}-images-{str(i)[6:]}-{'cl' if cl else 'contiguous'}"
                              for f, i, cl in GRID])
def test_cam_mask_dtype_layout_grid(feature_dtype, image_dtype, channels_last):
    # an odd, non-square map and image, K not a multiple of the block, two samples of one class
    inputs = cam_inputs(3, 37, 5, 7, 23, 31, 4, feature_dtype, image_dtype, channels_last, seed=11)
    check_cam_mask(*inputs, what=f"{feature_dtype}/{image_dtype} channels_last={channels_last}")


@PROPERTY
@given(
    batch=st.integers(1, 3),
    channels=st.one_of(st.integers(1, 70), st.sampled_from([31, 32, 33, 63, 65])),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    height=st.integers(1, 24),
    width=st.integers(1, 24),
    num_classes=st.integers(2, 5),
    feature_dtype=st.sampled_from(DTYPES),
    images_fp32=st.booleans(),
    channels_last=st.booleans(),
    integer=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cam_mask_matches_reference_on_random_shapes(batch, channels, h, w, height, width, num_classes,
                                                     feature_dtype, images_fp32, channels_last, integer,
                                                     seed):
    image_dtype = torch.float32 if images_fp32 else feature_dtype
    inputs = cam_inputs(batch, channels, h, w, height, width, num_classes, feature_dtype, image_dtype,
                        channels_last, seed, integer=integer)
    check_cam_mask(*inputs, what=f"B{batch} K{channels} {h}x{w} -> {height}x{width} integer={integer}")


def test_integer_maps_have_exact_ties_at_both_ends():
    """The integer generator really makes tied minima and maxima (else the property proves less)."""
    features, weight, labels, _, _ = cam_inputs(4, 3, 5, 6, 8, 8, 3, torch.float32, torch.float32, False,
                                                seed=2, integer=True)
    cams = torch.einsum("bk,bkhw->bhw", weight[labels], features).flatten(1)
    ties_lo = (cams == cams.amin(dim=1, keepdim=True)).sum(dim=1)
    ties_hi = (cams == cams.amax(dim=1, keepdim=True)).sum(dim=1)
    assert (ties_lo > 1).any() and (ties_hi > 1).any()


# ---------------------------------------------------------------------------------------------
# set_regularizers
# ---------------------------------------------------------------------------------------------
CRR_WEIGHT, FRR_WEIGHT = 0.7, 1.3  # distinct, so swapped CRR/FRR gradients would show


def set_inputs(num_sets, set_size, channels, dtype, orig_dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    batch = num_sets * set_size
    base = torch.randn(batch, channels, generator=gen).relu()
    f = (base + 0.1 * torch.randn(batch, channels, generator=gen)).to(dtype)
    f_orig = (base + 0.05 * torch.randn(batch, channels, generator=gen)).to(orig_dtype)
    if layout == "transposed":  # column-major storage: strides (1, B)
        f, f_orig = f.t().contiguous().t(), f_orig.t().contiguous().t()
    elif layout == "strided":  # every other column of a wider tensor
        f = torch.stack([f, f], dim=2).flatten(1)[:, ::2]
        f_orig = torch.stack([f_orig, f_orig], dim=2).flatten(1)[:, ::2]
    return f, f_orig


def losses_and_grad(fn, f, f_orig, set_size):
    f = f.detach().requires_grad_(True)  # keeps its strides (the layout under test)
    crr, frr = fn(f, f_orig, set_size)
    (CRR_WEIGHT * crr + FRR_WEIGHT * frr).backward()
    return crr.detach(), frr.detach(), f.grad


def check_set_regularizers(f, f_orig, set_size, what=""):
    crr, frr, grad = losses_and_grad(set_regularizers, f, f_orig, set_size)
    # The reference on fp32 copies of the same values, its gradient rounded once to f's dtype at
    # the end. (On f itself, autograd would round the CRR and the FRR parts separately to f's dtype
    # and add them there: three roundings of terms that may be larger than their sum.)
    crr_ref, frr_ref, grad_ref = losses_and_grad(set_regularizers_ref, f.float(), f_orig, set_size)
    grad_ref = grad_ref.to(f.dtype)
    assert crr.dtype == frr.dtype == torch.float32 and grad.dtype == f.dtype
    # the losses are fp32 sums over the same values in both paths
    assert_close(torch.stack([crr, frr]), torch.stack([crr_ref, frr_ref]).float(), atol=1e-7,
                 rtol=FP32_RTOL, what=f"[CRR, FRR] {what}")
    # dL/df: fp32 in both, rounded once to f's dtype
    grad_scale = float(grad_ref.float().abs().max())
    assert_close(grad, grad_ref, atol=FP32_ATOL_OF_MAX * grad_scale, rtol=1e-4 + half_ulp(f.dtype),
                 what=f"dL/df {what}")


def set_tail_cases():
    k = block("_set_regularizers_fwd_kernel", "BLOCK_K")
    assert block("_set_regularizers_bwd_kernel", "BLOCK_K") == k
    return [pytest.param(channels, id=f"K{channels}") for channels in (1, k - 1, k, k + 1, 2 * k + 1)]


@pytest.mark.parametrize("channels", set_tail_cases())
@pytest.mark.parametrize("set_size", [2, 3, 4, 5, 6])
def test_set_regularizers_every_tail_and_set_size(channels, set_size):
    f, f_orig = set_inputs(2, set_size, channels, torch.float32, torch.float32, "contiguous", seed=channels)
    check_set_regularizers(f, f_orig, set_size, what=f"S{set_size} K{channels}")


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("orig_fp32", [False, True], ids=["orig-same", "orig-fp32"])
def test_set_regularizers_dtype_layout_grid(dtype, orig_fp32, layout):
    orig_dtype = torch.float32 if orig_fp32 else dtype
    f, f_orig = set_inputs(3, 3, 37, dtype, orig_dtype, layout, seed=5)
    check_set_regularizers(f, f_orig, 3, what=f"{dtype}/{orig_dtype} {layout}")


@PROPERTY
@given(
    num_sets=st.integers(1, 4),
    set_size=st.integers(2, 6),
    channels=st.one_of(st.integers(1, 1100), st.sampled_from([511, 512, 513, 1023, 1025])),
    dtype=st.sampled_from(DTYPES),
    orig_fp32=st.booleans(),
    layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_set_regularizers_match_reference_on_random_shapes(num_sets, set_size, channels, dtype, orig_fp32,
                                                           layout, seed):
    f, f_orig = set_inputs(num_sets, set_size, channels, dtype, torch.float32 if orig_fp32 else dtype, layout,
                           seed)
    check_set_regularizers(f, f_orig, set_size, what=f"N{num_sets} S{set_size} K{channels} {dtype} {layout}")


def test_identical_members_of_a_set_give_zero_crr_and_its_gradient():
    """A set of S copies of one feature vector: CRR is 0 exactly and its gradient vanishes."""
    f = torch.rand(1, 45).expand(4, 45).contiguous()
    f_orig = torch.rand(4, 45)
    f = f.requires_grad_(True)
    crr, frr = set_regularizers(f, f_orig, 4)
    crr.backward()
    assert float(crr.detach()) == 0.0 and torch.all(f.grad == 0)
    crr_ref, frr_ref = set_regularizers_ref(f.detach(), f_orig, 4)
    assert float(crr_ref) == 0.0
    assert_close(frr, frr_ref, atol=0, rtol=FP32_RTOL, what="FRR")


# ---------------------------------------------------------------------------------------------
# what the interpreter does not check
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(KERNEL_CONFIGS))
def test_every_kernel_config_is_launchable_on_a_gpu(name):
    """Powers of two: tl.arange needs them for every block, and a GPU for the warp count.

    The interpreter runs one program at a time and ignores num_warps, so a config it runs happily
    could still fail to compile for a GPU.
    """
    config = KERNEL_CONFIGS[name]
    assert config.num_warps in (1, 2, 4, 8, 16, 32), config.describe()
    for block_name, size in config.blocks:
        assert size >= 1 and size & (size - 1) == 0, f"{name}: {block_name}={size} is not a power of two"


@pytest.mark.parametrize("which", ["features", "images"])
def test_cam_mask_refuses_features_or_images_that_require_grad(which):
    # Stage II differentiates w.r.t. the weight only; a gradient asked of either input alone is
    # refused, not silently dropped
    features, weight, labels, images, _ = cam_inputs(2, 8, 3, 4, 6, 5, 3, torch.float32, torch.float32, False,
                                                     seed=0)
    inputs = {"features": features, "images": images}
    inputs[which] = inputs[which].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="differentiates w.r.t. weight only"):
        cam_mask(inputs["features"], weight.clone().requires_grad_(True), labels, inputs["images"])
