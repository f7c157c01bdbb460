"""The fast box evaluator against the reference, count for count, and the facts it relies on."""

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from mmcam_fast.data.metadata import load_metadata
from mmcam_fast.evaluation import BoxEvaluator, accumulate_boxes, gt_boxes_224
from mmcam_fast.evaluation.box_fast import box_correct_fast, to_uint8
from mmcam_fast.evaluation.box_reference import box_correct_reference
from mmcam_fast.evaluation.level_sets import foreground_bbox
from mmcam_fast.evaluation.synthetic import realistic_scoremaps

_DEFAULT_SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
DATA = Path(os.environ.get("MMCAM_SHARED_DATA", _DEFAULT_SHARED))
META = DATA / "wsol-metadata"
TAUS_100 = np.arange(0, 1, 0.01)
TAUS_1000 = np.arange(0, 1, 0.001)
IOUS = [30, 50, 70]


def random_boxes(rng, n):
    boxes = []
    for _ in range(n):
        x0, y0 = rng.integers(0, 200, 2)
        w, h = rng.integers(4, 224 - max(x0, y0), 2)
        extra = [] if rng.random() < 0.7 else [(0, 0, int(rng.integers(1, 60)), int(rng.integers(1, 60)))]
        boxes.append([(int(x0), int(y0), int(min(x0 + w, 223)), int(min(y0 + h, 223))), *extra])
    return boxes


def special_maps(rng):
    """Maps that stress the corner cases: few levels, ties of equal tiny contours, low maxima."""
    maps = []
    quantized = np.round(realistic_scoremaps(4, seed=11) * 4) / 4  # 5 values: many equal images
    maps.extend(quantized)
    for _ in range(4):  # many equal 2x2 squares (area 1 each): ties for the largest contour
        m = np.zeros((224, 224))
        for x, y in rng.integers(0, 222, (40, 2)):
            m[y:y + 2, x:x + 2] = rng.choice([0.5, 1.0])
        maps.append(m)
    for _ in range(4):  # isolated pixels and lines only: every contour has area 0
        m = np.zeros((224, 224))
        m[rng.integers(0, 224, 150), rng.integers(0, 224, 150)] = rng.random(150)
        maps.append(m)
    maps.extend(realistic_scoremaps(4, seed=12) * 0.3)  # max 0.3: cuts int(tau * 76)
    maps.append(np.zeros((224, 224)))
    maps.append(np.ones((224, 224)))
    return [np.asarray(m, dtype=np.float64) for m in maps]


def assert_same(scoremaps, boxes, taus, multi):
    for i, (scoremap, gt) in enumerate(zip(scoremaps, boxes, strict=True)):
        scoremap = np.asarray(scoremap, dtype=np.float64)
        expected = box_correct_reference(scoremap, gt, taus, IOUS, multi)
        got = box_correct_fast(scoremap, gt, taus, IOUS, multi)
        if not np.array_equal(expected, got):
            bad = np.argwhere(expected != got)[:5].tolist()
            pytest.fail(f"map {i} (multi={multi}): fast differs from reference at [iou, tau] {bad}")


@pytest.mark.parametrize("multi", [False, True])
def test_fast_equals_reference_on_random_maps(multi):
    rng = np.random.default_rng(0)
    maps = list(realistic_scoremaps(130, seed=1))  # a quarter with strong noise: many tiny blobs
    maps += special_maps(rng)
    assert_same(maps, random_boxes(rng, len(maps)), TAUS_100, multi)


@pytest.mark.parametrize("multi", [False, True])
def test_fast_equals_reference_at_1000_thresholds(multi):
    rng = np.random.default_rng(1)
    maps = list(realistic_scoremaps(10, seed=2, noisy_fraction=0.5))
    assert_same(maps, random_boxes(rng, len(maps)), TAUS_1000, multi)


@pytest.mark.parametrize(("dataset", "split", "seed"), [("CUB", "test", 3), ("ILSVRC", "val", 4)])
def test_fast_equals_reference_on_real_boxes(dataset, split, seed):
    # real ground truth (rescaled), maps peaking inside it; 100 images, both box modes, the
    # evaluator's counts compared directly
    metadata = load_metadata(META / dataset / split)
    gt = gt_boxes_224(metadata)
    ids = list(np.random.default_rng(seed).choice(metadata.image_ids, 100, replace=False))
    maps = realistic_scoremaps(len(ids), seed=seed, gt_boxes=[gt[i] for i in ids])
    for multi in (False, True):
        evaluators = [BoxEvaluator(gt, multi_contour=multi, impl=impl) for impl in ("reference", "fast")]
        for evaluator in evaluators:
            accumulate_boxes([evaluator], zip(ids, maps, strict=True))
        np.testing.assert_array_equal(evaluators[0].num_correct, evaluators[1].num_correct)
        assert evaluators[0].compute() == evaluators[1].compute()


