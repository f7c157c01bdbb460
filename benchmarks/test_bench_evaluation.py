"""Box evaluation, reference against fast, on the same realistic score maps in one run.

    pytest benchmarks/test_bench_evaluation.py --benchmark-only
    python benchmarks/test_bench_evaluation.py          # prints the speed-up ratios

The maps: 300 synthetic CAMs (7x7, 14x14, 28x28, bicubic to 224, min-max) peaking inside the real
ground-truth boxes of 150 CUB test and 150 ILSVRC val images, a quarter of them with strong noise.
"""

from __future__ import annotations

import sys  # noqa: I001 - the tests' data helpers (tests/) must be importable first
from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "tests"))

import time
from functools import lru_cache

import numpy as np
import pytest
from scoremap_samples import realistic_scoremaps  # noqa: E402
from shared_data import shared_data_dir  # noqa: E402

from mmcam_fast.data.metadata import load_metadata
from mmcam_fast.evaluation import BoxEvaluator, accumulate_boxes, gt_boxes_224
from mmcam_fast.evaluation.box_fast import box_correct_fast_u8_rules, to_uint8
from mmcam_fast.evaluation.box_reference import box_correct_reference
from mmcam_fast.evaluation.parallel import resolve_threads
from mmcam_fast.evaluation.thresholds import cam_thresholds

META = shared_data_dir() / "wsol-metadata"
PER_DATASET = 150
# what an evaluation of a box data set computes: MaxBoxAcc (largest contour, IoU 50) and
# MaxBoxAccV2 (every contour, IoU 30 / 50 / 70)
BOTH_RULES = (([50], False), ([30, 50, 70], True))


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


def evaluate(impl: str, multi: bool, interval: float, items: list, processes: int = 1,
             threads: int | None = 1) -> BoxEvaluator:
    gt, _ = workload()
    evaluator = BoxEvaluator(gt, cam_curve_interval=interval, multi_contour=multi, impl=impl)
    accumulate_boxes([evaluator], items, processes=processes, check=False, threads=threads)
    return evaluator


# The variants timed against each other: the protocol's reference in one thread (as its own code
# runs), the fast evaluator in one thread, and the fast evaluator as the evaluate command runs it
# (threads=None: one thread per core).
VARIANTS = {"reference": ("reference", 1), "fast-1thread": ("fast", 1), "fast": ("fast", None)}


