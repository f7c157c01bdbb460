"""The synthetic WSOL set: format, determinism, reuse, and that boxes and masks describe the object."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmcam_fast.data.metadata import load_metadata
from mmcam_fast.data.synthetic import MANIFEST, class_names, make_synthetic, render_sample
from mmcam_fast.errors import ConfigError, DataError

SMALL = {"num_classes": 3, "train_per_class": 6, "val_per_class": 2, "test_per_class": 2, "size": 32}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn") / "set", **SMALL, seed=3)


def test_metadata_of_both_variants_loads(synthetic_root):
    for split, per_class in (("train", 6), ("val", 2), ("test", 2)):
        boxes = load_metadata(synthetic_root / "metadata" / split)
        masks = load_metadata(synthetic_root / "metadata-masks" / split)
        assert len(boxes) == len(masks) == 3 * per_class
        assert boxes.image_ids == masks.image_ids
        assert sorted(set(boxes.labels.values())) == [0, 1, 2]
        assert masks.has_masks and not boxes.has_masks
        for image_id in boxes.image_ids:
            assert (synthetic_root / image_id).is_file()
            assert boxes.sizes[image_id] == (32, 32)
            (mask_path,) = masks.mask_paths[image_id]
            assert (synthetic_root / mask_path).is_file()
            assert (synthetic_root / masks.ignore_paths[image_id]).is_file()
    assert (synthetic_root / "classes.txt").read_text().splitlines()[0] == "ellipse\tellipse"


def test_box_is_the_tight_box_of_the_mask_and_ignore_surrounds_it(synthetic_root):
    boxes = load_metadata(synthetic_root / "metadata" / "test")
    masks = load_metadata(synthetic_root / "metadata-masks" / "test")
    for image_id in boxes.image_ids:
        mask = np.asarray(Image.open(synthetic_root / masks.mask_paths[image_id][0])) > 127
        ignore = np.asarray(Image.open(synthetic_root / masks.ignore_paths[image_id])) > 127
        ys, xs = np.nonzero(mask)
        assert boxes.boxes[image_id] == [(xs.min(), ys.min(), xs.max(), ys.max())]
        assert 0.03 < mask.mean() < 0.6, "the object covers a fair part of the image"
        assert not (ignore & mask).any() and ignore.any()


def test_object_pixels_differ_from_background(synthetic_root):
    # the class evidence is where the mask is: object and background colour statistics differ
    rgb, mask, _ = render_sample(3, "train", 0, 0, 64)
    inside, outside = rgb[mask == 1].astype(float), rgb[mask == 0].astype(float)
    saturation = lambda px: (px.max(axis=1) - px.min(axis=1)).mean()
    assert saturation(inside) > saturation(outside) + 20


def test_classes_have_distinct_shapes_and_textures():
    assert class_names(4) == ["ellipse", "rectangle", "triangle", "star"]
    assert class_names(10)[8:] == ["ellipse-1", "rectangle-1"]
    # the texture hue is class-specific: mean object colours of two classes differ clearly
    hues = []
    for label in (0, 1, 2, 3):
        rgb, mask, _ = render_sample(0, "train", label, 0, 48)
        hues.append(rgb[mask == 1].mean(axis=0))
    gaps = [np.abs(hues[i] - hues[j]).max() for i in range(4) for j in range(i + 1, 4)]
    assert min(gaps) > 30, gaps


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path, synthetic_root):
    again = make_synthetic(tmp_path / "again", **SMALL, seed=3)
    other = make_synthetic(tmp_path / "other", **SMALL, seed=4)
    image_id = "images/val/triangle/val_0001.jpg"
    assert (again / image_id).read_bytes() == (synthetic_root / image_id).read_bytes()
    assert (again / "metadata/train/localization.txt").read_text() == \
        (synthetic_root / "metadata/train/localization.txt").read_text()
    assert (other / image_id).read_bytes() != (synthetic_root / image_id).read_bytes()


def test_existing_set_is_reused_and_other_parameters_are_refused(tmp_path):
    root = make_synthetic(tmp_path / "s", **SMALL, seed=0)
    marker = root / "images" / "marker"
    marker.write_text("kept if the set is reused")
    assert make_synthetic(root, **SMALL, seed=0) == root
    assert marker.exists()
    before = (root / MANIFEST).read_bytes()
    with pytest.raises(DataError, match="train_per_class"):
        make_synthetic(root, **{**SMALL, "train_per_class": 7}, seed=0)
    assert marker.exists() and (root / MANIFEST).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folders left"


def test_training_reads_a_prepared_folder_with_its_own_sizes(tmp_path):
    """``--data synthetic --data-root DIR`` on a folder made by ``prepare synthetic`` with other sizes
    used to delete it and generate the default set; it now reads DIR's own parameters."""
    from mmcam_fast.cli.prepare import main as prepare
    from mmcam_fast.data.splits import build_datasets

    root = tmp_path / "mine"
    assert prepare(["synthetic", "--out", str(root), "--num-classes", "3", "--train-per-class", "4",
                    "--val-per-class", "2", "--test-per-class", "2", "--size", "32"]) in (0, None)
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    data = build_datasets("synthetic", root, image_size=32)
    assert data.num_classes == 3 and len(data.train) == 12 and len(data.test) == 6
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamp


def test_foreign_non_empty_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="--data-root"):
        make_synthetic(tmp_path, **SMALL)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_parameters_out_of_range():
    with pytest.raises(ConfigError, match="num_classes"):
        make_synthetic("unused", num_classes=0)
    with pytest.raises(ConfigError, match="size"):
        make_synthetic("unused", size=8)
