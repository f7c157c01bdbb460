"""``mmcam-evaluate --scoremap-root`` on the data sets the project prepares: synthetic, voc, tiny-imagenet."""

import json

import cv2
import numpy as np
import pytest
from scoremap_samples import realistic_scoremaps
from shared_data import shared_data_dir

from mmcam_fast.cli import run_main
from mmcam_fast.cli.evaluate import main
from mmcam_fast.cli.prepare import main as prepare_main
from mmcam_fast.data.converters import prepare_tiny_imagenet, prepare_voc
from mmcam_fast.data.metadata import load_metadata
from mmcam_fast.evaluation import BoxEvaluator, MaskEvaluator, gt_boxes_224, load_gt_mask, save_scoremaps
from mmcam_fast.evaluation.overlays import CAPTION_HEIGHT, DISPLAY_MIN

DATA = shared_data_dir()


def run(capsys, *argv):
    main([str(a) for a in argv])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def fail(capsys, *argv):
    assert run_main(main, [str(a) for a in argv], prog="mmcam-evaluate") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmcam-evaluate: error: ")
    return lines[0]


def box_maps(metadata, perfect):
    """Per image: 1 on its ground-truth boxes (at 224x224) when ``perfect(i)``, else all zeros."""
    gt = gt_boxes_224(metadata)
    maps = np.zeros((len(metadata), 224, 224), np.float32)
    for k, image_id in enumerate(metadata.image_ids):
        if perfect(k):
            for x0, y0, x1, y1 in gt[image_id]:
                maps[k, y0:y1 + 1, x0:x1 + 1] = 1.0
    return maps


def library_numbers(metadata, maps):
    single = BoxEvaluator.from_metadata(metadata, iou_thresholds=[50], impl="reference")
    multi = BoxEvaluator.from_metadata(metadata, multi_contour=True, impl="reference")
    for image_id, scoremap in zip(metadata.image_ids, maps, strict=True):
        single.accumulate(scoremap, image_id)
        multi.accumulate(scoremap, image_id)
    return {"maxboxacc": single.compute().per_iou[50], "maxboxacc_v2": multi.compute().mean,
            "per_iou": {str(k): v for k, v in multi.compute().per_iou.items()}, "images": len(metadata)}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared") / "synthetic"
    assert prepare_main(["synthetic", "--out", str(root), "--num-classes", "3", "--train-per-class", "1",
                         "--val-per-class", "1", "--test-per-class", "2", "--size", "32"]) == 0
    return root


def test_synthetic_boxes_from_the_data_root_by_hand(synthetic, tmp_path, capsys):
    metadata = load_metadata(synthetic / "metadata" / "test")
    assert len(metadata) == 6
    # the objects cover 30-65 % of the side: a map that is 1 on the box finds it at every tau (IoU > 0.9);
    # an all-zero map finds nothing. 4 of 6 images found: 400 / 6 at every IoU threshold, tau 0.
    maps = box_maps(metadata, perfect=lambda k: k < 4)
    save_scoremaps(tmp_path / "maps", metadata.image_ids, maps)
    result = run(capsys, "--scoremap-root", tmp_path / "maps", "--data-root", synthetic, "--split", "test")
    assert result["dataset"] == "synthetic" and result["images"] == 6 and result["split"] == "test"
    assert result["maxboxacc"] == result["maxboxacc_v2"] == 4 * 100.0 / 6
    assert result["per_iou"] == {"30": 400 / 6, "50": 400 / 6, "70": 400 / 6}
    assert result["maxboxacc_threshold"] == 0.0
    # naming the data set, or the metadata root, gives the same numbers
    named = run(capsys, "--scoremap-root", tmp_path / "maps", "--dataset", "Synthetic", "--metadata-root",
                synthetic / "metadata", "--split", "test")
    assert named == result
    assert "prepared as 'synthetic'" in fail(capsys, "--scoremap-root", tmp_path / "maps", "--data-root",
                                             synthetic, "--dataset", "voc", "--split", "test")
    assert "no image_ids.txt" in fail(capsys, "--scoremap-root", tmp_path / "maps", "--data-root", synthetic,
                                      "--split", "mixed")


