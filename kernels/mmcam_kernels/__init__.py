"""mmcam_kernels: the Triton kernels of mmcam_fast (``kernels/mmcam_kernels/``, imported by that name).

Two fused ops, each with Triton forward/backward kernels, host launchers registered as
``torch.library.triton_op`` (namespace ``mmcam``), an autograd Function and a plain-PyTorch
reference beside it:

- :func:`cam_mask` / :func:`cam_mask_ref`: CAM, min-max normalisation, bilinear upsampling and the
  multiply with the images (gradient w.r.t. the classifier weight).
- :func:`set_regularizers` / :func:`set_regularizers_ref`: the CRR and FRR losses over sets.

Use ``mmcam_fast.ops`` to pick between the kernels and the references.
"""

from ._launch import INTERPRETED, KERNEL_CONFIGS
from .cam_mask import CAM_EPS, CamMaskFunction, at_least_fp32_dtype, cam_mask, cam_mask_ref
from .set_regularizers import (
    MIN_SET_SIZE,
    SetRegularizersFunction,
    check_set_batch,
    set_regularizers,
    set_regularizers_ref,
)

__all__ = [
    "CAM_EPS",
    "INTERPRETED",
    "KERNEL_CONFIGS",
    "MIN_SET_SIZE",
    "CamMaskFunction",
    "SetRegularizersFunction",
    "at_least_fp32_dtype",
    "cam_mask",
    "cam_mask_ref",
    "check_set_batch",
    "set_regularizers",
    "set_regularizers_ref",
]
