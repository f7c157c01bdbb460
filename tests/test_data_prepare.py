"""The Tiny ImageNet and PASCAL VOC converters, on the real data in ../shared/data."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image
from shared_data import shared_data_dir

from mmcam_fast.cli.prepare import main
from mmcam_fast.data.converters import ensure_prepared, prepare_tiny_imagenet, prepare_voc
from mmcam_fast.data.images import load_rgb
from mmcam_fast.data.manifest import read_class_names
from mmcam_fast.data.metadata import load_metadata
from mmcam_fast.errors import DataError

DATA = shared_data_dir()
TINY, FRUIT = DATA / "tiny-imagenet-5", DATA / "fruit-voc"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return prepare_tiny_imagenet(TINY, tmp_path_factory.mktemp("tiny") / "out")


@pytest.fixture(scope="module")
def fruit(tmp_path_factory):
    return prepare_voc(FRUIT, tmp_path_factory.mktemp("fruit") / "out")


def _splits(out, names=("train", "val", "test")):
    return {s: load_metadata(out / "metadata" / s) for s in names}


def test_tiny_counts_and_disjoint_splits(tiny):
    splits = _splits(tiny)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [2450, 50, 250]
    for meta, per_class in ((splits["train"], 490), (splits["val"], 10), (splits["test"], 50)):
        counts = [list(meta.labels.values()).count(c) for c in range(5)]
        assert counts == [per_class] * 5
    assert not set(splits["train"].image_ids) & set(splits["val"].image_ids)
    assert all(i.startswith("val/images/") for i in splits["test"].image_ids)
    names = read_class_names(tiny / "classes.txt")
    assert names == ["goldfish", "bullfrog", "koala", "albatross", "Chihuahua"]
    manifest = json.loads((tiny / "prepared.json").read_text())
    assert manifest["kind"] == "tiny-imagenet" and manifest["counts"]["test_images"] == 250


def test_tiny_known_boxes_sizes_and_labels(tiny):
    splits = _splits(tiny)
    everything = {**splits["train"].boxes, **splits["val"].boxes}
    assert everything["train/n01443537/images/n01443537_0.JPEG"] == [(0, 10, 63, 58)]
    assert everything["train/n01882714/images/n01882714_10.JPEG"] == [(14, 1, 63, 63)]
    test = splits["test"]
    assert test.boxes["val/images/val_68.JPEG"] == [(10, 19, 63, 42)]
    assert test.labels["val/images/val_68.JPEG"] == 0
    assert set(test.sizes.values()) == {(64, 64)}


def test_tiny_images_are_linked_not_copied_and_grayscale_loads_as_rgb(tiny):
    assert (tiny / "train").is_symlink() and (tiny / "val").is_symlink()
    assert not any(p.suffix == ".JPEG" for p in tiny.rglob("*") if not p.is_symlink()
                   and "train" not in p.parts and "val" not in p.parts)
    for image_id in ("train/n01882714/images/n01882714_386.JPEG", "val/images/val_1512.JPEG"):
        assert Image.open(tiny / image_id).mode == "L"  # grayscale on disk
        image = load_rgb(tiny / image_id)
        assert image.mode == "RGB" and image.size == (64, 64)


def test_tiny_held_out_val_is_seeded(tmp_path, tiny):
    same = prepare_tiny_imagenet(TINY, tmp_path / "same")
    other = prepare_tiny_imagenet(TINY, tmp_path / "other", seed=1, val_per_class=5)
    val = load_metadata(tiny / "metadata/val").image_ids
    assert load_metadata(same / "metadata/val").image_ids == val
    assert len(load_metadata(other / "metadata/val")) == 25
    assert load_metadata(other / "metadata/val").image_ids != val[:25]


def test_voc_counts_and_mixed_decision(fruit):
    splits = _splits(fruit, ("train", "val", "test", "mixed"))
    assert read_class_names(fruit / "classes.txt") == ["apple", "banana", "orange"]
    # 240 train files: 19 with boxes of several classes go to 'mixed'; 10 per class held out as val
    assert [len(splits[s]) for s in ("train", "val", "test", "mixed")] == [191, 30, 55, 24]
    mixed = splits["mixed"]
    assert "train/mixed_1.jpg" in mixed.image_ids and "test/mixed_1.jpg" not in mixed.image_ids
    # mixed_1: orange (243x256), apple (227x257), banana (574x301): the banana covers most
    assert mixed.labels["train/mixed_1.jpg"] == 1
    assert mixed.boxes["train/mixed_1.jpg"] == [(53, 227, 626, 527)]
    # mixed_20 holds a single orange box: an ordinary orange image
    single = {**splits["train"].labels, **splits["val"].labels}
    assert single["train/mixed_20.jpg"] == 2
    assert not {i for s in ("train", "val", "test") for i in splits[s].image_ids} & set(mixed.image_ids)
    manifest = json.loads((fruit / "prepared.json").read_text())
    assert manifest["counts"]["mixed_images"] == 24


def test_voc_boxes_are_shifted_to_zero_based_and_sizes_come_from_the_image(fruit):
    splits = _splits(fruit)
    everything = {}
    for meta in splits.values():
        everything.update({i: (meta.boxes[i], meta.sizes[i], meta.labels[i]) for i in meta.image_ids})
    # apple_1.xml: <size> 0x0, box 8,15,331,349 (1-based)
    boxes, size, label = everything["train/apple_1.jpg"]
    assert boxes == [(7, 14, 330, 348)] and label == 0
    assert size == Image.open(FRUIT / "train/apple_1.jpg").size
    # the largest image: 2569 x 4605, box 10,625,2466,4515
    boxes, size, label = everything["train/banana_57.jpg"]
    assert size == (2569, 4605) and boxes == [(9, 624, 2465, 4514)] and label == 1
    image = load_rgb(FRUIT / "train/banana_57.jpg")
    assert image.mode == "RGB" and image.size == (2569, 4605)
    # load_metadata's own check (every box inside its image) passed for all splits above


def _voc_source(root, boxes, size=(40, 30)):
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        for k, (name, box) in enumerate(boxes):
            for i in range(12):  # enough images per class for the held-out val split
                stem = f"{name}_{k}_{i}"
                Image.new("RGB", size, (200, 10, 10)).save(root / split / f"{stem}.jpg")
                (root / split / f"{stem}.xml").write_text(
                    f"<annotation><size><width>0</width><height>0</height></size><object><name>{name}"
                    f"</name><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax>"
                    f"<ymax>{box[3]}</ymax></bndbox></object></annotation>")
    return root


def test_voc_box_outside_the_image_is_clipped_and_counted(tmp_path, caplog):
    src = _voc_source(tmp_path / "src", [("kiwi", (1, 1, 45, 30)), ("lime", (0, 3, 10, 20))])
    with caplog.at_level(logging.WARNING):
        out = prepare_voc(src, tmp_path / "out")
    assert "clipped 48 box(es)" in caplog.text
    boxes = {**load_metadata(out / "metadata/train").boxes, **load_metadata(out / "metadata/val").boxes}
    assert boxes["train/kiwi_0_0.jpg"] == [(0, 0, 39, 29)]
    assert boxes["train/lime_1_0.jpg"] == [(0, 2, 9, 19)]
    assert json.loads((out / "prepared.json").read_text())["counts"]["clipped_boxes"] == 48


def test_voc_box_outside_is_an_error_when_strict_or_entirely_outside(tmp_path):
    src = _voc_source(tmp_path / "src", [("kiwi", (1, 1, 45, 30))])
    with pytest.raises(DataError, match=r"kiwi_0_0.xml \(kiwi\): box .* extends outside the 40x30 image"):
        prepare_voc(src, tmp_path / "strict", strict_boxes=True)
    src = _voc_source(tmp_path / "src2", [("kiwi", (50, 1, 60, 30))])
    with pytest.raises(DataError, match="entirely outside"):
        prepare_voc(src, tmp_path / "out")


def test_malformed_sources_are_errors(tmp_path):
    with pytest.raises(DataError, match="--src"):
        prepare_voc(tmp_path, tmp_path / "out")
    with pytest.raises(DataError, match="--src"):
        prepare_tiny_imagenet(tmp_path, tmp_path / "out")
    src = _voc_source(tmp_path / "src", [("kiwi", (1, 1, 5, 5))])
    (src / "train" / "kiwi_0_3.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match=r"kiwi_0_3.xml: not a valid XML file"):
        prepare_voc(src, tmp_path / "out")


def test_ensure_prepared_reuses_a_matching_conversion(tmp_path):
    out = ensure_prepared("voc", FRUIT, tmp_path / "out")
    stamp = (out / "prepared.json").stat().st_mtime_ns
    assert ensure_prepared("voc", FRUIT, out) == out
    assert (out / "prepared.json").stat().st_mtime_ns == stamp
    ensure_prepared("voc", FRUIT, out, val_per_class=5)
    assert len(load_metadata(out / "metadata/val")) == 15


def test_reconverting_into_a_used_folder_leaves_no_stale_split(tmp_path):
    out = prepare_voc(FRUIT, tmp_path / "out")
    assert (out / "metadata/mixed/image_ids.txt").exists()
    prepare_tiny_imagenet(TINY, out)
    assert not (out / "metadata/mixed").exists()
    assert (out / "train").resolve() == (TINY / "train").resolve()
    assert len(load_metadata(out / "metadata/test")) == 250


def test_command_line(tmp_path, capsys):
    from mmcam_fast.cli import run_main

    assert main(["voc", "--src", str(FRUIT), "--out", str(tmp_path / "fruit")]) == 0
    assert "ready" in capsys.readouterr().out
    argv = ["tiny-imagenet", "--src", str(tmp_path / "nothing"), "--out", str(tmp_path / "t")]
    assert run_main(main, argv, prog="mmcam-prepare") == 2  # main raises; the wrapper reports
    assert capsys.readouterr().err.startswith("mmcam-prepare: error:")
    assert main(["synthetic", "--out", str(tmp_path / "syn"), "--num-classes", "2", "--train-per-class", "3",
                 "--val-per-class", "1", "--test-per-class", "1", "--size", "32"]) == 0
    assert len(load_metadata(tmp_path / "syn/metadata/train")) == 6


def test_a_class_subset_from_an_archive(tmp_path, monkeypatch):
    """``--classes`` keeps only the listed wnids (train, the held-out val, and their official val
    images as test); ``--src`` may be the .tar.gz archive, extracted once into runs/data/."""
    import tarfile

    tiny = DATA / "tiny-imagenet-5"
    archive = tmp_path / "tiny-5.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny, arcname="tiny-5")
    listed = tmp_path / "two.txt"
    listed.write_text("n01882714\n# koala and goldfish\nn01443537\n")
    monkeypatch.chdir(tmp_path)
    assert main(["tiny-imagenet", "--src", str(archive), "--out", "two", "--classes", str(listed)]) == 0
    assert (tmp_path / "runs" / "data" / "tiny-5").is_dir()
    for split, count in (("train", 2 * 490), ("val", 2 * 10), ("test", 2 * 50)):
        meta = load_metadata(tmp_path / "two" / "metadata" / split)
        assert len(meta) == count and set(meta.labels.values()) == {0, 1}, split
        assert all(("n01443537" in i or "n01882714" in i) for i in meta.image_ids if split != "test")
    assert read_class_names(tmp_path / "two" / "classes.txt") == ["goldfish", "koala"]


def test_the_pretraining_classes_are_disjoint_from_every_wsol_benchmark():
    """The stand-in for ImageNet pretraining never sees a class of WSOL-20 or Tiny-ImageNet-5."""
    from mmcam_fast.data.manifest import read_class_list

    folder = DATA / "tiny-imagenet-192"
    pretrain = set(read_class_list(folder / "pretrain172.txt"))
    wsol20 = set(read_class_list(folder / "wsol20.txt"))
    tiny5 = {p.name for p in (DATA / "tiny-imagenet-5" / "train").iterdir() if p.is_dir()}
    assert (len(pretrain), len(wsol20), len(tiny5)) == (172, 20, 5)
    assert not pretrain & wsol20 and not pretrain & tiny5 and not wsol20 & tiny5


def test_labels_only_makes_a_classification_set(tmp_path):
    """The pretraining classes come without box files: ``--labels-only`` accepts that and writes no
    boxes in any split; training code reads it with ``require_localization=False``."""
    from mmcam_fast.data.splits import build_datasets

    tiny = DATA / "tiny-imagenet-5"
    assert main(["tiny-imagenet", "--src", str(tiny), "--out", str(tmp_path / "cls"), "--labels-only"]) == 0
    for split in ("train", "val", "test"):
        assert (tmp_path / "cls" / "metadata" / split / "localization.txt").read_text() == ""
    data = build_datasets("tiny-imagenet", tmp_path / "cls", image_size=32, require_localization=False)
    assert (data.num_classes, len(data.val), len(data.test)) == (5, 50, 250)
