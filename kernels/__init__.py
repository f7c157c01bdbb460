"""mmcam_kernels: the Triton kernels of mmcam_fast (installed from the top-level folder kernels/)."""