def test_synthetic_masks_give_pxap(synthetic, tmp_path, capsys):
    metadata = load_metadata(synthetic / "metadata-masks" / "val")
    assert metadata.has_masks
    # a map equal to the foreground mask: every foreground pixel above every background pixel, PxAP 100
    perfect = np.stack([(load_gt_mask(synthetic, metadata.mask_paths[i], metadata.ignore_paths[i], i) == 1)
                        .astype(np.float32) for i in metadata.image_ids])
    save_scoremaps(tmp_path / "perfect", metadata.image_ids, perfect)
    common = ("--data-root", synthetic, "--metadata-root", synthetic / "metadata-masks", "--split", "val")
    result = run(capsys, "--scoremap-root", tmp_path / "perfect", *common)
    assert result == {"dataset": "synthetic", "pxap": 100.0, "images": 3, "split": "val"}
    maps = realistic_scoremaps(len(metadata), seed=3)
    save_scoremaps(tmp_path / "maps", metadata.image_ids, maps)
    evaluator = MaskEvaluator.from_metadata(metadata, synthetic, impl="reference")
    evaluator.accumulate_many(zip(metadata.image_ids, maps, strict=True))
    assert run(capsys, "--scoremap-root", tmp_path / "maps", *common)["pxap"] == evaluator.compute()
    assert "overlays draw boxes" in fail(capsys, "--scoremap-root", tmp_path / "maps", *common,
                                         "--overlays", "1", "--overlay-dir", tmp_path / "ov")


def test_synthetic_overlays_from_the_data_root(synthetic, tmp_path, capsys):
    metadata = load_metadata(synthetic / "metadata" / "test")
    save_scoremaps(tmp_path / "maps", metadata.image_ids, box_maps(metadata, perfect=lambda k: True))
    result = run(capsys, "--scoremap-root", tmp_path / "maps", "--data-root", synthetic, "--split", "test",
                 "--overlays", 3, "--overlay-dir", tmp_path / "ov")
    assert result["overlays"] == 3
    written = sorted(p.relative_to(tmp_path / "ov").as_posix()[:-4] for p in (tmp_path / "ov").rglob("*.png"))
    assert sorted(metadata.labels[i] for i in written) == [0, 1, 2]  # one per class
    picture = cv2.imread(str(tmp_path / "ov" / (written[0] + ".png")))
    assert picture.shape == (DISPLAY_MIN + CAPTION_HEIGHT, DISPLAY_MIN, 3)  # 32x32 shown at 448x448


def test_prepared_voc_splits(tmp_path, capsys):
    root = prepare_voc(DATA / "fruit-voc", tmp_path / "fruit")
    for split in ("test", "mixed"):
        metadata = load_metadata(root / "metadata" / split)
        gt = gt_boxes_224(metadata)
        maps = realistic_scoremaps(len(metadata), seed=7, gt_boxes=[gt[i] for i in metadata.image_ids])
        save_scoremaps(tmp_path / split, metadata.image_ids, maps)
        result = run(capsys, "--scoremap-root", tmp_path / split, "--data-root", root, "--split", split)
        assert result["dataset"] == "voc"
        assert {k: result[k] for k in ("maxboxacc", "maxboxacc_v2", "per_iou", "images")} == library_numbers(
            metadata, maps)


def test_prepared_tiny_imagenet(tmp_path, capsys):
    root = prepare_tiny_imagenet(DATA / "tiny-imagenet-5", tmp_path / "tiny")
    metadata = load_metadata(root / "metadata" / "val")
    gt = gt_boxes_224(metadata)
    maps = realistic_scoremaps(len(metadata), seed=8, gt_boxes=[gt[i] for i in metadata.image_ids])
    save_scoremaps(tmp_path / "maps", metadata.image_ids, maps)
    result = run(capsys, "--scoremap-root", tmp_path / "maps", "--data-root", root, "--split", "val",
                 "--processes", 2)
    assert result["dataset"] == "tiny-imagenet" and result["images"] == 50
    assert {k: result[k] for k in ("maxboxacc", "maxboxacc_v2", "per_iou", "images")} == library_numbers(
        metadata, maps)


def test_a_raw_source_folder_is_named_as_not_prepared(tmp_path, capsys):
    message = fail(capsys, "--scoremap-root", tmp_path, "--data-root", DATA / "fruit-voc", "--split", "test")
    assert "fruit-voc: not a folder made by `python -m mmcam_fast.prepare`" in message
