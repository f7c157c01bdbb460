"""The fast box evaluator against the reference, count for count, and the facts its tracing relies on.

Maps of every kind go through both implementations: smooth multi-blob CAMs (bicubic from 7x7,
14x14, 28x28, min-max), the same with strong noise (many tiny components and holes), rings,
checkerboards, white noise, all-zero, constant, a single pixel, blobs cut by the border, maps
with few distinct values (ties), and ring-plus-square scenes built so that the largest contour is
only known by tracing. The per-threshold booleans must be identical, with one contour and with
all contours, at intervals 0.01 and 0.001, and each way of deciding a threshold (union-find only,
hole pass, tracing) must be exercised.
"""


import cv2
import numpy as np
import pytest
from scoremap_samples import box_correct_fast, realistic_scoremaps
from shared_data import shared_data_dir

from mmcam_fast.data.metadata import load_metadata
from mmcam_fast.errors import DataError
from mmcam_fast.evaluation import BoxEvaluator, accumulate_boxes, gt_boxes_224
from mmcam_fast.evaluation.box_fast import box_correct_fast_u8_rules, foreground_bbox, to_uint8
from mmcam_fast.evaluation.box_reference import box_correct_reference

DATA = shared_data_dir()
META = DATA / "wsol-metadata"
TAUS_100 = np.arange(0, 1, 0.01)
TAUS_1000 = np.arange(0, 1, 0.001)
IOUS = [30, 50, 70]
SIZE = 224


def min_max(m):
    m = np.asarray(m, dtype=np.float64)
    span = m.max() - m.min()
    return (m - m.min()) / span if span > 0 else np.zeros_like(m)


def smooth_cam(rng, noise=0.0):
    """A CAM as real backbones give it: blobs on a small grid, bicubic to 224, min-max."""
    size = int(rng.choice([7, 14, 28]))
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    cam = rng.normal(0, 0.03, (size, size))
    for _ in range(int(rng.integers(1, 5))):
        cx, cy = rng.uniform(-1, size + 1, 2)  # some blobs are cut by the border
        sx, sy = rng.uniform(0.4, size / 3, 2)
        blob = np.exp(-(xx - cx) ** 2 / (2 * sx ** 2) - (yy - cy) ** 2 / (2 * sy ** 2))
        cam += rng.uniform(0.3, 1.0) * blob
    cam += noise * rng.random((size, size))
    return min_max(cv2.resize(cam, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC))


def rings(rng):
    """Concentric and separate rings of different widths and heights, some on the border."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    m = np.zeros((SIZE, SIZE))
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0, SIZE, 2)
        radius, width = rng.uniform(5, 90), rng.uniform(1, 12)
        d = np.hypot(xx - cx, yy - cy)
        m = np.maximum(m, rng.uniform(0.3, 1) * np.clip(1 - np.abs(d - radius) / width, 0, 1))
    return m


def checkerboard(rng):
    block = int(rng.choice([1, 2, 3, 7]))
    board = (np.indices((SIZE, SIZE)) // block).sum(axis=0) % 2
    return board * rng.uniform(0.2, 1.0, (SIZE, SIZE)) ** 0.2


def ring_and_square(rng):
    """A ring (a component with a hole: area only bounded) beside a solid square of similar area.

    With one contour the protocol keeps whichever has the larger contour area; the union-find
    cannot tell from its data, so these thresholds are traced.
    """
    m = np.zeros((SIZE, SIZE))
    side = int(rng.integers(30, 60))
    x, y = int(rng.integers(0, 40)), int(rng.integers(0, 100))
    m[y:y + side, x:x + side] = 1.0
    m[y + 3:y + side - 3, x + 3:x + side - 3] = 0.0  # ring of width 3
    inner = int(side * rng.uniform(0.5, 0.75))
    x2 = 120 + int(rng.integers(0, 40))
    m[y:y + inner, x2:x2 + inner] = rng.uniform(0.6, 1.0)
    return m


def special_maps(rng):
    maps = []
    maps.extend(np.round(smooth_cam(rng) * 4) / 4 for _ in range(3))  # few values: many ties
    for _ in range(3):  # equal 2x2 squares (area 1 each): ties for the largest contour
        m = np.zeros((SIZE, SIZE))
        for x, y in rng.integers(0, 222, (40, 2)):
            m[y:y + 2, x:x + 2] = rng.choice([0.5, 1.0])
        maps.append(m)
    for _ in range(2):  # isolated pixels and lines only: every contour has area 0
        m = np.zeros((SIZE, SIZE))
        m[rng.integers(0, SIZE, 150), rng.integers(0, SIZE, 150)] = rng.random(150)
        maps.append(m)
    maps.extend(rings(rng) for _ in range(4))
    maps.extend(checkerboard(rng) for _ in range(3))
    maps.append(rng.random((SIZE, SIZE)))  # white noise: thousands of components and holes
    maps.extend(smooth_cam(rng) * 0.3 for _ in range(2))  # max 0.3: cuts int(tau * 76)
    maps.extend(ring_and_square(rng) for _ in range(4))
    single = np.zeros((SIZE, SIZE))
    single[int(rng.integers(0, SIZE)), int(rng.integers(0, SIZE))] = 1.0
    corner = np.zeros((SIZE, SIZE))
    corner[0, SIZE - 1] = 1.0
    maps.extend([single, corner, np.zeros((SIZE, SIZE)), np.ones((SIZE, SIZE)), np.full((SIZE, SIZE), 0.5)])
    return [np.asarray(m, dtype=np.float64) for m in maps]


def random_boxes(rng, n):
    boxes = []
    for _ in range(n):
        x0, y0 = rng.integers(0, 200, 2)
        w, h = rng.integers(4, SIZE - max(x0, y0), 2)
        extra = [] if rng.random() < 0.7 else [(0, 0, int(rng.integers(1, 60)), int(rng.integers(1, 60)))]
        boxes.append([(int(x0), int(y0), int(min(x0 + w, 223)), int(min(y0 + h, 223))), *extra])
    return boxes


def boxes_on(scoremap, rng):
    """A ground-truth box on the map's main blob (so that high IoUs occur), sometimes two."""
    ys, xs = np.nonzero(scoremap > scoremap.max() * rng.uniform(0.2, 0.6)) if scoremap.max() > 0 else ([], [])
    if len(xs) == 0:
        return random_boxes(rng, 1)[0]
    box = (int(xs.min()), int(ys.min()), int(min(xs.max() + rng.integers(0, 3), 223)),
           int(min(ys.max() + rng.integers(0, 3), 223)))
    return [box] if rng.random() < 0.7 else [box, random_boxes(rng, 1)[0][0]]


