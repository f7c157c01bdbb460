"""The MinMaxCAM method: Stage I classification loss and Stage II CRR / FRR losses.

This module is the specification in code (``docs/method.md``): the steps of both stages, with the
two fused steps of Stage II (CAM masking, the set regularizers) through :mod:`mmcam_fast.ops`, whose
``impl="reference"`` is each op's one plain-PyTorch reference (``mmcam_kernels.*_ref``, literal).
Every fast path (the kernels, the compiled engine) is tested against it for values and for the
fc.weight gradient.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from mmcam_kernels import CAM_EPS, at_least_fp32_dtype, check_set_batch
from torch import nn

from mmcam_fast import ops

# eps of the CAM min-max normalisation: H = (H_raw - min) / (max - min + CAM_EPS), CAM_EPS = 1e-6,
# one constant shared with the kernels. A constant map (max == min) gives H = 0, hence an all-zero
# masked image, instead of NaN; 1e-6 is far below the spread of any non-degenerate CAM, so it does not
# move the normalisation measurably, and it is representable in the fp32 accumulations of half inputs.

# Where Stage II applies the CAM: the input image (the method) or the feature map F (the paper's
# Table 3 ablation: f = g(F * H) at the feature map's resolution, no second backbone pass).
STAGE2_MASKS = ("image", "feature")


def stage1_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Stage I: mean cross-entropy of the classifier (``model.train()``, all parameters)."""
    return F.cross_entropy(logits, labels)


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Run ``module`` in eval mode (BatchNorm running statistics, no dropout), restoring its mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def frozen_call(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``backbone(images)`` with the parameters as constants of the graph.

    Gradients flow to ``images`` only: the backbone is frozen in Stage II (no parameter gradient is
    computed, none is accumulated), without touching ``requires_grad`` flags of the shared module.
    """
    params = {name: p.detach() for name, p in backbone.named_parameters()}
    return torch.func.functional_call(backbone, params, (images,))


def normalized_cams_reference(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
                              ) -> torch.Tensor:
    """Stage II steps 3-4 for the feature-masking ablation: CAM of the label, min-max over h*w,
    ``[B, h, w]`` in at least fp32 (the image-masking method's steps 3-6 are the fused op
    :func:`mmcam_fast.ops.cam_mask`, whose reference is ``mmcam_kernels.cam_mask_ref``)."""
    cams = _at_least_fp32(torch.einsum("bk,bkhw->bhw", weight[labels], features))  # H_raw [B, h, w]
    low = cams.amin(dim=(1, 2), keepdim=True)
    high = cams.amax(dim=(1, 2), keepdim=True)
    return (cams - low) / (high - low + CAM_EPS)


def stage2_losses(backbone: nn.Module, fc: nn.Linear, images: torch.Tensor, labels: torch.Tensor,
                  set_size: int, *, impl: str | None = "reference", mask: str = "image"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage II losses of a set-structured batch, differentiable w.r.t. ``fc.weight`` only.

    Args:
        backbone: the CAM backbone; run in eval mode with frozen parameters (its mode is restored).
        fc: the classifier; only ``fc.weight`` enters the losses (``fc.bias`` does not).
        images: [N*S, 3, H, W] normalized images, set-major (images n*S..n*S+S-1 share a class).
        labels: [N*S] ground-truth classes.
        set_size: S.
        impl: the kernels' vocabulary of :mod:`mmcam_fast.ops`: ``"reference"`` (each fused op's
            plain-PyTorch reference, literal), ``"triton"`` (the fused kernels), or None (the ops'
            rule: by device and the ``MMCAM_KERNELS`` environment variable).
        mask: ``"image"`` (the method) or ``"feature"`` (the Table 3 ablation: ``f = g(F * H)``).

    Returns:
        (crr, frr): scalar tensors.
    """
    ops.check_impl(impl)  # an unknown impl fails before any work
    with eval_mode(backbone):
        return stage2_core(backbone, fc.weight, images, labels, set_size, kernels=impl, mask=mask)


def stage2_core(backbone: nn.Module, weight: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                set_size: int, *, kernels: str | None = "reference", mask: str = "image"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage II steps 2-8 with the backbone already in eval mode: no module state changes here.

    This is the part the fast engine compiles (whole, ``fullgraph=True``), under autocast. The two
    fused steps (3-6: :func:`mmcam_fast.ops.cam_mask`; 8: :func:`mmcam_fast.ops.set_regularizers`)
    go through :mod:`mmcam_fast.ops` with ``kernels`` as their ``impl``. CAMs, their normalisation
    and the losses are computed in at least fp32 whatever the autocast dtype of the backbone.

    ``mask="feature"`` (an ablation, plain PyTorch whatever ``kernels`` says) multiplies the feature
    map by the normalized CAM instead of the image: ``f = g(F * H)``, gradients into ``W`` through H.
    """
    check_set_batch(images.shape[0], set_size)
    if mask not in STAGE2_MASKS:
        raise ValueError(f"mask={mask!r}: choose one of {', '.join(STAGE2_MASKS)}")
    with torch.no_grad():
        features = backbone(images)  # F = B(x), with the weights as updated by Stage I
    f_o = features.mean(dim=(2, 3))  # [B, K], a constant
    if mask == "feature":
        normalized = normalized_cams_reference(features, weight, labels)
        f = (_at_least_fp32(features) * normalized[:, None]).mean(dim=(2, 3))
    else:
        masked = ops.cam_mask(features, weight, labels, images, impl=kernels)
        f = frozen_call(backbone, masked).mean(dim=(2, 3))  # [B, K]
    return ops.set_regularizers(_at_least_fp32(f), _at_least_fp32(f_o), set_size, impl=kernels)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(at_least_fp32_dtype(x))
