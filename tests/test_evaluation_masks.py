"""PxAP: hand-computed on small masks (ignore regions overlapping the foreground), fast against
reference, and on the real OpenImages sample masks."""

import os

import cv2
import numpy as np
import pytest
from scoremap_samples import realistic_scoremaps
from shared_data import shared_data_dir

from mmcam_fast.data.metadata import load_metadata, write_metadata
from mmcam_fast.errors import DataError
from mmcam_fast.evaluation import MaskEvaluator, load_gt_mask, pxap_from_histograms

DATA = shared_data_dir()
META = DATA / "wsol-metadata"
SAMPLE_MASKS = META / "openimages-sample" / "test_masks"
IMPLS = ["reference", "fast"]


def rows_mask(size, first, last):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[first:last + 1] = 255
    return mask


@pytest.fixture
def hand_case(tmp_path):
    """One image. At 224x224: instance 1 on rows 0..49, instance 2 on rows 40..79 (stored at
    112x112, rows 20..39: nearest-neighbour upscaling doubles them), ignore mask on rows 60..119
    (stored at 448x448, rows 120..239). Foreground = rows 0..79; ignored = rows 80..119 (the
    ignore mask's part on the foreground stays foreground); background = rows 120..223."""
    cv2.imwrite(str(tmp_path / "m1.png"), rows_mask(224, 0, 49))
    cv2.imwrite(str(tmp_path / "m2.png"), rows_mask(112, 20, 39))
    cv2.imwrite(str(tmp_path / "ignore.png"), rows_mask(448, 120, 239))
    scoremap = np.zeros((224, 224))
    scoremap[0:40] = 0.9  # foreground, bin [0.5, 1)
    scoremap[0, 0] = 1.0  # one foreground pixel in bin [1, 2)
    scoremap[40:80] = 0.2  # foreground, bin [0, 0.5)
    scoremap[80:120] = 1.0  # ignored: must not count anywhere
    scoremap[120:160] = 0.7  # background, bin [0.5, 1)
    return tmp_path, scoremap


