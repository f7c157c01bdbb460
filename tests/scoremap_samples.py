"""Random, realistic score maps for the tests and benchmarks of the evaluators (test code, not library).

CAMs are drawn at the resolutions real backbones give (7x7, 14x14, 28x28) as sums of Gaussian
blobs, optionally placed inside given ground-truth boxes (real CAMs peak on the object), with
background noise, distractor blobs and, for some maps, strong noise that leaves many tiny blobs at
high thresholds; then they go through the same path as real CAMs (:func:`cams_to_scoremaps`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmcam_fast.evaluation.scoremaps import SCOREMAP_SIZE, cams_to_scoremaps

CAM_SIZES = (7, 14, 28)


def random_cam(rng: np.random.Generator, size: int, boxes: Sequence[Sequence[int]] | None = None,
               noisy: bool = False) -> np.ndarray:
    """One ``[size, size]`` CAM: Gaussian blobs (inside ``boxes`` when given) plus noise."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    scale = size / SCOREMAP_SIZE
    cam = rng.normal(0.0, 0.03, (size, size))
    if boxes:
        centers = []
        for x0, y0, x1, y1 in boxes:
            for _ in range(rng.integers(1, 4)):
                centers.append((rng.uniform(x0, x1 + 1) * scale, rng.uniform(y0, y1 + 1) * scale,
                                max(0.4, rng.uniform(0.1, 0.5) * (x1 - x0 + 1) * scale),
                                max(0.4, rng.uniform(0.1, 0.5) * (y1 - y0 + 1) * scale)))
    else:
        count = rng.integers(1, 5)
        centers = [(*rng.uniform(0, size, 2), *rng.uniform(0.4, size / 3, 2)) for _ in range(count)]
    for cx, cy, sx, sy in centers:
        blob = np.exp(-((xx - cx) ** 2 / (2 * sx ** 2) + (yy - cy) ** 2 / (2 * sy ** 2)))
        cam += rng.uniform(0.4, 1.0) * blob
    if rng.random() < 0.3:  # a distractor elsewhere
        cx, cy = rng.uniform(0, size, 2)
        sigma = rng.uniform(0.4, size / 5)
        cam += rng.uniform(0.2, 0.8) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))
    if noisy:  # many tiny blobs that survive up to high thresholds
        cam += rng.uniform(0.3, 1.0) * rng.random((size, size))
    return cam


def realistic_scoremaps(n: int, seed: int = 0, gt_boxes: Sequence[Sequence[Sequence[int]]] | None = None,
                        noisy_fraction: float = 0.25) -> np.ndarray:
    """``[n, 224, 224]`` float32 score maps in [0, 1].

    Args:
        n: number of maps.
        seed: random seed (the maps are a pure function of the arguments).
        gt_boxes: per map, ground-truth boxes at 224x224 to center the blobs in; random blobs if None.
        noisy_fraction: share of maps with strong noise.
    """
    import torch

    rng = np.random.default_rng(seed)
    maps = []
    for i in range(n):
        size = CAM_SIZES[i % len(CAM_SIZES)]
        boxes = gt_boxes[i] if gt_boxes is not None else None
        cam = random_cam(rng, size, boxes, noisy=rng.random() < noisy_fraction)
        maps.append(cams_to_scoremaps(torch.from_numpy(cam)[None])[0].numpy())
    return np.stack(maps) if maps else np.zeros((0, SCOREMAP_SIZE, SCOREMAP_SIZE), np.float32)


def box_correct_fast(scoremap, gt_boxes, cam_thresholds, iou_thresholds, multi_contour, stats=None):
    """The fast box rule on a float map, as the evaluators call it: quantize, then the uint8 rules."""
    from mmcam_fast.evaluation.box_fast import box_correct_fast_u8, to_uint8

    return box_correct_fast_u8(to_uint8(scoremap), gt_boxes, cam_thresholds, iou_thresholds, multi_contour,
                               stats)
