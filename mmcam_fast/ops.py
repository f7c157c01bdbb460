"""The one dispatch point between the fused Triton kernels and their plain-PyTorch references.

Nothing else in mmcam_fast branches on the device to pick an implementation: callers pass
``impl`` through (or leave it ``None``) and this module decides.

Rule, for ``impl=None``: the environment variable ``MMCAM_KERNELS`` ("reference" or "triton") if it
is set and non-empty, else "triton" for CUDA tensors and "reference" for any other device.
``impl="triton"`` on CPU tensors runs the kernels through Triton's interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before triton is first imported.
"""

from __future__ import annotations

import os

import mmcam_kernels
import torch

IMPLS = ("reference", "triton")
ENV_VAR = "MMCAM_KERNELS"


def check_impl(impl: str | None, source: str = "impl") -> None:
    """Raise ValueError unless ``impl`` is None or one of :data:`IMPLS`."""
    if impl is not None and impl not in IMPLS:
        choices = ", ".join(repr(choice) for choice in IMPLS)
        raise ValueError(f"{source}={impl!r} is not a kernel implementation; choose one of {choices}")


def resolve_impl(impl: str | None, device: torch.device | str) -> str:
    """Decide which implementation runs for tensors on ``device``.

    Args:
        impl: "reference", "triton", or None for the default rule (``MMCAM_KERNELS``, else
            "triton" on CUDA and "reference" elsewhere).
        device: the device of the op's inputs.

    Returns:
        "reference" or "triton".

    Raises:
        ValueError: ``impl`` (or ``MMCAM_KERNELS``) is not one of the choices, or "triton" was asked
            for on a non-CUDA device without the Triton interpreter.
    """
    device = torch.device(device)
    source = "impl"
    if impl is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            impl, source = env, f"environment variable {ENV_VAR}"
        else:
            impl = "triton" if device.type == "cuda" else "reference"
    check_impl(impl, source)
    if impl == "triton" and device.type != "cuda" and not mmcam_kernels.INTERPRETED:
        raise ValueError(
            f"{source}='triton' on {device.type} tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "in the environment before Python starts (or use impl='reference', or CUDA tensors)"
        )
    return impl


def cam_mask(
    features: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    images: torch.Tensor,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """Images masked by their min-max normalised, upsampled CAMs (docs/method.md Stage II steps 3-6).

    Args:
        features: backbone feature maps ``[B, K, h, w]``, not requiring grad.
        weight: classifier weight ``[C, K]``; receives the gradient.
        labels: ground-truth class per sample ``[B]`` (int64).
        images: input images ``[B, 3, H, W]``, not requiring grad.
        impl: "reference", "triton" or None (see :func:`resolve_impl`).

    Returns:
        Masked images ``[B, 3, H, W]`` in the images' dtype.
    """
    if resolve_impl(impl, features.device) == "triton":
        return mmcam_kernels.cam_mask(features, weight, labels, images)
    return mmcam_kernels.cam_mask_ref(features, weight, labels, images)


def set_regularizers(
    f: torch.Tensor, f_orig: torch.Tensor, set_size: int, *, impl: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CRR and FRR losses of MinMaxCAM (docs/method.md Stage II step 8).

    Args:
        f: pooled features of the masked images ``[B, K]``, set-major order.
        f_orig: pooled features of the original images ``[B, K]`` (a constant).
        set_size: images per set, at least 2, dividing ``B``.
        impl: "reference", "triton" or None (see :func:`resolve_impl`).

    Returns:
        ``(crr, frr)`` scalars: fp32 (fp64 from the reference for fp64 inputs).

    Raises:
        ValueError: bad ``set_size`` or ``impl``.
    """
    if resolve_impl(impl, f.device) == "triton":
        return mmcam_kernels.set_regularizers(f, f_orig, set_size)
    return mmcam_kernels.set_regularizers_ref(f, f_orig, set_size)