def test_accumulate_in_worker_processes_gives_the_same_counts():
    rng = np.random.default_rng(5)
    maps = realistic_scoremaps(24, seed=5)
    gt = {f"i{k}": b for k, b in enumerate(random_boxes(rng, len(maps)))}
    items = list(zip(gt, maps, strict=True))
    single = [BoxEvaluator(gt, iou_thresholds=[50]), BoxEvaluator(gt, multi_contour=True)]
    pooled = [BoxEvaluator(gt, iou_thresholds=[50]), BoxEvaluator(gt, multi_contour=True)]
    assert accumulate_boxes(single, items) == 24
    assert accumulate_boxes(pooled, items, workers=2) == 24
    for a, b in zip(single, pooled, strict=True):
        np.testing.assert_array_equal(a.num_correct, b.num_correct)


def test_foreground_bbox_and_cropped_contours_match_the_full_image():
    for scoremap in realistic_scoremaps(6, seed=7, noisy_fraction=0.5):
        u = to_uint8(scoremap)
        levels = np.arange(0, int(u.max()), 7)
        x0, y0, x1, y1 = foreground_bbox(u, levels)
        for k, t in enumerate(levels):
            ys, xs = np.nonzero(u > t)
            assert (x0[k], y0[k], x1[k], y1[k]) == (xs.min(), ys.min(), xs.max(), ys.max())
            binary = ((u > t) * 255).astype(np.uint8)
            full = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
            crop = binary[y0[k]:y1[k] + 1, x0[k]:x1[k] + 1]
            cropped = cv2.findContours(crop, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE,
                                       offset=(int(x0[k]), int(y0[k])))[0]
            assert len(full) == len(cropped)
            assert all(np.array_equal(a, b) for a, b in zip(full, cropped, strict=True))


def test_every_real_metadata_folder_parses():
    expected = {("CUB", "train"): 5994, ("CUB", "val"): 1000, ("CUB", "test"): 5794,
                ("ILSVRC", "val"): 10000, ("OpenImages", "val"): 2500, ("OpenImages", "test"): 5000}
    for (dataset, split), count in expected.items():
        metadata = load_metadata(META / dataset / split)
        assert len(metadata) == count
        if dataset == "OpenImages":
            assert metadata.has_masks and not metadata.boxes
        else:
            gt = gt_boxes_224(metadata)
            assert all(0 <= b[0] <= b[2] <= 223 and 0 <= b[1] <= b[3] <= 223 for v in gt.values() for b in v)


def test_vectorized_areas_and_boxes_equal_opencv():
    from mmcam_fast.evaluation.box_fast import _contour_boxes

    for scoremap in realistic_scoremaps(4, seed=8, noisy_fraction=1.0):
        u = to_uint8(scoremap)
        for t in (20, 120, 220):
            contours = cv2.findContours(((u > t) * 255).astype(np.uint8), cv2.RETR_TREE,
                                        cv2.CHAIN_APPROX_SIMPLE)[0]
            boxes, _ = _contour_boxes(list(contours), np.array([len(contours)]), True, 224, 224)
            for contour, box in zip(contours, boxes, strict=True):
                x, y, w, h = cv2.boundingRect(contour)
                assert tuple(box) == (x, y, min(x + w, 223), min(y + h, 223))
            chosen, _ = _contour_boxes(list(contours), np.array([len(contours)]), False, 224, 224)
            x, y, w, h = cv2.boundingRect(max(contours, key=cv2.contourArea))
            assert tuple(chosen[0]) == (x, y, min(x + w, 223), min(y + h, 223))


def test_ties_of_the_largest_contour_are_broken_like_the_reference():
    # Ten equal 3x3 squares (area 4 each) and GT on one of them: the reference keeps the first
    # square in OpenCV's contour order (its box, 4x4 pixels, has IoU 9 / 16 with its square); any
    # other choice changes the count.
    rng = np.random.default_rng(9)
    scoremap = np.zeros((224, 224))
    grid = rng.permutation(np.mgrid[0:10, 0:10].reshape(2, -1).T)[:10] * 22 + 2
    corners = [(int(x), int(y)) for x, y in grid]
    for x, y in corners:
        scoremap[y:y + 3, x:x + 3] = 1.0
    contours = cv2.findContours((scoremap * 255).astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    assert len({cv2.contourArea(c) for c in contours}) == 1 and len(contours) == 10
    first = cv2.boundingRect(contours[0])[:2]
    for x, y in corners:
        gt = [(x, y, x + 2, y + 2)]
        expected = box_correct_reference(scoremap, gt, [0.5], [50], False)
        assert expected[0, 0] == ((x, y) == first)
        np.testing.assert_array_equal(box_correct_fast(scoremap, gt, [0.5], [50], False), expected)