def assert_same(scoremaps, boxes, taus, multi, stats=None):
    for i, (scoremap, gt) in enumerate(zip(scoremaps, boxes, strict=True)):
        scoremap = np.asarray(scoremap, dtype=np.float64)
        expected = box_correct_reference(scoremap, gt, taus, IOUS, multi)
        got = box_correct_fast(scoremap, gt, taus, IOUS, multi, stats)
        if not np.array_equal(expected, got):
            bad = np.argwhere(expected != got)[:5].tolist()
            pytest.fail(f"map {i} (multi={multi}): fast differs from reference at [iou, tau] {bad}")


@pytest.mark.parametrize("multi", [False, True])
def test_fast_equals_reference_on_random_maps(multi):
    rng = np.random.default_rng(0)
    maps = [smooth_cam(rng) for _ in range(60)]
    maps += [smooth_cam(rng, noise=rng.uniform(0.3, 1.0)) for _ in range(30)]  # many tiny blobs and holes
    maps += special_maps(rng)
    boxes = [boxes_on(m, rng) if k % 3 else random_boxes(rng, 1)[0] for k, m in enumerate(maps)]
    stats = {}
    assert_same(maps, boxes, TAUS_100, multi, stats)
    # every way of deciding a threshold was taken
    assert stats["empty"] > 0
    if multi:
        assert stats["holes"] > 0
    else:
        assert stats["traced"] > 0


@pytest.mark.parametrize("multi", [False, True])
def test_fast_equals_reference_at_1000_thresholds(multi):
    rng = np.random.default_rng(1)
    maps = [smooth_cam(rng, noise=rng.uniform(0, 0.6)) for _ in range(8)] + [ring_and_square(rng), rings(rng)]
    assert_same(maps, [boxes_on(m, rng) for m in maps], TAUS_1000, multi)


@pytest.mark.parametrize(("dataset", "split", "seed"), [("CUB", "test", 3), ("ILSVRC", "val", 4)])
def test_fast_equals_reference_on_real_boxes(dataset, split, seed):
    # real ground truth (rescaled), maps from the synthetic CAM pipeline peaking inside it; both
    # box modes, the evaluators' counts compared directly
    metadata = load_metadata(META / dataset / split)
    gt = gt_boxes_224(metadata)
    ids = list(np.random.default_rng(seed).choice(metadata.image_ids, 60, replace=False))
    maps = realistic_scoremaps(len(ids), seed=seed, gt_boxes=[gt[i] for i in ids])
    for multi in (False, True):
        evaluators = [BoxEvaluator(gt, multi_contour=multi, impl=impl) for impl in ("reference", "fast")]
        for evaluator in evaluators:
            accumulate_boxes([evaluator], zip(ids, maps, strict=True))
        np.testing.assert_array_equal(evaluators[0].num_correct, evaluators[1].num_correct)
        assert evaluators[0].compute() == evaluators[1].compute()


