"""Every public entry point of ``mmcam_fast.evaluation`` that takes boxes or score maps refuses bad
ones with a DataError naming the image and what was expected (no silent IoU 0, no RuntimeWarning)."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from mmcam_fast.data.metadata import WSOLMetadata
from mmcam_fast.errors import DataError
from mmcam_fast.evaluation import (
    BoxEvaluator,
    LocAccuracyEvaluator,
    MaskEvaluator,
    accumulate_boxes,
    box_correct,
    box_iou,
    check_scoremap,
    evaluate_scoremaps,
    gt_boxes_224,
    iou_matrix,
    overlay_image,
    pxap_from_histograms,
    resize_box,
    save_scoremaps,
)

# a NaN or an infinity must fail as a DataError, not pass with a RuntimeWarning
pytestmark = pytest.mark.filterwarnings("error")

GOOD_BOX = (10, 20, 100, 120)
GOOD_MAP = np.zeros((224, 224), np.float32)
GOOD_MAP[20:121, 10:101] = 1.0


def with_value(value, at=(5, 7)):
    scoremap = GOOD_MAP.copy()
    scoremap[at] = value
    return scoremap


BAD_MAPS = [
    pytest.param(with_value(np.nan), r"1 NaN value", id="nan"),
    pytest.param(with_value(np.inf), r"1 infinite value", id="inf"),
    pytest.param(with_value(-np.inf), r"1 infinite value", id="-inf"),
    pytest.param(with_value(1.5), r"values must lie in \[0, 1\], got min 0.0, max 1.5", id="above-1"),
    pytest.param(with_value(-0.1), r"values must lie in \[0, 1\]", id="below-0"),
    pytest.param(np.zeros((100, 100), np.float32), r"expected shape \(224, 224\), got \(100, 100\)",
                 id="shape"),
    pytest.param(np.zeros((224, 224, 1)), r"expected a 2-D array", id="3-d"),
    pytest.param(np.zeros((224, 224), np.uint8), r"expected a float array", id="dtype"),
]

BAD_BOXES = [
    pytest.param([(50, 20, 40, 120)], r"box \(50, 20, 40, 120\) must satisfy x0 <= x1 and y0 <= y1",
                 id="x1<x0"),
    pytest.param([(10, 90, 100, 80)], r"box \(10, 90, 100, 80\) must satisfy x0 <= x1", id="y1<y0"),
    pytest.param([(-3, 20, 100, 120)], r"negative coordinate", id="negative"),
    pytest.param([(10, 20, 100)], r"shape \[N, 4\], got shape \(1, 3\)", id="three-numbers"),
    pytest.param((10, 20, 100, 120), r"shape \[N, 4\], got shape \(4,\)", id="flat"),
    pytest.param([(10.5, 20, 100, 120)], r"finite integer coordinates", id="fraction"),
    pytest.param([(np.nan, 20, 100, 120)], r"finite integer coordinates", id="nan"),
    pytest.param([], r"no ground-truth box", id="empty"),
]


def box_entry_points(scoremap):
    """Every entry point that takes a score map for image 'img', with valid boxes."""
    gt = {"img": [GOOD_BOX]}
    yield "BoxEvaluator.accumulate", lambda: BoxEvaluator(gt).accumulate(scoremap, "img")
    yield "BoxEvaluator.accumulate reference", lambda: BoxEvaluator(gt, impl="reference").accumulate(
        scoremap, "img")
    yield "accumulate_boxes", lambda: accumulate_boxes([BoxEvaluator(gt)], [("img", scoremap)], threads=1)
    yield "box_correct", lambda: box_correct(scoremap, [GOOD_BOX], [0.5], [50], False, image_id="img")
    yield "LocAccuracyEvaluator.accumulate", lambda: LocAccuracyEvaluator(gt, {"img": 0}).accumulate(
        scoremap, "img", [0])
    yield "check_scoremap", lambda: check_scoremap(scoremap, "img")
    yield "overlay_image", lambda: overlay_image(np.zeros((50, 60, 3), np.uint8), scoremap, [], 0.5,
                                                 image_id="img")


@pytest.mark.parametrize(("scoremap", "message"), BAD_MAPS)
def test_bad_score_maps_are_refused_everywhere(scoremap, message, tmp_path):
    if scoremap.shape == (100, 100):  # box_correct and save_scoremaps accept any H x W
        entry_points = [(n, f) for n, f in box_entry_points(scoremap) if n != "box_correct"]
    else:
        entry_points = list(box_entry_points(scoremap))
    entry_points.append(("MaskEvaluator.accumulate", lambda: masks(tmp_path).accumulate(scoremap, "img")))
    entry_points.append(("MaskEvaluator.accumulate_many",
                         lambda: masks(tmp_path).accumulate_many([("img", scoremap)])))
    for name, call in entry_points:
        with pytest.raises(DataError, match=message) as err:
            call()
        assert "image img" in str(err.value), name


@pytest.mark.parametrize(("scoremap", "message"),
                         [p for p in BAD_MAPS if p.id in ("nan", "inf", "-inf", "above-1", "below-0")])
def test_save_scoremaps_writes_no_invalid_map(scoremap, message, tmp_path):
    with pytest.raises(DataError, match=message) as err:
        save_scoremaps(tmp_path, ["a.jpg", "b.jpg"], np.stack([GOOD_MAP, scoremap]))
    assert "score map of image b.jpg" in str(err.value) and "image a.jpg" not in str(err.value)
    assert not list(tmp_path.iterdir())
    with pytest.raises(DataError, match=r"expected shape \[2, H, W\]"):
        save_scoremaps(tmp_path, ["a.jpg", "b.jpg"], np.zeros((2, 224, 224, 1)))


def test_evaluate_scoremaps_checks_maps_and_metadata_boxes(tmp_path):
    metadata = WSOLMetadata(Path("meta"), ["img"], {"img": 0}, {"img": (300, 200)},
                            {"img": [(10, 20, 50, 40)]})
    with pytest.raises(DataError, match=r"score map of image img: .*1 NaN value"):
        evaluate_scoremaps("CUB", metadata, [("img", with_value(np.nan))])
    with pytest.raises(DataError, match=r"image img: .*infinite"):
        evaluate_scoremaps("synthetic", metadata, [("img", with_value(np.inf))])
    bad = WSOLMetadata(Path("meta"), ["img"], {"img": 0}, {"img": (300, 200)}, {"img": [(60, 20, 50, 40)]})
    for call in (lambda: gt_boxes_224(bad), lambda: evaluate_scoremaps("CUB", bad, [("img", GOOD_MAP)])):
        with pytest.raises(DataError, match=r"box of image img: box \(60, 20, 50, 40\) must satisfy"):
            call()


@pytest.mark.parametrize(("boxes", "message"), BAD_BOXES)
def test_bad_ground_truth_boxes_are_refused_everywhere(boxes, message):
    gt = {"ok": [GOOD_BOX], "img": boxes}
    calls = {
        "BoxEvaluator": lambda: BoxEvaluator(gt),
        "LocAccuracyEvaluator": lambda: LocAccuracyEvaluator(gt, {"ok": 0, "img": 1}),
        "box_correct": lambda: box_correct(GOOD_MAP, boxes, [0.5], [50], False, image_id="img"),
        "box_correct reference": lambda: box_correct(GOOD_MAP, boxes, [0.5], [50], True, "reference",
                                                     image_id="img"),
    }
    if boxes:  # overlays draw images without boxes
        calls["overlay_image"] = lambda: overlay_image(np.zeros((224, 224, 3), np.uint8), GOOD_MAP, boxes,
                                                       0.5, image_id="img")
    for name, call in calls.items():
        with pytest.raises(DataError, match=message) as err:
            call()
        assert "image img" in str(err.value), name


def test_box_helpers_refuse_reversed_boxes():
    # the IoU formula gives 0 (or a meaningless number) for reversed boxes: refused instead
    with pytest.raises(DataError, match=r"box_iou: box \(50, 0, 40, 10\) must satisfy x0 <= x1"):
        box_iou((50, 0, 40, 10), (0, 0, 9, 9))
    with pytest.raises(DataError, match=r"box \(0, 10, 9, 5\) must satisfy"):
        box_iou((0, 0, 9, 9), (0, 10, 9, 5))
    with pytest.raises(DataError, match="must satisfy x0 <= x1"):
        iou_matrix(np.array([[0, 0, 9, 9]]), np.array([[9, 0, 0, 9]]))
    with pytest.raises(DataError, match=r"shape \[N, 4\]"):
        iou_matrix(np.array([[0, 0, 9]]), np.array([[0, 0, 9, 9]]))
    with pytest.raises(DataError, match=r"ground-truth box of image x: box \(9, 0, 1, 5\)"):
        resize_box((9, 0, 1, 5), (100, 100), image_id="x")
    with pytest.raises(DataError, match=r"positive image size"):
        resize_box((0, 0, 1, 5), (0, 100))
    with pytest.raises(DataError, match=r"beyond the 224x224 map"):
        box_correct(GOOD_MAP, [(0, 0, 224, 10)], [0.5], [50], False)
    # valid input keeps its numbers
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == 50 / 150
    assert iou_matrix(np.array([[0, 0, 9, 9]]), np.array([[5, 0, 14, 9]]))[0, 0] == 50 / 150


def test_evaluators_refuse_misshapen_counts():
    evaluator = BoxEvaluator({"img": [GOOD_BOX]}, iou_thresholds=[30, 50])
    with pytest.raises(DataError, match=r"expected \(2, 100\) booleans .*shape \(1, 100\)"):
        evaluator.add(np.zeros((1, 100), bool))  # would broadcast into both rows
    with pytest.raises(DataError, match=r"expected \(2, 100\) booleans .*got int64"):
        evaluator.add(np.zeros((2, 100), np.int64))
    loc = LocAccuracyEvaluator({"img": [GOOD_BOX]}, {"img": 0})
    with pytest.raises(DataError, match=r"image img: expected 100 booleans"):
        loc.add(np.zeros((1, 100), bool), "img", [0])
    with pytest.raises(DataError, match=r"two arrays of shape \[bins\], got \(3,\) and \(4,\)"):
        pxap_from_histograms(np.ones(3), np.ones(4))
    with pytest.raises(DataError, match="finite and non-negative"):
        pxap_from_histograms(np.array([1.0, -1.0]), np.ones(2))
    with pytest.raises(DataError, match="finite and non-negative"):
        pxap_from_histograms(np.array([1.0, np.nan]), np.ones(2))


def masks(tmp_path):
    """A MaskEvaluator for one image 'img' with a real mask file."""
    mask = np.zeros((50, 60), np.uint8)
    mask[10:30, 20:40] = 255
    cv2.imwrite(str(tmp_path / "img.png"), mask)
    return MaskEvaluator({"img": ["img.png"]}, {"img": ""}, tmp_path)


def test_mask_evaluator_add_checks_its_histograms(tmp_path):
    evaluator = masks(tmp_path)
    bins = len(evaluator.true_hist)
    with pytest.raises(DataError, match=rf"shape \[{bins}\], got \(5,\)"):
        evaluator.add((np.ones(5, np.int64), np.ones(5, np.int64)))
    with pytest.raises(DataError, match="integer pixel counts"):
        evaluator.add((np.full(bins, 0.5), np.zeros(bins)))
    evaluator.accumulate(GOOD_MAP, "img")  # valid input goes through
    assert evaluator.count == 1
