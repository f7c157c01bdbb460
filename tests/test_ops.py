"""mmcam_fast.ops, the one dispatch point: the rule, MMCAM_KERNELS, errors; the kernel-level references.

Runs in the normal test process (no Triton interpreter): nothing here launches a kernel.
"""

from __future__ import annotations

import itertools

import mmcam_kernels
import pytest
import torch
import torch.nn.functional as F

from mmcam_fast import ops


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("MMCAM_KERNELS", raising=False)


def test_default_rule_is_triton_on_cuda_and_reference_elsewhere():
    assert ops.resolve_impl(None, torch.device("cuda")) == "triton"
    assert ops.resolve_impl(None, "cuda:1") == "triton"
    assert ops.resolve_impl(None, "cpu") == "reference"
    assert ops.resolve_impl("reference", "cuda") == "reference"
    assert ops.resolve_impl("triton", "cuda") == "triton"


def test_environment_variable_overrides_the_default_but_not_an_explicit_impl(monkeypatch):
    monkeypatch.setenv("MMCAM_KERNELS", "reference")
    assert ops.resolve_impl(None, "cuda") == "reference"
    assert ops.resolve_impl("triton", "cuda") == "triton"
    monkeypatch.setenv("MMCAM_KERNELS", "")
    assert ops.resolve_impl(None, "cuda") == "triton"


@pytest.mark.parametrize("impl", ["cuda", "Triton", "auto"])
def test_unknown_impl_names_the_value_and_the_choices(impl):
    with pytest.raises(ValueError, match=rf"impl='{impl}'.*'reference', 'triton'"):
        ops.resolve_impl(impl, "cpu")


def test_unknown_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("MMCAM_KERNELS", "fast")
    with pytest.raises(ValueError, match=r"MMCAM_KERNELS='fast'.*'reference', 'triton'"):
        ops.resolve_impl(None, "cuda")


def test_triton_on_cpu_without_the_interpreter_says_to_set_it(monkeypatch):
    assert not mmcam_kernels.INTERPRETED, "this module must run without TRITON_INTERPRET"
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.resolve_impl("triton", "cpu")
    monkeypatch.setenv("MMCAM_KERNELS", "triton")
    with pytest.raises(ValueError, match="MMCAM_KERNELS='triton'.*TRITON_INTERPRET=1"):
        labels = torch.zeros(1, dtype=torch.long)
        ops.cam_mask(torch.zeros(1, 2, 3, 3), torch.zeros(2, 2), labels, torch.zeros(1, 3, 6, 6))
    monkeypatch.setattr(mmcam_kernels, "INTERPRETED", True)
    assert ops.resolve_impl("triton", "cpu") == "triton"


def _record(monkeypatch, name):
    calls = []
    monkeypatch.setattr(mmcam_kernels, name, lambda *args, **kwargs: calls.append(args) or "from " + name)
    return calls


def test_calls_are_routed_to_the_resolved_implementation(monkeypatch):
    for name in ("cam_mask", "cam_mask_ref", "set_regularizers", "set_regularizers_ref"):
        _record(monkeypatch, name)
    x = torch.zeros(2, 4)
    labels = torch.zeros(2, dtype=torch.long)
    cam_args = (torch.zeros(2, 4, 3, 3), torch.zeros(3, 4), labels, torch.zeros(2, 3, 6, 6))
    assert ops.cam_mask(*cam_args) == "from cam_mask_ref"
    assert ops.set_regularizers(x, x, 2) == "from set_regularizers_ref"
    monkeypatch.setattr(mmcam_kernels, "INTERPRETED", True)  # triton allowed on CPU
    assert ops.cam_mask(*cam_args, impl="triton") == "from cam_mask"
    monkeypatch.setenv("MMCAM_KERNELS", "triton")
    assert ops.set_regularizers(x, x, 2) == "from set_regularizers"
    assert ops.set_regularizers(x, x, 2, impl="reference") == "from set_regularizers_ref"


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("batch,set_size", [(6, 4), (5, 1), (4, 0)])
def test_bad_set_size_is_rejected_before_any_kernel(batch, set_size, impl, monkeypatch):
    monkeypatch.setattr(mmcam_kernels, "INTERPRETED", True)  # reach the kernel path on CPU
    f = torch.randn(batch, 8)
    with pytest.raises(ValueError, match="set_size"):
        ops.set_regularizers(f, f, set_size, impl=impl)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "weight": torch.zeros(3, 5)}, "weight must be"),  # K mismatch
        (lambda a: {**a, "images": torch.zeros(2, 4, 6, 6)}, "images must be"),  # not 3 channels
        (lambda a: {**a, "labels": torch.zeros(3, dtype=torch.long)}, "labels must be"),  # wrong B
        (lambda a: {**a, "labels": torch.zeros(2)}, "labels must be"),  # float labels
        (lambda a: {**a, "features": a["features"].double()}, "impl='reference'"),  # dtype not for kernels
        (lambda a: {**a, "features": a["features"][0]}, "features must be"),  # 3-D
        (lambda a: {**a, "features": a["features"].requires_grad_(True)}, "weight only"),
    ],
)
def test_cam_mask_kernel_rejects_bad_input(change, message):
    args = {
        "features": torch.zeros(2, 4, 3, 3),
        "weight": torch.zeros(3, 4),
        "labels": torch.zeros(2, dtype=torch.long),
        "images": torch.zeros(2, 3, 6, 6),
    }
    with pytest.raises(ValueError, match=message):
        mmcam_kernels.cam_mask(**change(args))


