"""Box evaluation, reference against fast, on the same realistic score maps in one run.

    pytest benchmarks/test_bench_evaluation.py --benchmark-only
    python benchmarks/test_bench_evaluation.py          # prints the speed-up ratios

The maps: 300 synthetic CAMs (7x7, 14x14, 28x28, bicubic to 224, min-max) peaking inside the real
ground-truth boxes of 150 CUB test and 150 ILSVRC val images, a quarter of them with strong noise.
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from mmcam_fast.data.metadata import load_metadata
from mmcam_fast.evaluation import BoxEvaluator, accumulate_boxes, gt_boxes_224
from mmcam_fast.evaluation.synthetic import realistic_scoremaps

META = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wsol-metadata"
PER_DATASET = 150


@lru_cache(maxsize=1)
def workload() -> tuple[dict, list]:
    """Ground truth and ``(image_id, scoremap)`` pairs, the same for every benchmark."""
    gt, items = {}, []
    for k, (dataset, split) in enumerate((("CUB", "test"), ("ILSVRC", "val"))):
        metadata = load_metadata(META / dataset / split)
        boxes = gt_boxes_224(metadata)
        ids = list(np.random.default_rng(k).choice(metadata.image_ids, PER_DATASET, replace=False))
        maps = realistic_scoremaps(len(ids), seed=100 + k, gt_boxes=[boxes[i] for i in ids])
        gt.update({i: boxes[i] for i in ids})
        items.extend((i, m.astype(np.float64)) for i, m in zip(ids, maps, strict=True))
    return gt, items


def evaluate(impl: str, multi: bool, interval: float, items: list, workers: int = 1) -> BoxEvaluator:
    gt, _ = workload()
    evaluator = BoxEvaluator(gt, cam_curve_interval=interval, multi_contour=multi, impl=impl)
    accumulate_boxes([evaluator], items, workers=workers, check=False)
    return evaluator


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("mode", ["single", "multi"])
def test_box_interval_001(benchmark, impl, mode):
    """100 CAM thresholds (the paper's tables), 300 maps."""
    benchmark.group = f"box {mode}-contour, interval 0.01, 300 maps"
    _, items = workload()
    evaluator = benchmark.pedantic(evaluate, args=(impl, mode == "multi", 0.01, items), rounds=3,
                                   iterations=1)
    assert evaluator.count == len(items)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("mode", ["single", "multi"])
def test_box_interval_0001(benchmark, impl, mode):
    """1000 CAM thresholds (the protocol's default interval), 30 maps."""
    benchmark.group = f"box {mode}-contour, interval 0.001, 30 maps"
    _, items = workload()
    evaluator = benchmark.pedantic(evaluate, args=(impl, mode == "multi", 0.001, items[::10]), rounds=2,
                                   iterations=1)
    assert evaluator.count == len(items[::10])


def _best_time(repeat: int, *args, **kwargs) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        evaluate(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def _row(name: str, maps: int, ref: float, fast: float) -> None:
    print(f"{name:48s} {ref / maps * 1e3:9.2f} ms {fast / maps * 1e3:9.2f} ms {ref / fast:6.1f}x")


def print_ratios(repeat: int = 3) -> None:
    """Reference and fast wall time per map and their ratio, per setting (best of ``repeat``)."""
    _, items = workload()
    print(f"{'setting':48s} {'reference':>12s} {'fast':>12s} {'ratio':>7s}")
    for interval, subset in ((0.01, items), (0.001, items[::10])):
        for multi in (False, True):
            ref = _best_time(repeat, "reference", multi, interval, subset)
            fast = _best_time(repeat, "fast", multi, interval, subset)
            mode = "multi" if multi else "single"
            _row(f"{mode}-contour, interval {interval}, {len(subset)} maps", len(subset), ref, fast)
    for multi in (False, True):
        ref = _best_time(1, "reference", multi, 0.01, items)
        fast = _best_time(repeat, "fast", multi, 0.01, items, workers=2)
        _row(f"{'multi' if multi else 'single'}-contour, 0.01, fast in 2 processes", len(items), ref, fast)


if __name__ == "__main__":
    print_ratios()
