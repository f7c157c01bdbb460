"""MaxBoxAcc / MaxBoxAccV2 on small hand-built score maps, with hand-computed expected numbers.

Every case runs through both implementations. Box arithmetic used below: a contour's box is
``(x, y, min(x + w, 223), min(y + h, 223))`` with ``w = last - first + 1``, so a blob covering
pixels x0..x1 gets the box x0..x1+1 (one past its last pixel) unless clipped at 223; IoU counts
inclusive pixels.
"""

import numpy as np
import pytest

from mmcam_fast.errors import ConfigError, DataError
from mmcam_fast.evaluation import BoxEvaluator, box_iou, resize_box
from mmcam_fast.evaluation.box_reference import box_ious_reference

IMPLS = ["reference", "fast"]


def blank():
    return np.zeros((224, 224), dtype=np.float32)


def evaluate(scoremap, gt, impl, multi, cam_thresholds=(0.5,), iou=(30, 50, 70)):
    evaluator = BoxEvaluator({"img": gt}, cam_thresholds=list(cam_thresholds), iou_thresholds=list(iou),
                             multi_contour=multi, impl=impl)
    evaluator.accumulate(scoremap, "img")
    return evaluator.compute()


def test_resize_box_truncates_like_the_protocol():
    # 10*224/500 = 4.48, 20*224/334 = 13.41, 499*224/500 = 223.55, 333*224/334 = 223.33
    assert resize_box((10, 20, 499, 333), (500, 334)) == (4, 13, 223, 223)


def test_iou_counts_inclusive_pixels():
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == 50 / 150  # 5x10 overlap, 100 + 100 - 50 union
    assert box_iou((0, 0, 0, 0), (2, 2, 3, 3)) == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_thin_line_loses_to_small_blob(impl):
    # A 100-pixel line (row 20, x 10..109) encloses area 0; a 25-pixel blob (x 100..104,
    # y 150..154) encloses 4 * 4 = 16. By pixel count the line would win; by contour area the blob.
    scoremap = blank()
    scoremap[20, 10:110] = 1.0
    scoremap[150:155, 100:105] = 1.0
    blob_gt = [(100, 150, 104, 154)]  # blob's box (100, 150, 105, 155): IoU 25 / 36 = 0.694
    result = evaluate(scoremap, blob_gt, impl, multi=False)
    assert result.per_iou == {30: 100.0, 50: 100.0, 70: 0.0}
    line_gt = [(10, 20, 109, 20)]
    assert evaluate(scoremap, line_gt, impl, multi=False).per_iou == {30: 0.0, 50: 0.0, 70: 0.0}
    # multi-contour: the line's box (10, 20, 110, 21) covers 202 pixels: IoU 100 / 202 = 0.495
    assert evaluate(scoremap, line_gt, impl, multi=True).per_iou == {30: 100.0, 50: 0.0, 70: 0.0}


def test_thin_line_ious_by_hand():
    scoremap = blank().astype(np.float64)
    scoremap[20, 10:110] = 1.0
    scoremap[150:155, 100:105] = 1.0
    assert box_ious_reference(scoremap, [(100, 150, 104, 154)], [0.5], False) == [25 / 36]
    assert box_ious_reference(scoremap, [(10, 20, 109, 20)], [0.5], True) == [100 / 202]


@pytest.mark.parametrize("impl", IMPLS)
def test_hole_box_can_be_the_best_match(impl):
    # A ring (x, y 50..89) with a hole (60..79) holding an island (68..71). RETR_TREE gives three
    # contours: the ring's outer border, box (50, 50, 90, 90); the hole's border, traced on the
    # ring pixels around it (59..80), box (59, 59, 81, 81); the island, box (68, 68, 72, 72).
    scoremap = blank()
    scoremap[50:90, 50:90] = 1.0
    scoremap[60:80, 60:80] = 0.0
    scoremap[68:72, 68:72] = 1.0
    gt = [(60, 60, 79, 79)]  # the hole itself, 400 pixels
    # largest contour = the outer border: IoU 400 / 1681 = 0.238
    assert evaluate(scoremap, gt, impl, multi=False).per_iou == {30: 0.0, 50: 0.0, 70: 0.0}
    # all contours: the hole's box wins with IoU 400 / 529 = 0.756
    assert evaluate(scoremap, gt, impl, multi=True).per_iou == {30: 100.0, 50: 100.0, 70: 100.0}


@pytest.mark.parametrize("impl", IMPLS)
def test_several_gt_boxes_best_match_and_best_threshold(impl):
    # blob A: value 1.0 on x, y 20..29; blob B: value 0.6 on x 120..139, y 100..119 (uint8 153:
    # float32 0.6 is 0.6000000238, times 255 is 153.000006).
    # Thresholds 0, 0.5, 0.7 give uint8 cuts 0, 127, 178: A and B, A and B, A only. The largest
    # contour is B (area 19 * 19) while it is there, A (9 * 9) after.
    scoremap = blank()
    scoremap[20:30, 20:30] = 1.0
    scoremap[100:120, 120:140] = 0.6
    gt_a, gt_b = (20, 20, 29, 29), (120, 100, 139, 119)
    taus = (0.0, 0.5, 0.7)
    # only A annotated: B's box misses it at the first two thresholds; A's box: IoU 100 / 121
    result = evaluate(scoremap, [gt_a], impl, multi=False, cam_thresholds=taus)
    assert result.per_iou == {30: 100.0, 50: 100.0, 70: 100.0}
    assert result.best_threshold == {30: 0.7, 50: 0.7, 70: 0.7}
    # both annotated: B's box matches B (IoU 400 / 441), so the first threshold already works
    result = evaluate(scoremap, [gt_a, gt_b], impl, multi=False, cam_thresholds=taus)
    assert result.best_threshold == {30: 0.0, 50: 0.0, 70: 0.0}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("multi", [False, True])
