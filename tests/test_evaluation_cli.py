"""``mmcam-evaluate`` end to end on small splits built from the real metadata, and its errors."""

import json
import os
import re

import cv2
import numpy as np
from scoremap_samples import realistic_scoremaps
from shared_data import shared_data_dir

from mmcam_fast.cli import run_main
from mmcam_fast.cli.evaluate import main
from mmcam_fast.data.metadata import load_metadata, write_metadata
from mmcam_fast.evaluation import BoxEvaluator, MaskEvaluator, gt_boxes_224, save_scoremaps
from mmcam_fast.evaluation.overlays import CAPTION_HEIGHT

DATA = shared_data_dir()
META = DATA / "wsol-metadata"
SAMPLE_MASKS = META / "openimages-sample" / "test_masks"


def small_split(tmp_path, dataset, split, n, seed=0):
    """The first ``n`` images of a real split as a metadata folder under ``tmp_path/meta``, and
    synthetic score maps for them under ``tmp_path/maps``."""
    full = load_metadata(META / dataset / split)
    ids = full.image_ids[:n]
    write_metadata(tmp_path / "meta" / dataset / split, ids, {i: full.labels[i] for i in ids},
                   sizes={i: full.sizes[i] for i in ids}, boxes={i: full.boxes[i] for i in ids})
    metadata = load_metadata(tmp_path / "meta" / dataset / split)
    gt = gt_boxes_224(metadata)
    maps = realistic_scoremaps(n, seed=seed, gt_boxes=[gt[i] for i in ids])
    save_scoremaps(tmp_path / "maps", ids, maps)
    return metadata, maps


def run(capsys, *argv):
    main([str(a) for a in argv])
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1]), lines


def fail(capsys, *argv):
    """Run the CLI as its console script does; expect exit status 2 and one line on stderr."""
    assert run_main(main, [str(a) for a in argv], prog="mmcam-evaluate") == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmcam-evaluate: error: "), captured.err
    return lines[0]


def args(tmp_path, dataset, split, *extra):
    return ("--scoremap-root", tmp_path / "maps", "--metadata-root", tmp_path / "meta", "--dataset", dataset,
            "--split", split, *extra)


def test_box_dataset_numbers_match_the_evaluators(tmp_path, capsys):
    metadata, maps = small_split(tmp_path, "CUB", "test", 16)
    result, lines = run(capsys, *args(tmp_path, "cub", "test"))  # lower case works
    assert set(result) >= {"maxboxacc", "maxboxacc_v2", "per_iou", "best_threshold", "images"}
    assert result["images"] == 16 and result["dataset"] == "CUB" and result["per_iou_contours"] == "multi"
    single = BoxEvaluator.from_metadata(metadata, iou_thresholds=[50], impl="reference")
    multi = BoxEvaluator.from_metadata(metadata, multi_contour=True, impl="reference")
    for image_id, scoremap in zip(metadata.image_ids, maps, strict=True):
        single.accumulate(scoremap, image_id)
        multi.accumulate(scoremap, image_id)
    assert result["maxboxacc"] == single.compute().per_iou[50]
    assert result["maxboxacc_v2"] == multi.compute().mean
    assert result["per_iou"] == {str(k): v for k, v in multi.compute().per_iou.items()}
    assert lines[0].startswith("CUB test: MaxBoxAcc")
    # the reference implementation and two worker processes print the same JSON
    reference, _ = run(capsys, *args(tmp_path, "CUB", "test", "--impl", "reference"))
    pooled, _ = run(capsys, *args(tmp_path, "CUB", "test", "--processes", "2"))
    threaded, _ = run(capsys, *args(tmp_path, "CUB", "test", "--threads", "3"))
    assert reference == result == pooled == threaded


def test_imagenet_alias_ids_with_folders_and_options(tmp_path, capsys):
    small_split(tmp_path, "ILSVRC", "val", 10, seed=1)
    assert (tmp_path / "maps" / "val2" / "0" / "0.jpeg.npy").is_file()
    result, _ = run(capsys, *args(tmp_path, "imagenet", "val", "--cam-curve-interval", "0.05",
                                  "--iou-threshold-list", "40", "60"))
    assert result["dataset"] == "ILSVRC" and set(result["per_iou"]) == {"40", "60"}
    assert all(tau in np.arange(0, 1, 0.05) for tau in result["best_threshold"].values())