def test_both_rules_from_one_pass_equal_the_reference():
    # MaxBoxAcc and MaxBoxAccV2 from one pass (different IoU cuts per rule), as an evaluation of
    # both metrics uses it
    rng = np.random.default_rng(10)
    maps = [smooth_cam(rng, noise=rng.uniform(0, 0.8)) for _ in range(12)]
    maps += [ring_and_square(rng) for _ in range(3)]
    rules = [([50], False), (IOUS, True)]
    stats = {}
    for scoremap in maps:
        gt = boxes_on(scoremap, rng)
        got = box_correct_fast_u8_rules(to_uint8(scoremap), gt, TAUS_100, rules, stats)
        for (ious, multi), correct in zip(rules, got, strict=True):
            np.testing.assert_array_equal(correct, box_correct_reference(scoremap, gt, TAUS_100, ious, multi))
    assert stats["holes"] > 0 and stats["traced"] > 0


def test_other_map_sizes_and_threshold_lists():
    # the fast path is not tied to 224x224, nor to thresholds in [0, 1)
    rng = np.random.default_rng(6)
    taus = np.array([-0.2, 0.0, 0.05, 0.5, 0.93, 1.0, 1.7])
    for h, w in ((1, 1), (1, 9), (7, 1), (13, 31), (64, 40)):
        m = min_max(cv2.resize(rng.random((3, 3)), (w, h), interpolation=cv2.INTER_CUBIC))
        gt = [(0, 0, max(0, w // 2), max(0, h // 2))]
        for multi in (False, True):
            np.testing.assert_array_equal(box_correct_fast(m, gt, taus, IOUS, multi),
                                          box_correct_reference(m, gt, taus, IOUS, multi))


def test_maps_that_are_not_2d_are_refused():
    with pytest.raises(DataError, match="2-D score map"):
        box_correct_fast(np.zeros(5), [(0, 0, 1, 1)], TAUS_100, IOUS, False)


def test_accumulate_in_worker_processes_or_threads_gives_the_same_counts():
    rng = np.random.default_rng(5)
    maps = [smooth_cam(rng, noise=0.3 * (k % 2)) for k in range(40)]
    gt = {f"i{k}": b for k, b in enumerate(random_boxes(rng, len(maps)))}
    items = list(zip(gt, maps, strict=True))

    def evaluators():
        return [BoxEvaluator(gt, iou_thresholds=[50]), BoxEvaluator(gt, multi_contour=True)]

    single = evaluators()
    assert accumulate_boxes(single, items, threads=1) == 40
    for kwargs in ({"processes": 2}, {"threads": 3}, {}):  # {}: one thread per core
        pooled = evaluators()
        assert accumulate_boxes(pooled, items, **kwargs) == 40
        for a, b in zip(single, pooled, strict=True):
            np.testing.assert_array_equal(a.num_correct, b.num_correct)
    # and per image, through the reference: threads change nothing but the time
    reference = [BoxEvaluator(gt, iou_thresholds=[50], impl="reference"),
                 BoxEvaluator(gt, multi_contour=True, impl="reference")]
    accumulate_boxes(reference, items, threads=2)
    for a, b in zip(single, reference, strict=True):
        np.testing.assert_array_equal(a.num_correct, b.num_correct)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        accumulate_boxes(evaluators(), items, threads=0)


def test_foreground_bbox_and_cropped_contours_match_the_full_image():
    # the traced thresholds are traced on the foreground's crop
    rng = np.random.default_rng(7)
    for scoremap in [smooth_cam(rng, noise=0.8) for _ in range(4)] + [ring_and_square(rng)]:
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

    rng = np.random.default_rng(8)
    for scoremap in [smooth_cam(rng, noise=1.0) for _ in range(4)]:
        u = to_uint8(scoremap)
        for t in (20, 120, 220):
            contours = cv2.findContours(((u > t) * 255).astype(np.uint8), cv2.RETR_TREE,
                                        cv2.CHAIN_APPROX_SIMPLE)[0]
            if not contours:
                continue
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
    # other choice changes the count. The fast path knows that order without tracing.
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
        stats = {}
        np.testing.assert_array_equal(box_correct_fast(scoremap, gt, [0.5], [50], False, stats), expected)
        assert stats["traced"] == 0