def test_gt_mask_combines_instances_and_ignore(hand_case):
    mask_dir, _ = hand_case
    gt = load_gt_mask(mask_dir, ["m1.png", "m2.png"], "ignore.png")
    assert (gt[0:80] == 1).all() and (gt[80:120] == 255).all() and (gt[120:] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_pxap_by_hand(hand_case, impl):
    mask_dir, scoremap = hand_case
    evaluator = MaskEvaluator({"a": ["m1.png", "m2.png"]}, {"a": "ignore.png"}, mask_dir,
                              cam_thresholds=[0.0, 0.5], impl=impl)
    evaluator.accumulate(scoremap, "a")
    # bins [0, .5), [.5, 1), [1, 2), [2, 3]; 224 pixels a row
    assert evaluator.true_hist.tolist() == [40 * 224, 40 * 224 - 1, 1, 0]
    assert evaluator.false_hist.tolist() == [64 * 224, 40 * 224, 0, 0]
    # from the top bin down: tp = 0, 1, 8960, 17920; fp = 0, 0, 8960, 23296; 17920 positives
    # precision = -, 1, 1/2, 17920/41216; recall = 0, 1/17920, 1/2, 1 (the 0/0 first bin is masked)
    expected = 100 * (1 * (1 / 17920) + 0.5 * (0.5 - 1 / 17920) + (17920 / 41216) * 0.5)
    # the same three products summed in float64 by both (2^-53 = 1.1e-16 each): a few ulps apart
    assert evaluator.compute() == pytest.approx(expected, rel=1e-12)


def test_pxap_errors_without_positives():
    with pytest.raises(DataError, match="no positive ground-truth"):
        pxap_from_histograms(np.zeros(4), np.array([3.0, 0, 0, 0]))
    with pytest.raises(DataError, match="no positive ground-truth"):
        pxap_from_histograms(np.zeros(4), np.zeros(4))


def test_fast_equals_reference_on_random_masks(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"img{i}.jpg" for i in range(12)]
    mask_paths, ignore_paths = {}, {}
    for i, image_id in enumerate(ids):
        size = int(rng.choice([100, 224, 333]))
        paths = []
        for k in range(int(rng.integers(1, 3))):
            mask = np.zeros((size, size), np.uint8)
            x, y = rng.integers(0, size // 2, 2)
            mask[y:y + size // 3, x:x + size // 2] = 255
            cv2.imwrite(str(tmp_path / f"{i}_{k}.png"), mask)
            paths.append(f"{i}_{k}.png")
        ignore = np.zeros((size, size), np.uint8)
        ignore[: size // 2, : size // 2] = 255
        cv2.imwrite(str(tmp_path / f"{i}_ignore.png"), ignore)
        mask_paths[image_id], ignore_paths[image_id] = paths, f"{i}_ignore.png" if i % 4 else ""
    maps = list(realistic_scoremaps(len(ids), seed=1))
    maps[0] = maps[0].astype(np.float64) ** 1.5  # not float32-exact: the fast path's float64 branch
    for interval, processes in ((0.01, 1), (0.001, 1), (0.01, 2)):
        evaluators = [MaskEvaluator(mask_paths, ignore_paths, tmp_path, cam_curve_interval=interval,
                                    impl=impl) for impl in IMPLS]
        for evaluator in evaluators:
            evaluator.accumulate_many(zip(ids, maps, strict=True), processes=processes)
        np.testing.assert_array_equal(evaluators[0].true_hist, evaluators[1].true_hist)
        np.testing.assert_array_equal(evaluators[0].false_hist, evaluators[1].false_hist)
        assert evaluators[0].compute() == evaluators[1].compute()


def test_missing_masks_are_listed(tmp_path):
    cv2.imwrite(str(tmp_path / "ok.png"), rows_mask(224, 0, 9))
    with pytest.raises(DataError, match=r"2 missing mask file\(s\)") as err:
        MaskEvaluator({"a": ["ok.png"], "b": ["gone.png"], "c": ["ok.png"]},
                      {"a": "", "b": "", "c": "nope.png"}, tmp_path)
    assert "mask of image b" in str(err.value) and str(tmp_path / "gone.png") in str(err.value)
    assert str(tmp_path / "nope.png") in str(err.value)
    evaluator = MaskEvaluator({"b": ["gone.png"]}, {"b": ""}, tmp_path, check_files=False)
    with pytest.raises(DataError, match=r"mask of image b: .*gone\.png is missing"):
        evaluator.accumulate(np.zeros((224, 224)), "b")


def sample_metadata(tmp_path):
    """A metadata folder for the OpenImages val images whose real masks are in the sample."""
    full = load_metadata(META / "OpenImages" / "val")
    available = {str(p.relative_to(SAMPLE_MASKS)) for p in SAMPLE_MASKS.rglob("*.png")}
    ids = [i for i in full.image_ids if set(full.mask_paths[i]) <= available]
    assert len(ids) == 5
    folder = write_metadata(tmp_path / "meta" / "OpenImages" / "val", ids, {i: full.labels[i] for i in ids},
                            mask_paths={i: full.mask_paths[i] for i in ids},
                            ignore_paths={i: full.ignore_paths[i] for i in ids})
    mask_root = tmp_path / "masks"
    mask_root.mkdir()
    os.symlink(SAMPLE_MASKS, mask_root / "OpenImages")  # masks are read from <mask_root>/OpenImages/
    return load_metadata(folder), mask_root


def test_real_openimages_masks(tmp_path):
    metadata, mask_root = sample_metadata(tmp_path)
    assert any(len(p) == 2 for p in metadata.mask_paths.values())  # an image with two instances
    maps = realistic_scoremaps(len(metadata), seed=3)
    results = []
    for impl in IMPLS:
        evaluator = MaskEvaluator.from_metadata(metadata, mask_root / "OpenImages", impl=impl)
        evaluator.accumulate_many(zip(metadata.image_ids, maps, strict=True))
        results.append((evaluator.true_hist.copy(), evaluator.false_hist.copy(), evaluator.compute()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2] and 0 < results[0][2] < 100
    # a perfect map (1 on the foreground, 0 elsewhere) has PxAP 100
    perfect = MaskEvaluator.from_metadata(metadata, mask_root / "OpenImages")
    for image_id in metadata.image_ids:
        gt = load_gt_mask(mask_root / "OpenImages", metadata.mask_paths[image_id],
                          metadata.ignore_paths[image_id])
        perfect.accumulate((gt == 1).astype(np.float64), image_id)
    assert perfect.compute() == 100.0