def test_openimages_pxap_with_real_masks(tmp_path, capsys):
    full = load_metadata(META / "OpenImages" / "val")
    available = {str(p.relative_to(SAMPLE_MASKS)) for p in SAMPLE_MASKS.rglob("*.png")}
    ids = [i for i in full.image_ids if set(full.mask_paths[i]) <= available]
    write_metadata(tmp_path / "meta" / "OpenImages" / "val", ids, {i: full.labels[i] for i in ids},
                   mask_paths={i: full.mask_paths[i] for i in ids},
                   ignore_paths={i: full.ignore_paths[i] for i in ids})
    (tmp_path / "masks").mkdir()
    os.symlink(SAMPLE_MASKS, tmp_path / "masks" / "OpenImages")
    maps = realistic_scoremaps(len(ids), seed=2)
    save_scoremaps(tmp_path / "maps", ids, maps)
    result, _ = run(capsys, *args(tmp_path, "OpenImages", "val", "--mask-root", tmp_path / "masks"))
    metadata = load_metadata(tmp_path / "meta" / "OpenImages" / "val")
    evaluator = MaskEvaluator.from_metadata(metadata, tmp_path / "masks" / "OpenImages", impl="reference")
    evaluator.accumulate_many(zip(ids, maps, strict=True))
    expected = {"dataset": "OpenImages", "pxap": evaluator.compute(), "images": len(ids), "split": "val"}
    assert result == expected
    reference, _ = run(capsys, *args(tmp_path, "openimages", "val", "--mask-root", tmp_path / "masks",
                                     "--impl", "reference"))
    assert reference == result
    assert "--mask-root is required" in fail(capsys, *args(tmp_path, "OpenImages", "val"))
    os.remove(tmp_path / "masks" / "OpenImages")
    (tmp_path / "masks" / "OpenImages").mkdir()
    message = fail(capsys, *args(tmp_path, "OpenImages", "val", "--mask-root", tmp_path / "masks"))
    assert re.search(r"11 missing mask file\(s\):.*mask of image val/", message)


def test_bad_score_maps_are_reported_with_ids_and_files(tmp_path, capsys):
    metadata, _ = small_split(tmp_path, "CUB", "val", 8)
    ids = metadata.image_ids
    np.save(tmp_path / "maps" / (ids[1] + ".npy"), np.zeros((100, 100), np.float32))
    np.save(tmp_path / "maps" / (ids[4] + ".npy"), np.full((224, 224), np.nan, np.float32))
    np.save(tmp_path / "maps" / (ids[5] + ".npy"), np.full((224, 224), 1.01, np.float32))
    os.remove(tmp_path / "maps" / (ids[6] + ".npy"))
    inf = np.zeros((224, 224), np.float32)
    inf[3, 4] = np.inf
    np.save(tmp_path / "maps" / (ids[7] + ".npy"), inf)
    message = fail(capsys, *args(tmp_path, "CUB", "val"))
    assert message.startswith("mmcam-evaluate: error: 5 invalid score map(s)")
    for image_id, problem in ((ids[1], "expected shape (224, 224), got (100, 100)"), (ids[4], "NaN"),
                              (ids[5], "values must lie in [0, 1]"), (ids[6], "is missing"),
                              (ids[7], "1 infinite value(s)")):
        assert f"score map of image {image_id}" in message and problem in message
        assert str(tmp_path / "maps" / (image_id + ".npy")) in message


def test_metadata_errors_surface(tmp_path, capsys):
    small_split(tmp_path, "CUB", "val", 4)
    labels = tmp_path / "meta" / "CUB" / "val" / "class_labels.txt"
    labels.write_text("".join(labels.read_text().splitlines(keepends=True)[1:]))  # first image unlabeled
    assert re.search(r"class_labels.txt: no label for 1 image", fail(capsys, *args(tmp_path, "CUB", "val")))
    assert "unknown data set 'pascal'" in fail(capsys, *args(tmp_path, "pascal", "val"))
    message = fail(capsys, *args(tmp_path, "CUB", "nosplit"))
    assert "metadata folder does not exist" in message
    assert str(tmp_path / "meta" / "CUB" / "nosplit") in message


