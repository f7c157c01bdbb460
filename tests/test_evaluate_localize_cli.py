"""evaluate mode (b) from a checkpoint, score-map round trip through mode (a), and localize."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import pytest
import torch
import yaml

from mmcam_fast.checkpoint import load_checkpoint
from mmcam_fast.cli import run_main
from mmcam_fast.cli.evaluate import main as evaluate_main
from mmcam_fast.cli.localize import main as localize_main
from mmcam_fast.data.metadata import load_metadata
from mmcam_fast.evaluation.overlays import CAPTION_HEIGHT


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_checkpoint_mode_matches_training_validation_and_exports(finished_run, tmp_path, capsys):
    best = finished_run / "checkpoints" / "best.pt"
    evaluate_main(["--checkpoint", str(best), "--split", "val", "--export-scoremaps", str(tmp_path / "maps"),
                   "--overlays", "4", "--overlay-dir", str(tmp_path / "overlays")])
    result = _last_json(capsys)
    val_rows = [json.loads(line) for line in (finished_run / "val_metrics.jsonl").read_text().splitlines()]
    best_val = max(val_rows, key=lambda r: r["maxboxacc_v2"])
    for key in ("maxboxacc", "maxboxacc_v2", "gt_known_loc", "top1_loc", "top5_loc", "top1_cls"):
        # the same counts divided the same way in float64; 1e-9 of a percentage allows only rounding
        assert result[key] == pytest.approx(best_val[key], abs=1e-9), key
    maps = sorted((tmp_path / "maps").rglob("*.npy"))
    assert len(maps) == result["images"]
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    data_root = Path(config["data_root"])
    metadata = load_metadata(data_root / "metadata" / "val")

    # overlays of 4 images: one per class (round-robin), at the images' aspect ratio (64x64: square)
    written = sorted((tmp_path / "overlays").rglob("*.png"))
    assert result["overlays"] == 4 and len(written) == 4
    ids = [p.relative_to(tmp_path / "overlays").as_posix()[:-4] for p in written]
    assert sorted(metadata.labels[i] for i in ids) == [0, 1, 2, 3]
    picture = cv2.imread(str(written[0]))
    assert picture.shape[1] == picture.shape[0] - CAPTION_HEIGHT

    # The exported maps through mode (a), from the prepared data folder, give the same box metrics.
    evaluate_main(["--scoremap-root", str(tmp_path / "maps"), "--data-root", str(data_root),
                   "--split", "val"])
    from_files = _last_json(capsys)
    assert from_files["dataset"] == "synthetic" and from_files["images"] == result["images"]
    for key in ("maxboxacc", "maxboxacc_v2", "per_iou", "best_threshold", "maxboxacc_threshold"):
        assert from_files[key] == result[key], key


def _evaluate_error(capsys, *argv) -> str:
    assert run_main(evaluate_main, [str(a) for a in argv], prog="mmcam-evaluate") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmcam-evaluate: error: ")
    return lines[0]


def test_checkpoint_mode_errors(finished_run, tmp_path, capsys):
    message = _evaluate_error(capsys, "--checkpoint", tmp_path / "none.pt")
    assert re.search("--checkpoint .*not found", message)
    assert "two modes" in _evaluate_error(capsys, "--checkpoint", finished_run / "checkpoints" / "last.pt",
                                          "--scoremap-root", tmp_path)
    assert "--scoremap-root, --metadata-root" in _evaluate_error(capsys, "--dataset", "CUB")
    last = finished_run / "checkpoints" / "last.pt"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    message = _evaluate_error(capsys, "--checkpoint", last, "--overlays", 2, "--overlay-dir", a_file)
    assert message.endswith(f"--overlay-dir {a_file}: is a file, expected a folder")
    message = _evaluate_error(capsys, "--checkpoint", last, "--device", "gpu")
    assert "--device 'gpu' is not a device" in message
    if not torch.cuda.is_available():
        message = _evaluate_error(capsys, "--checkpoint", last, "--device", "cuda")
        assert "--device cuda: CUDA is not available" in message


def test_localize_own_images(finished_run, tmp_path, capsys):
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    images = sorted((Path(config["data_root"]) / "images" / "test").rglob("*.jpg"))[:2]
    png = tmp_path / "as_png.png"
    from PIL import Image

    Image.open(images[0]).convert("L").save(png)  # a grayscale PNG goes through too
    localize_main(["--checkpoint", str(finished_run / "checkpoints" / "best.pt"), str(images[1]), str(png),
                   "--out", str(tmp_path / "loc"), "--topk", "3"])
    results = _last_json(capsys)
    assert [r["image"] for r in results] == [str(images[1]), str(png)]
    saved = load_checkpoint(finished_run / "checkpoints" / "best.pt")["val"]["maxboxacc_threshold"]
    assert [r["cam_threshold"] for r in results] == [saved, saved]  # no --cam-threshold: validation's tau
    for entry in results:
        assert len(entry["predictions"]) == 3
        scores = [p["score"] for p in entry["predictions"]]
        # top-3 of a float32 softmax: its sum is at most 1 up to float32 rounding (~1e-7 per term)
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
        for x0, y0, x1, y1 in entry["boxes"]:
            assert 0 <= x0 <= x1 < entry["width"] and 0 <= y0 <= y1 < entry["height"]
        assert Path(entry["overlay"]).is_file()
    assert json.loads((tmp_path / "loc" / "localization.json").read_text()) == results


def test_localize_bad_inputs(finished_run, tmp_path, capsys):
    bad = tmp_path / "empty.jpg"
    bad.write_bytes(b"")
    ckpt = str(finished_run / "checkpoints" / "best.pt")
    assert run_main(localize_main, ["--checkpoint", ckpt, str(bad)]) == 2
    assert "empty.jpg: cannot read the image" in capsys.readouterr().err
    assert run_main(localize_main, ["--checkpoint", ckpt, str(tmp_path / "missing.jpg")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "notes.txt").write_text("x")
    assert run_main(localize_main, ["--checkpoint", ckpt, str(tmp_path / "no_images")]) == 2
    assert "no_images: a folder with no image file under it" in capsys.readouterr().err
    assert run_main(localize_main, ["--checkpoint", ckpt, "--out", str(bad), str(bad)]) == 2
    assert f"--out {bad}: is a file, expected a folder" in capsys.readouterr().err
    assert run_main(localize_main, ["--checkpoint", ckpt, "--device", "cuda:x", str(bad)]) == 2
    assert "--device 'cuda:x' is not a device" in capsys.readouterr().err


def test_localize_a_folder_is_its_images_in_sorted_order(tmp_path):
    from mmcam_fast.cli.localize import expand_images

    (tmp_path / "b" / "sub").mkdir(parents=True)
    for name in ("b/z.JPG", "b/a.png", "b/sub/c.jpeg", "b/readme.txt", "single.jpg"):
        (tmp_path / name).write_bytes(b"")
    found = expand_images([tmp_path / "single.jpg", tmp_path / "b"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["single.jpg", "b/a.png", "b/sub/c.jpeg",
                                                                    "b/z.JPG"]


def test_checkpoint_mode_reads_the_metadata_of_a_new_data_root(finished_run, tmp_path, capsys):
    """A new --data-root (the data copied, and here cut to 5 test images) is read with its own metadata,
    not with the metadata folder inside the checkpoint's old data root."""
    import shutil

    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    moved = tmp_path / "moved"
    shutil.copytree(config["data_root"], moved)
    test = moved / "metadata" / "test"
    keep = set(sorted((test / "image_ids.txt").read_text().split())[:5])
    for path in test.glob("*.txt"):
        path.write_text("".join(f"{line}\n" for line in path.read_text().splitlines()
                                if line.split(",")[0] in keep))
    evaluate_main(["--checkpoint", str(finished_run / "checkpoints" / "last.pt"), "--data-root", str(moved)])
    assert _last_json(capsys)["images"] == 5