def test_all_zero_map_gives_the_box_at_the_origin(impl, multi):
    # No contour at any threshold: the protocol's box (0, 0, 0, 0), one pixel. It still matches a
    # two-pixel box at the origin with IoU 1 / 2.
    taus = (0.0, 0.3, 0.6, 0.9)
    assert evaluate(blank(), [(0, 0, 0, 1)], impl, multi, taus).per_iou == {30: 100.0, 50: 100.0, 70: 0.0}
    assert evaluate(blank(), [(10, 10, 50, 50)], impl, multi, taus).per_iou == {30: 0.0, 50: 0.0, 70: 0.0}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value", [1.0, 0.5])
def test_constant_map_gives_the_whole_image(impl, value):
    # uint8 value 255 or 127 everywhere, every cut int(tau * max) is below it: one contour, the
    # image border, box (0, 0, min(0 + 224, 223), 223).
    scoremap = np.full((224, 224), value, dtype=np.float32)
    full = evaluate(scoremap, [(0, 0, 223, 223)], impl, False, (0.0, 0.5, 0.99))
    assert full.per_iou == {30: 100.0, 50: 100.0, 70: 100.0}
    # a quarter of the image: IoU 112 * 112 / (224 * 224) = 0.25
    quarter = evaluate(scoremap, [(0, 0, 111, 111)], impl, True, (0.0, 0.5, 0.99))
    assert quarter.per_iou == {30: 0.0, 50: 0.0, 70: 0.0}


@pytest.mark.parametrize("impl", IMPLS)
def test_box_touching_the_border_is_clipped_to_223(impl):
    # A 2x2 blob at x 222..223: box x0 222, x1 = min(222 + 2, 223) = 223, y 50..52: 2 * 3 = 6
    # pixels, IoU with the blob (4 pixels) 4 / 6 = 0.667. The same blob inside the image gets
    # (100, 50, 102, 52), 9 pixels: IoU 4 / 9 = 0.444.
    scoremap = blank()
    scoremap[50:52, 222:224] = 1.0
    assert evaluate(scoremap, [(222, 50, 223, 51)], impl, False).per_iou == {30: 100.0, 50: 100.0, 70: 0.0}
    inner = blank()
    inner[50:52, 100:102] = 1.0
    assert evaluate(inner, [(100, 50, 101, 51)], impl, False).per_iou == {30: 100.0, 50: 0.0, 70: 0.0}
    # the bottom-right corner: clipped on both axes, box (222, 222, 223, 223) == the blob
    corner = blank()
    corner[222:, 222:] = 1.0
    ious = box_ious_reference(corner.astype(np.float64), [(222, 222, 223, 223)], [0.5], False)
    assert ious == [1.0]


@pytest.mark.parametrize("impl", IMPLS)
def test_accuracy_is_a_mean_over_images_at_the_best_threshold(impl):
    # image a: one blob, box (10, 10, 30, 30), IoU 400 / 441 at both thresholds.
    # image b: max uint8 76 (0.3); at tau 0 (cut 0) a weaker but larger region (0.1, uint8 25,
    # 60 x 74 pixels at the top-right) is the largest contour, box (150, 0, 223, 60), IoU 0; at
    # tau 0.5 (cut int(0.5 * 76) = 38) only the 0.3 blob is left: IoU 1600 / 1681.
    a = blank()
    a[10:30, 10:30] = 1.0
    b = blank()
    b[100:140, 100:140] = 0.3
    b[0:60, 150:224] = 0.1
    gt = {"a": [(10, 10, 29, 29)], "b": [(100, 100, 139, 139)]}
    evaluator = BoxEvaluator(gt, cam_thresholds=[0.0, 0.5], iou_thresholds=[50], impl=impl)
    evaluator.accumulate(a, "a")
    evaluator.accumulate(b, "b")
    assert evaluator.num_correct.tolist() == [[1, 2]]
    result = evaluator.compute()
    assert result.per_iou == {50: 100.0} and result.best_threshold == {50: 0.5} and result.images == 2


def test_bad_configuration_and_unknown_images():
    with pytest.raises(ConfigError, match="cam_curve_interval"):
        BoxEvaluator({"a": [(0, 0, 1, 1)]}, cam_curve_interval=0)
    with pytest.raises(ConfigError, match="iou thresholds"):
        BoxEvaluator({"a": [(0, 0, 1, 1)]}, iou_thresholds=[50, 150])
    with pytest.raises(ConfigError, match="impl"):
        BoxEvaluator({"a": [(0, 0, 1, 1)]}, impl="turbo")
    with pytest.raises(DataError, match="no ground-truth box"):
        BoxEvaluator({"a": []})
    evaluator = BoxEvaluator({"a": [(0, 0, 1, 1)]})
    with pytest.raises(DataError, match="image zzz"):
        evaluator.accumulate(blank(), "zzz")
    with pytest.raises(DataError, match="no image"):
        evaluator.compute()