def test_usage_errors_are_one_line_naming_the_flag(tmp_path, capsys):
    small_split(tmp_path, "CUB", "val", 2)
    assert "--split" in fail(capsys, "--scoremap-root", tmp_path / "maps", "--metadata-root",
                             tmp_path / "meta", "--dataset", "CUB")
    assert "--overlays" in fail(capsys, *args(tmp_path, "CUB", "val", "--overlays", "two"))
    processes = fail(capsys, *args(tmp_path, "CUB", "val", "--processes", 0))
    assert "argument --processes: must be at least 1, got 0" in processes
    assert "--threads: must be at least 1" in fail(capsys, *args(tmp_path, "CUB", "val", "--threads", 0))
    assert "cam_curve_interval" in fail(capsys, *args(tmp_path, "CUB", "val", "--cam-curve-interval", 0))
    assert "--data-root" in fail(capsys, *args(tmp_path, "CUB", "val", "--data-root", tmp_path / "none"))
    assert "--scoremap-root" in fail(capsys, "--scoremap-root", tmp_path / "none", "--metadata-root",
                                     tmp_path / "meta", "--dataset", "CUB", "--split", "val")
    assert "--dataset" in fail(capsys, "--scoremap-root", tmp_path / "maps", "--metadata-root",
                               tmp_path / "meta", "--split", "val")


def test_overlays_spread_over_classes_at_the_images_aspect_ratio(tmp_path, capsys):
    # two images of each of three classes, listed class by class: --overlays 3 shows one per class
    full = load_metadata(META / "CUB" / "val")
    per_class = {}
    for image_id in full.image_ids:
        per_class.setdefault(full.labels[image_id], []).append(image_id)
    ids = [i for label in sorted(per_class)[:3] for i in per_class[label][:2]]
    write_metadata(tmp_path / "meta" / "CUB" / "val", ids, {i: full.labels[i] for i in ids},
                   sizes={i: full.sizes[i] for i in ids}, boxes={i: full.boxes[i] for i in ids})
    metadata = load_metadata(tmp_path / "meta" / "CUB" / "val")
    gt = gt_boxes_224(metadata)
    maps = realistic_scoremaps(len(ids), seed=5, gt_boxes=[gt[i] for i in ids])
    save_scoremaps(tmp_path / "maps", ids, maps)
    rng = np.random.default_rng(0)
    for image_id in ids:
        path = tmp_path / "images" / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        w, h = metadata.sizes[image_id]
        cv2.imwrite(str(path), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    result, _ = run(capsys, *args(tmp_path, "CUB", "val", "--overlays", 3, "--overlay-dir", tmp_path / "ov",
                                  "--image-root", tmp_path / "images"))
    assert result["overlays"] == 3
    written = sorted((tmp_path / "ov").rglob("*.png"))
    # <overlay-dir>/<image_id>.png, folders and extension of the id kept; the first image of each class
    assert [p.relative_to(tmp_path / "ov").as_posix() for p in written] == sorted(
        per_class[label][0] + ".png" for label in sorted(per_class)[:3])
    for path in written:
        image_id = path.relative_to(tmp_path / "ov").as_posix()[:-4]
        picture = cv2.imread(str(path))
        w, h = metadata.sizes[image_id]
        shown_h = picture.shape[0] - CAPTION_HEIGHT
        # not squashed: the picture's sides are whole pixels of a >= 448 px rendering, so its ratio is
        # the image's up to 1/448 < 0.01 (a squashed 224x224 rendering is off by |1 - w/h|)
        assert abs(picture.shape[1] / shown_h - w / h) < 0.01, (picture.shape, w, h)
        colours = {tuple(c) for c in picture.reshape(-1, 3)}
        assert (0, 255, 0) in colours and (0, 0, 255) in colours  # GT green and prediction red (BGR)
    assert "--overlays K needs" in fail(capsys, *args(tmp_path, "CUB", "val", "--overlays", 2))
