"""The fused cam_mask kernels (Triton interpreter) against cam_mask_ref: masked images and dL/dW."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _checks import assert_close, assert_within_torch_error
from mmcam_kernels import CAM_EPS, cam_mask, cam_mask_ref

# (dtype of features and images, channels-last, atol for values, atol for gradients relative to
# their max). fp32 is compared elementwise with a tight tolerance; bf16/fp16 with flash-attention's
# rule. Each dtype and each layout appears; fp32 in both layouts (the layout changes only the loads).
# The fp32 atols (1e-5 of values of order 1; rtol 1e-5 / 1e-4 for dL/dW) leave a factor of about 5
# over fp32's summation-order error, sqrt(n) * 2^-24 for the K- and h*w-long sums (n <= 2048). The
# half atols are one unit in the last place of the dtype at the masked images' magnitude (|x| < 4:
# bf16 2^-6 ~ 1.6e-2, rounded down to 1e-2 since PyTorch's own half error is added twice; fp16
# 2^-9 ~ 2e-3, likewise 1e-3), and 1e-3 of the largest gradient entry: the kernels accumulate dL/dW
# in fp32 from the same half inputs (see tests/interpret/test_kernel_properties.py for the bound
# without the flash rule).
DTYPE_LAYOUTS = [
    pytest.param(torch.float32, False, 1e-5, 1e-5, id="fp32-contiguous"),
    pytest.param(torch.float32, True, 1e-5, 1e-5, id="fp32-channels_last"),
    pytest.param(torch.bfloat16, True, 1e-2, 1e-3, id="bf16-channels_last"),
    pytest.param(torch.float16, False, 1e-3, 1e-3, id="fp16-contiguous"),
]

# (B, K, h, H, W, C). With FULL_SIZE below, the shapes cover every value of the acceptance grid:
# B 1/5/10, K 64/1024/2048, h=w 7/13/14/28, H=W 64/224/odd. The interpreter costs about a
# millisecond per Triton op per program, so K and the image size are kept small where they are
# not the point of the case.
SHAPES = [
    pytest.param(1, 64, 7, 64, 64, 3, id="B1-K64-7x7-to-64"),  # a single sample
    pytest.param(5, 64, 13, 97, 97, 4, id="B5-K64-13x13-to-97"),  # odd map and image: no power of 2
    pytest.param(10, 64, 14, 64, 64, 4, id="B10-K64-14x14-to-64"),  # VGG16/MobileNetV2 map size, B=10
    pytest.param(5, 1024, 7, 64, 48, 4, id="B5-K1024-7x7-to-64x48"),  # K=1024 (VGG16), non-square image
    pytest.param(2, 64, 28, 97, 64, 3, id="B2-K64-28x28-to-97x64"),  # 28x28 map, odd non-square image
]
# Full-size images and K=2048 cost seconds per sample in the interpreter (about 10 s for the first
# case: the upsampling adjoint walks 224x224 pixels, the K-reductions 64 blocks of 784 cells), so
# they get one sample and fewer dtype/layout combinations.
FULL_SIZE = [
    # ResNet50-CAM with the large feature map, at the paper's input size.
    pytest.param(1, 2048, 28, 224, 224, 5, torch.float32, False, 1e-5, 1e-5, id="B1-K2048-28x28-224-fp32"),
    pytest.param(1, 2048, 28, 224, 224, 5, torch.bfloat16, True, 1e-2, 1e-3, id="B1-K2048-28x28-224-bf16-cl"),
    # x32 upsampling: each source row's stencil spans ~70 output rows.
    pytest.param(1, 64, 7, 224, 224, 2, torch.float16, False, 1e-3, 1e-3, id="B1-K64-7x7-224-fp16"),
]


def set_labels(batch: int, num_classes: int) -> torch.Tensor:
    """Pairs of samples share a class (the reduction over samples of one class is exercised) and
    the last class is absent (its gradient row must be exactly zero)."""
    return (torch.arange(batch) // 2) % (num_classes - 1)


def make_inputs(batch, channels, map_size, height, width, num_classes, dtype, channels_last, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, channels, map_size, map_size, generator=gen).relu()  # post-ReLU
    images = torch.randn(batch, 3, height, width, generator=gen)
    weight = torch.randn(num_classes, channels, generator=gen) * channels**-0.5
    grad_out = torch.randn(batch, 3, height, width, generator=gen)
    features, images = features.to(dtype), images.to(dtype)
    if channels_last:
        features = features.to(memory_format=torch.channels_last)
        images = images.to(memory_format=torch.channels_last)
    return features, weight, set_labels(batch, num_classes), images, grad_out


def value_and_weight_grad(fn, features, weight, labels, images, grad_out, **kwargs):
    weight = weight.clone().requires_grad_(True)
    out = fn(features, weight, labels, images, **kwargs)
    (out.float() * grad_out).sum().backward()
    return out, weight.grad


def check_against_reference(features, weight, labels, images, grad_out, value_atol, grad_atol):
    out, grad = value_and_weight_grad(cam_mask, features, weight, labels, images, grad_out)
    assert out.dtype == images.dtype and out.shape == images.shape
    assert out.stride() == images.stride(), "the masked images keep the images' memory format"
    out_ref, grad_ref = value_and_weight_grad(cam_mask_ref, features, weight, labels, images, grad_out)
    grad_scale = float(grad_ref.abs().max())
    absent = sorted(set(range(weight.shape[0])) - set(labels.tolist()))
    assert torch.all(grad[absent] == 0), "rows of classes absent from the batch must get no gradient"
    if images.dtype == torch.float32 and features.dtype == torch.float32:
        assert_close(out, out_ref, atol=value_atol, rtol=1e-5, what="masked images")
        assert_close(grad, grad_ref, atol=grad_atol * grad_scale, rtol=1e-4, what="dL/dW")
    else:
        # PyTorch's own error: the same literal computation done in the half dtype.
        half = images.dtype
        out_torch, grad_torch = value_and_weight_grad(
            cam_mask_ref, features, weight, labels, images, grad_out, compute_dtype=half
        )
        assert_within_torch_error(out, out_ref, out_torch, atol=value_atol, what="masked images")
        assert_within_torch_error(grad, grad_ref, grad_torch, atol=grad_atol * grad_scale, what="dL/dW")


@pytest.mark.parametrize("dtype,channels_last,value_atol,grad_atol", DTYPE_LAYOUTS)
@pytest.mark.parametrize("batch,channels,map_size,height,width,num_classes", SHAPES)
def test_cam_mask_matches_reference(
    batch, channels, map_size, height, width, num_classes, dtype, channels_last, value_atol, grad_atol
):
    inputs = make_inputs(batch, channels, map_size, height, width, num_classes, dtype, channels_last)
    check_against_reference(*inputs, value_atol, grad_atol)


@pytest.mark.parametrize(
    "batch,channels,map_size,height,width,num_classes,dtype,channels_last,value_atol,grad_atol", FULL_SIZE
)
def test_cam_mask_full_size(
    batch, channels, map_size, height, width, num_classes, dtype, channels_last, value_atol, grad_atol
):
    inputs = make_inputs(batch, channels, map_size, height, width, num_classes, dtype, channels_last, seed=1)
    check_against_reference(*inputs, value_atol, grad_atol)


def test_bf16_features_with_fp32_images():
    # The autocast case: bf16 backbone features, fp32 images and weight. Both paths read the same
    # bf16 values and compute in fp32, so the comparison is tight and the output is fp32.
    features, weight, labels, images, grad_out = make_inputs(4, 96, 7, 40, 40, 3, torch.float32, False)
    features = features.to(torch.bfloat16)
    out, grad = value_and_weight_grad(cam_mask, features, weight, labels, images, grad_out)
    out_ref, grad_ref = value_and_weight_grad(cam_mask_ref, features, weight, labels, images, grad_out)
    assert out.dtype == torch.float32
    assert_close(out, out_ref, atol=1e-5, rtol=1e-5, what="masked images")
    assert_close(grad, grad_ref, atol=1e-5 * float(grad_ref.abs().max()), rtol=1e-4, what="dL/dW")


def test_expanded_stride0_gradient():
    # VERIFY.md trap (a): the gradient of .sum() reaches the backward as an expanded, stride-0 tensor.
    features, weight, labels, images, _ = make_inputs(3, 32, 5, 24, 24, 3, torch.float32, False)
    seen = []
    w = weight.clone().requires_grad_(True)
    out = cam_mask(features, w, labels, images)
    out.register_hook(lambda g: seen.append(g.stride()))
    out.sum().backward()
    assert seen and 0 in seen[0], f"the incoming gradient is not stride-0 ({seen}): the case is not tested"
    w_ref = weight.clone().requires_grad_(True)
    cam_mask_ref(features, w_ref, labels, images).sum().backward()
    assert_close(w.grad, w_ref.grad, atol=1e-5 * float(w_ref.grad.abs().max()), rtol=1e-4, what="dL/dW")


def test_ties_at_min_and_max_split_the_gradient_evenly():
    # Integer-valued features and weights: the CAM is exact in both paths, with two cells tied at the
    # minimum and two at the maximum whose features differ, so how the min/max gradient is shared
    # between tied cells changes dL/dW. The reference's amin/amax split it evenly.
    h = w = 4
    cam_terms = torch.tensor([[0, 1, 2, 1], [1, 3, 2, 4], [2, 1, 3, 2], [4, 1, 2, 0]], dtype=torch.float32)
    features = torch.zeros(1, 3, h, w)
    features[0, 0] = cam_terms  # weight 1 on channel 0: the CAM is cam_terms (min 0 twice, max 4 twice)
    features[0, 1] = torch.arange(h * w, dtype=torch.float32).reshape(h, w) % 7  # weight 0: no CAM effect
    features[0, 2] = (torch.arange(h * w, dtype=torch.float32).reshape(h, w) * 7) % 3
    weight = torch.tensor([[1.0, 0.0, 0.0], [0.5, -1.0, 2.0]])
    labels = torch.tensor([0])
    images = torch.randn(1, 3, 10, 9, generator=torch.Generator().manual_seed(3))
    grad_out = torch.randn(1, 3, 10, 9, generator=torch.Generator().manual_seed(4))

    out, grad = value_and_weight_grad(cam_mask, features, weight, labels, images, grad_out)
    out_ref, grad_ref = value_and_weight_grad(cam_mask_ref, features, weight, labels, images, grad_out)
    assert_close(out, out_ref, atol=1e-6, rtol=1e-6, what="masked images")
    assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5, what="dL/dW with tied min/max cells")

    # The test has teeth: giving each extreme to a single cell (torch.min/max(dim) style) changes dL/dW.
    def single_index_ref(features, weight, labels, images):
        cam = torch.einsum("bk,bkhw->bhw", weight[labels], features).flatten(1)
        lo, hi = cam.min(dim=1, keepdim=True).values, cam.max(dim=1, keepdim=True).values
        heat = ((cam - lo) / (hi - lo + CAM_EPS)).view(-1, 1, h, w)
        up = F.interpolate(heat, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return images * up

    _, grad_single = value_and_weight_grad(single_index_ref, features, weight, labels, images, grad_out)
    assert (grad_single - grad_ref).abs().max() > 1e-3, "ties do not matter here: the test cannot fail"


def test_constant_maps_are_finite():
    # Sample 0: features constant over space (a constant non-zero CAM); sample 1: all-zero features
    # (the constant 0 CAM); sample 2: a normal map. Each has its own class; class 3 is absent.
    gen = torch.Generator().manual_seed(5)
    features = torch.rand(3, 16, 5, 5, generator=gen)
    features[0] = torch.rand(16, 1, 1, generator=gen).expand(16, 5, 5)
    features[1] = 0
    weight = torch.randn(4, 16, generator=gen)
    labels = torch.tensor([0, 1, 2])
    images = torch.randn(3, 3, 20, 20, generator=gen)
    grad_out = torch.randn(3, 3, 20, 20, generator=gen)

    out, grad = value_and_weight_grad(cam_mask, features, weight, labels, images, grad_out)
    out_ref, grad_ref = value_and_weight_grad(cam_mask_ref, features, weight, labels, images, grad_out)
    assert torch.all(out[:2] == 0), "a constant map normalises to 0: the image is fully masked"
    assert_close(out, out_ref, atol=1e-6, rtol=1e-5, what="masked images")
    assert torch.isfinite(grad).all(), "a constant map must give a finite gradient"
    assert torch.all(grad[1] == 0) and torch.all(grad[3] == 0), "zero features / absent class: zero row"
    assert_close(grad[2], grad_ref[2], atol=1e-5 * float(grad_ref[2].abs().max()), rtol=1e-4, what="dL/dW[2]")
    # Row 0 is exactly 0 in exact arithmetic (every cell ties for min and max, and F is constant over
    # the cells), but each term is amplified by 1/CAM_EPS, so fp32 gives rounding noise of size about
    # max|F| * sum|dL/dH| / CAM_EPS * h*w * 2^-23 (sum|dL/dH| <= sum|dL/dout * x|, the stencil
    # weights sum to 1). Kernel and fp32 reference must both stay within that of the fp64 truth.
    _, grad_fp64 = value_and_weight_grad(
        cam_mask_ref, features.double(), weight.double(), labels, images.double(), grad_out.double()
    )
    noise = float(features[0].abs().max() * (grad_out * images).abs().sum() / CAM_EPS * 25 * 2.0**-23)
    assert_close(grad_ref[0], grad_fp64[0], atol=noise, rtol=0, what="fp32 reference, constant map row")
    assert_close(grad[0], grad_fp64[0], atol=noise, rtol=0, what="kernel, constant map row")


def test_strided_labels_and_weight():
    # Labels as a strided view and the weight stored transposed (strides (1, C)): both are read
    # through their strides / made contiguous by the launcher, not assumed dense.
    features, weight, _, images, grad_out = make_inputs(3, 40, 6, 30, 30, 5, torch.float32, True)
    labels = torch.tensor([4, 9, 0, 9, 2, 9])[::2]  # [4, 0, 2]
    weight_t = weight.t().contiguous().t()
    assert not labels.is_contiguous() and weight_t.stride() == (1, 5)
    out, grad = value_and_weight_grad(cam_mask, features, weight_t, labels, images, grad_out)
    out_ref, grad_ref = value_and_weight_grad(cam_mask_ref, features, weight, labels, images, grad_out)
    assert_close(out, out_ref, atol=1e-5, rtol=1e-5, what="masked images")
    assert_close(grad, grad_ref, atol=1e-5 * float(grad_ref.abs().max()), rtol=1e-4, what="dL/dW")


@pytest.mark.parametrize(
    "map_h,map_w,height,width",
    [
        pytest.param(5, 7, 21, 30, id="5x7-to-21x30"),  # wider than high: a row is w cells, not h
        pytest.param(7, 5, 30, 21, id="7x5-to-30x21"),  # higher than wide (row * h would read past the map)
        pytest.param(1, 6, 9, 17, id="1x6-to-9x17"),  # a single row
        pytest.param(6, 1, 17, 9, id="6x1-to-17x9"),  # a single column
    ],
)
def test_non_square_feature_maps_match_reference(map_h, map_w, height, width):
    # The kernels address the [h*w] CAM row-major (cell (i, j) at i * w + j) in the forward's four
    # bilinear corners and in the backward's per-row gradient: on a square map i * h and i * w are
    # the same address, so only a map with h != w tells them apart. Values and dL/dW.
    gen = torch.Generator().manual_seed(map_h * 10 + map_w)
    features = torch.randn(4, 24, map_h, map_w, generator=gen).relu()
    weight = torch.randn(3, 24, generator=gen) * 24**-0.5
    labels = torch.tensor([0, 0, 2, 1])
    images = torch.randn(4, 3, height, width, generator=gen)
    grad_out = torch.randn(4, 3, height, width, generator=gen)
    out, grad = value_and_weight_grad(cam_mask, features, weight, labels, images, grad_out)
    out_ref, grad_ref = value_and_weight_grad(cam_mask_ref, features, weight, labels, images, grad_out)
    # fp32 against fp32: the kernels differ from the reference only in summation order (K = 24
    # products per cell, bilinear sums of 4), a few ulps of values of order 1
    assert_close(out, out_ref, atol=1e-5, rtol=1e-5, what=f"masked images, {map_h}x{map_w} map")
    assert_close(grad, grad_ref, atol=1e-5 * float(grad_ref.abs().max()), rtol=1e-4, what="dL/dW")
