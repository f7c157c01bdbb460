"""The DALI pipeline of the protocol's train and eval transforms (imports ``nvidia.dali``).

One definition for both decode devices: ``"mixed"`` decodes JPEG on the GPU (nvJPEG, with the CPU's
fancy chroma upsampling so both devices decode alike) and everything after it runs on the GPU;
``"cpu"`` runs the same graph on CPU operators. The steps mirror ``transforms.py`` exactly:

    train: decode -> resize (R, R) -> crop C x C at the planned anchor -> flips -> normalize
    eval:  decode -> resize (C, C) -> normalize

The resize is DALI's linear filter with antialiasing on 8-bit pixels, which is PIL's antialiased
bilinear filter (torchvision's ``Resize`` on a PIL image): over all interior pixels the two agree to
one level in 255; PIL renormalizes its filter where it overhangs the image border while DALI clamps
the coordinates, so on downscaling the outermost row and column can differ more (docs/data.md, "DALI").
Crop anchors and flips come from the plan (``dali_source.PlanSource``), not from DALI's random
generators: an epoch's augmentations are a function of (seed, rank, epoch, position), whatever the
number of threads or workers, and a resumed run continues them exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from mmcam_fast.data.dali_source import PlanSource
from mmcam_fast.data.dali_spec import TRAIN, TransformSpec

DECODE_DEVICES = ("cpu", "mixed")
_OUTPUT_TYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}


@pipeline_def(enable_conditionals=False)
def wsol_pipeline(source: PlanSource, spec: TransformSpec, decode_device: str = "cpu", parallel: bool = False,
                  image_dtype: str = "float32", channels_last: bool = True, source_prefetch: int = 2):
    """Decode, transform and normalize the images the plan names.

    Args:
        source: the per-sample external source (``augment`` set for a train transform).
        spec: the transform (``dali_spec.transform_spec`` of the data set's transform).
        decode_device: ``"mixed"`` (GPU) or ``"cpu"``.
        parallel: run ``source`` in DALI's Python worker processes (``py_num_workers``, spawn).
        image_dtype: ``"float32"`` or ``"float16"``.
        channels_last: HWC output (a channels-last ``[B, 3, C, C]`` tensor in torch), else CHW.
        source_prefetch: batches the parallel source prepares ahead.

    Returns:
        images, labels [1], indices [1], original sizes ([H, W, C] of the file), status [1].
    """
    train = spec.kind == TRAIN
    extra = {"prefetch_queue_depth": source_prefetch} if parallel else {}
    outputs = fn.external_source(
        source=source, num_outputs=5 if train else 4, batch=False, parallel=parallel,
        dtype=[types.UINT8, types.INT64, types.INT64, types.INT32] + ([types.INT32] if train else []),
        **extra)
    encoded, labels, indices, status = outputs[:4]
    sizes = fn.peek_image_shape(encoded, adjust_orientation=False)
    # EXIF orientation is not applied: boxes and sizes in the metadata refer to the stored pixels.
    images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB,
                               adjust_orientation=False, jpeg_fancy_upsampling=True)
    side = spec.resize_size if train else spec.crop_size
    images = fn.resize(images, size=[side, side], interp_type=types.INTERP_LINEAR, antialias=True)
    mirror = 0
    if train:
        augment = outputs[4]  # crop y, crop x, horizontal flip, vertical flip
        images = fn.slice(images, start=augment[0:2], shape=[spec.crop_size, spec.crop_size],
                          axis_names="HW")
        if spec.vertical_flip:
            images = fn.flip(images, horizontal=0, vertical=augment[3])
        if spec.horizontal_flip:
            mirror = augment[2]
    images = fn.crop_mirror_normalize(
        images, mirror=mirror, dtype=_OUTPUT_TYPES[image_dtype],
        output_layout="HWC" if channels_last else "CHW",
        mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std])
    return images, labels, indices, sizes, status


@pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_pipelined=False,
              exec_async=False)
def _decode_one(source):
    encoded = fn.external_source(source=source, batch=False, dtype=types.UINT8)
    return fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)


class _Items:
    """A per-sample source over a list (DALI inspects the callable's positional parameters)."""

    def __init__(self, items: list[np.ndarray]) -> None:
        self.items = items

    def __call__(self, sample_info):
        return self.items[sample_info.idx_in_epoch]


def dali_decode_failures(encoded: Sequence[np.ndarray]) -> list[int]:
    """Which of these encoded images DALI's CPU decoder refuses (positions in ``encoded``).

    Used only after a pipeline failed, to find the file at fault: one sample per run, unpipelined,
    and a new pipeline after each failure (a DALI pipeline is not usable after an error).
    """
    failures: list[int] = []
    start = 0
    while start < len(encoded):
        pipe = _decode_one(source=_Items(list(encoded[start:])))
        pipe.build()
        done = start
        try:
            for done in range(start, len(encoded)):  # noqa: B007 - the failing position is kept
                pipe.run()
            done = len(encoded)
        except RuntimeError:
            failures.append(done)
            done += 1
        finally:
            del pipe
        start = done
    return failures
