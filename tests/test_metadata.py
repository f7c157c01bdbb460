"""The WSOL metadata reader on every real metadata folder of the benchmark, and on broken files."""

from __future__ import annotations

import pytest
from shared_data import shared_data_dir

from mmcam_fast.data.metadata import load_metadata, write_metadata
from mmcam_fast.errors import DataError

META = shared_data_dir() / "wsol-metadata"

# (folder, images, classes, boxes or mask lines) counted independently with wc / sort | uniq.
REAL = [
    ("CUB/train", 5994, 200, 5994),
    ("CUB/val", 1000, 200, 1000),
    ("CUB/test", 5794, 200, 5794),
    ("ILSVRC/val", 10000, 1000, 18532),
    ("OpenImages/val", 2500, 100, 3854),
    ("OpenImages/test", 5000, 100, 7632),
]


@pytest.mark.parametrize("folder,images,classes,entries", REAL, ids=[r[0] for r in REAL])
def test_every_real_metadata_folder_parses(folder, images, classes, entries):
    meta = load_metadata(META / folder)
    assert len(meta) == images
    assert meta.num_classes == classes
    if meta.has_masks:
        assert sum(len(v) for v in meta.mask_paths.values()) == entries
        assert all(meta.ignore_paths[i] for i in meta.image_ids), "first mask line carries the ignore path"
    else:
        assert sum(len(v) for v in meta.boxes.values()) == entries
        assert set(meta.sizes) >= set(meta.image_ids)


def test_real_values_are_read_in_file_order():
    meta = load_metadata(META / "ILSVRC" / "val")
    assert meta.image_ids[0] == "val2/0/0.jpeg"
    assert meta.boxes["val2/0/0.jpeg"] == [(156, 163, 318, 230)]
    assert meta.sizes["val2/0/0.jpeg"] == (500, 375)


def _write(tmp_path, **files):
    for name, text in files.items():
        (tmp_path / f"{name}.txt").write_text(text)
    return tmp_path


GOOD = {"image_ids": "a.jpg\nb.jpg\n", "class_labels": "a.jpg,0\nb.jpg,1\n",
        "image_sizes": "a.jpg,10,10\nb.jpg,20,10\n", "localization": "a.jpg,0,0,9,9\nb.jpg,1,1,5,5\n"}


@pytest.mark.parametrize("change,message", [
    ({"localization": "a.jpg,0,0,9,9\n"}, r"localization.txt: no box for 1 image\(s\): b.jpg"),
    ({"image_sizes": "a.jpg,10,10\n"}, r"image_sizes.txt: no size for 1 image\(s\): b.jpg"),
    ({"class_labels": "a.jpg,0\n"}, r"class_labels.txt: no label for 1 image\(s\): b.jpg"),
    ({"localization": "a.jpg,0,0,10,9\nb.jpg,1,1,5,5\n"}, r"box outside the image .*a.jpg"),
    ({"localization": "a.jpg,0,0,9\nb.jpg,1,1,5,5\n"}, r"localization.txt:1: expected <image_id>,<x0>"),
    ({"class_labels": "a.jpg,zero\nb.jpg,1\n"}, r"class_labels.txt:1: expected an integer, got 'zero'"),
    ({"image_ids": "a.jpg\na.jpg\n"}, r"image_ids.txt: duplicate ids"),
    ({"localization": "a.jpg,5,0,2,9\nb.jpg,1,1,5,5\n"}, r"localization.txt:1: box must satisfy x0 <= x1"),
])
def test_broken_metadata_names_file_line_and_ids(tmp_path, change, message):
    _write(tmp_path, **{**GOOD, **change})
    with pytest.raises(DataError, match=message):
        load_metadata(tmp_path)


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_metadata(tmp_path / "nope")
    _write(tmp_path, image_ids="a.jpg\n")
    with pytest.raises(DataError, match="class_labels.txt: metadata file is missing"):
        load_metadata(tmp_path)


def test_labels_only_split_has_no_localization(tmp_path):
    _write(tmp_path, image_ids="a.jpg\n", class_labels="a.jpg,3\n")
    meta = load_metadata(tmp_path)
    assert meta.labels == {"a.jpg": 3} and not meta.boxes and not meta.has_masks


def test_write_then_load_round_trip(tmp_path):
    ids = ["x/1.jpg", "x/2.jpg"]
    write_metadata(tmp_path / "boxes", ids, {"x/1.jpg": 0, "x/2.jpg": 1},
                   sizes={"x/1.jpg": (8, 6), "x/2.jpg": (5, 5)},
                   boxes={"x/1.jpg": [(0, 0, 7, 5), (1, 1, 2, 2)], "x/2.jpg": [(0, 0, 4, 4)]})
    meta = load_metadata(tmp_path / "boxes")
    assert meta.boxes["x/1.jpg"] == [(0, 0, 7, 5), (1, 1, 2, 2)]
    write_metadata(tmp_path / "masks", ids, {"x/1.jpg": 0, "x/2.jpg": 0},
                   mask_paths={"x/1.jpg": ["m1.png", "m2.png"], "x/2.jpg": ["m3.png"]},
                   ignore_paths={"x/1.jpg": "i1.png", "x/2.jpg": ""})
    meta = load_metadata(tmp_path / "masks")
    assert meta.mask_paths["x/1.jpg"] == ["m1.png", "m2.png"] and meta.ignore_paths["x/1.jpg"] == "i1.png"