def test_set_regularizers_kernel_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="f and f_orig must both be"):
        mmcam_kernels.set_regularizers(torch.zeros(4, 8), torch.zeros(4, 9), 2)


def _masked_images_per_image(features, weight, labels, images):
    """docs/method.md Stage II steps 3-6 one image at a time, the sums over k written out."""
    out = []
    for b in range(features.shape[0]):
        cam = sum(weight[labels[b], k] * features[b, k] for k in range(features.shape[1]))  # [h, w]
        heat = (cam - cam.min()) / (cam.max() - cam.min() + mmcam_kernels.CAM_EPS)
        heat_up = F.interpolate(heat[None, None], size=tuple(images.shape[-2:]), mode="bilinear",
                                align_corners=False)[0]
        out.append(images[b] * heat_up)
    return torch.stack(out)


# The *_ref functions are the one specification of each fused op (mmcam_fast.minmaxcam calls them
# through mmcam_fast.ops); here they are held against the steps written out (fp64, so only the
# formulas can differ).
@pytest.mark.parametrize("batch,channels,map_size,height,width", [(3, 5, 4, 13, 9), (2, 8, 7, 7, 7)])
def test_cam_mask_ref_agrees_with_the_steps_written_out(batch, channels, map_size, height, width):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(batch, channels, map_size, map_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(4, channels, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, 0, 3][:batch])
    images = torch.randn(batch, 3, height, width, generator=gen, dtype=torch.float64)
    out = mmcam_kernels.cam_mask_ref(features, weight, labels, images)
    assert out.dtype == torch.float64
    grad = torch.autograd.grad(out.square().sum(), weight)[0]
    out_method = _masked_images_per_image(features, weight, labels, images)
    grad_method = torch.autograd.grad(out_method.square().sum(), weight)[0]
    # float64 (unit roundoff 1.1e-16), the same operations in another order: values to ~1e-15; the
    # gradient passes the min-max division, which can amplify by max|CAM| / range, hence 1e-10
    torch.testing.assert_close(out, out_method, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_method, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch,set_size", [(2, 2), (10, 5), (9, 3)])
def test_set_regularizers_ref_agrees_with_an_explicit_pair_loop(batch, set_size):
    gen = torch.Generator().manual_seed(batch)
    f = torch.randn(batch, 6, generator=gen, dtype=torch.float64)
    f_orig = torch.randn(batch, 6, generator=gen, dtype=torch.float64)
    crr, frr = mmcam_kernels.set_regularizers_ref(f, f_orig, set_size)
    mse = lambda a, b: ((a - b) ** 2).mean()
    sets = [range(n * set_size, (n + 1) * set_size) for n in range(batch // set_size)]
    crr_loop = sum(
        sum(mse(f[i], f[j]) for i, j in itertools.combinations(s, 2)) / (set_size * (set_size - 1) / 2)
        for s in sets
    ) / len(sets)
    frr_loop = sum(mse(f[b], f_orig[b]) for b in range(batch)) / batch
    # float64 sums of a few dozen squares, each ~1e-16 relative: 1e-12 is four orders above that
    torch.testing.assert_close(crr, crr_loop, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(frr, frr_loop, rtol=1e-12, atol=1e-14)


def test_references_ignore_autocast():
    # The references compute in their compute dtype (fp32 here) even inside an autocast region,
    # where einsum would otherwise run in bf16.
    gen = torch.Generator().manual_seed(1)
    features, images = torch.randn(2, 64, 7, 7, generator=gen), torch.randn(2, 3, 20, 20, generator=gen)
    weight, labels = torch.randn(3, 64, generator=gen), torch.tensor([0, 2])
    f, f_orig = torch.randn(4, 64, generator=gen), torch.randn(4, 64, generator=gen)
    expected = mmcam_kernels.cam_mask_ref(features, weight, labels, images)
    losses = mmcam_kernels.set_regularizers_ref(f, f_orig, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(mmcam_kernels.cam_mask_ref(features, weight, labels, images), expected)
        assert mmcam_kernels.set_regularizers_ref(f, f_orig, 2) == losses

