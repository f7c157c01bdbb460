"""GT-known / Top-1 / Top-5 Loc on hand-built images with hand-counted expectations."""

import numpy as np
import pytest

from mmcam_fast.errors import ConfigError, DataError
from mmcam_fast.evaluation import LocAccuracyEvaluator


def blob_map(x0, y0, x1, y1):
    scoremap = np.zeros((224, 224))
    scoremap[y0:y1 + 1, x0:x1 + 1] = 1.0
    return scoremap


GT = {"a": [(20, 20, 59, 59)], "b": [(100, 100, 139, 139)], "c": [(10, 150, 49, 189)],
      "d": [(150, 20, 189, 59)]}
LABELS = {"a": 1, "b": 2, "c": 3, "d": 4}
# a, b, d: the map is the box itself (box one pixel larger: IoU 1600 / 1681); c: the map is elsewhere
MAPS = {"a": blob_map(20, 20, 59, 59), "b": blob_map(100, 100, 139, 139), "c": blob_map(150, 150, 189, 189),
        "d": blob_map(150, 20, 189, 59)}
TOPK = {"a": [1, 2, 3, 4, 5],  # right class first, localized: counts everywhere
        "b": [0, 2, 5, 6, 7],  # right class second: top-5 only
        "c": [3],  # right class, wrong box: classification only
        "d": [0, 1, 5, 6, 7, 4]}  # right class sixth: outside the top 5


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("cam_threshold", [0.5, None])
def test_loc_accuracies_by_hand(impl, cam_threshold):
    evaluator = LocAccuracyEvaluator(GT, LABELS, cam_threshold=cam_threshold, cam_curve_interval=0.25,
                                     impl=impl)
    for image_id in GT:
        evaluator.accumulate(MAPS[image_id], image_id, TOPK[image_id])
    result = evaluator.compute()
    assert result["gt_known_loc"] == 75.0  # a, b, d
    assert result["top1_loc"] == 25.0  # a
    assert result["top5_loc"] == 50.0  # a, b
    assert result["top1_cls"] == 50.0  # a, c
    assert result["top5_cls"] == 75.0  # a, b, c
    # binary maps: every threshold gives the same boxes; the best is the first one
    assert result["cam_threshold"] == (0.5 if cam_threshold is not None else 0.0)
    assert result["images"] == 4


def test_loc_accuracy_bad_input():
    with pytest.raises(ConfigError, match="cam_threshold"):
        LocAccuracyEvaluator(GT, LABELS, cam_threshold=1.5)
    evaluator = LocAccuracyEvaluator(GT, LABELS)
    with pytest.raises(DataError, match="image zz"):
        evaluator.accumulate(MAPS["a"], "zz", [1])
    with pytest.raises(DataError, match="empty list"):
        evaluator.accumulate(MAPS["a"], "a", [])
    with pytest.raises(DataError, match=r"score map of image a: .*NaN"):
        evaluator.accumulate(np.full((224, 224), np.nan), "a", [1])


def test_loc_accuracy_fed_from_the_box_evaluators_pass_equals_its_own():
    # evaluations give LocAccuracyEvaluator the MaxBoxAcc evaluator's booleans (one trace per map)
    from mmcam_fast.evaluation import BoxEvaluator, accumulate_boxes

    rng = np.random.default_rng(4)
    maps = dict(MAPS)
    for image_id in maps:  # noisy versions of the blobs, so thresholds differ
        noisy = np.clip(maps[image_id] * 0.8 + 0.2 * rng.random((224, 224)), 0, 1)
        maps[image_id] = (noisy - noisy.min()) / (noisy.max() - noisy.min())
    own = LocAccuracyEvaluator(GT, LABELS)
    fed = LocAccuracyEvaluator(GT, LABELS)
    single = BoxEvaluator(GT, iou_thresholds=[50])
    seen = []

    def on_image(image_id, results):
        seen.append(image_id)
        fed.add(results[0][0], image_id, TOPK[image_id])

    for image_id, scoremap in maps.items():
        own.accumulate(scoremap, image_id, TOPK[image_id])
    assert accumulate_boxes([single], maps.items(), threads=2, on_image=on_image) == len(maps)
    assert seen == list(maps)  # input order, whatever the threads
    assert fed.compute() == own.compute()
    np.testing.assert_array_equal(fed.gt_known, single.num_correct[0])
    with pytest.raises(DataError, match=r"image a: expected 100 booleans .*shape \(3,\)"):
        fed.add(np.zeros(3, bool), "a", [1])
    with pytest.raises(DataError, match="image zz: no label"):
        fed.add(np.zeros(100, bool), "zz", [1])