# (interval, every k-th map, rounds): 100 CAM thresholds (the paper's tables) on 300 maps, and
# 1000 (the protocol's default interval) on 30
SETTINGS = {"interval_001": (0.01, 1, 3), "interval_0001": (0.001, 10, 2)}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["single", "multi"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_box(benchmark, setting, variant, mode):
    interval, every, rounds = SETTINGS[setting]
    _, items = workload()
    items = items[::every]
    benchmark.group = f"box {mode}-contour, interval {interval}, {len(items)} maps"
    impl, threads = VARIANTS[variant]
    evaluator = benchmark.pedantic(evaluate, args=(impl, mode == "multi", interval, items),
                                   kwargs={"threads": threads}, rounds=rounds, iterations=1, warmup_rounds=1)
    assert evaluator.count == len(items)


def both_rules(impl: str, items: list, interval: float = 0.01) -> list[np.ndarray]:
    """MaxBoxAcc and MaxBoxAccV2 counts over ``items``; the fast path does both in one pass per map."""
    gt, _ = workload()
    taus = cam_thresholds(interval)
    counts = [np.zeros((len(ious), len(taus)), np.int64) for ious, _ in BOTH_RULES]
    for image_id, scoremap in items:
        if impl == "reference":
            results = [box_correct_reference(scoremap, gt[image_id], taus, ious, multi)
                       for ious, multi in BOTH_RULES]
        else:
            results = box_correct_fast_u8_rules(to_uint8(scoremap), gt[image_id], taus, BOTH_RULES)
        for total, correct in zip(counts, results, strict=True):
            total += correct
    return counts


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_box_both_rules_interval_001(benchmark, impl):
    """MaxBoxAcc and MaxBoxAccV2 together, 100 CAM thresholds, 300 maps."""
    benchmark.group = "box MaxBoxAcc + MaxBoxAccV2, interval 0.01, 300 maps"
    _, items = workload()
    counts = benchmark.pedantic(both_rules, args=(impl, items), rounds=3, iterations=1, warmup_rounds=1)
    assert counts[0].shape == (1, 100) and counts[1].shape == (3, 100)


def _interleaved(multi: bool, interval: float, items: list, chunk: int = 10) -> tuple[float, float]:
    """Total reference and fast time over ``items``, alternating chunk by chunk, one thread each.

    On a shared machine the load drifts; alternating small chunks gives both implementations the
    same conditions. Times are CPU seconds of this process (less sensitive to other processes than
    wall time; there is no other thread to count). The evaluators are built once, outside the
    timing: what is timed is the per-map work, score map in, counts out.
    """
    gt, _ = workload()
    evaluators = {impl: BoxEvaluator(gt, cam_curve_interval=interval, multi_contour=multi, impl=impl)
                  for impl in ("reference", "fast")}
    totals = dict.fromkeys(evaluators, 0.0)
    for start in range(0, len(items), chunk):
        for impl, evaluator in evaluators.items():
            begin = time.process_time()
            accumulate_boxes([evaluator], items[start:start + chunk], check=False, threads=1)
            totals[impl] += time.process_time() - begin
    assert np.array_equal(evaluators["reference"].num_correct, evaluators["fast"].num_correct)
    return totals["reference"], totals["fast"]


def _wall(impl: str, multi: bool, interval: float, items: list, threads: int | None, rounds: int = 3
          ) -> tuple[float, BoxEvaluator]:
    """Best wall time of ``rounds`` evaluations (threads: CPU time would add the threads' times)."""
    times = []
    for _ in range(rounds):
        begin = time.perf_counter()
        evaluator = evaluate(impl, multi, interval, items, threads=threads)
        times.append(time.perf_counter() - begin)
    return min(times), evaluator


def print_ratios() -> None:
    """Reference and fast time per map and their ratio, per setting."""
    _, items = workload()
    for multi in (False, True):  # load (or compile) the fast path's kernels before timing
        evaluate("fast", multi, 0.01, items[:2])
    print(f"{'setting':46s} {'reference':>12s} {'fast':>12s} {'ratio':>7s}")
    for interval, subset in ((0.01, items), (0.001, items[::10])):
        for multi in (False, True):
            ref, fast = _interleaved(multi, interval, subset)
            name = f"{'multi' if multi else 'single'}-contour, interval {interval}, {len(subset)} maps"
            print(f"{name:46s} {ref / len(subset) * 1e3:9.2f} ms {fast / len(subset) * 1e3:9.2f} ms "
                  f"{ref / fast:6.1f}x")
    chunk = 10
    totals = {"reference": 0.0, "fast": 0.0}
    counts = {impl: [] for impl in totals}
    for start in range(0, len(items), chunk):
        for impl in totals:
            begin = time.process_time()
            counts[impl].append(both_rules(impl, items[start:start + chunk]))
            totals[impl] += time.process_time() - begin
    for ref_part, fast_part in zip(counts["reference"], counts["fast"], strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(ref_part, fast_part, strict=True))
    ref, fast = totals["reference"], totals["fast"]
    name = f"both rules, interval 0.01, {len(items)} maps"
    print(f"{name:46s} {ref / len(items) * 1e3:9.2f} ms {fast / len(items) * 1e3:9.2f} ms {ref / fast:6.1f}x")
    threads = resolve_threads(None)
    print(f"\nwall time, best of 3: reference in 1 thread, fast in 1 and {threads} threads (one per core)")
    print(f"{'setting':46s} {'reference':>12s} {'fast 1 thr':>12s} {'fast':>12s} {'ratio':>7s}")
    for interval, subset in ((0.01, items), (0.001, items[::10])):
        for multi in (False, True):
            ref, ref_eval = _wall("reference", multi, interval, subset, 1)
            one, _ = _wall("fast", multi, interval, subset, 1)
            many, fast_eval = _wall("fast", multi, interval, subset, None)
            assert np.array_equal(ref_eval.num_correct, fast_eval.num_correct)
            name = f"{'multi' if multi else 'single'}-contour, interval {interval}, {len(subset)} maps"
            per_map = [t / len(subset) * 1e3 for t in (ref, one, many)]
            print(f"{name:46s} " + " ".join(f"{t:9.2f} ms" for t in per_map) + f" {ref / many:6.1f}x")
    begin = time.perf_counter()
    evaluate("fast", True, 0.01, items, processes=2)
    print(f"multi-contour, interval 0.01, fast, 2 processes: {time.perf_counter() - begin:.2f} s wall "
          f"for {len(items)} maps (worker start-up included)")


if __name__ == "__main__":
    print_ratios()
