"""WSOLDataset: construction checks, items, and the unreadable-image policies (bad input)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmcam_fast.data.datasets import WSOLDataset
from mmcam_fast.data.metadata import load_metadata, write_metadata
from mmcam_fast.data.transforms import eval_transform
from mmcam_fast.errors import ConfigError, DataError

SIDE = 16


def _make(root, per_class=(3, 3), modes=None):
    """Images ``c<label>/<i>.jpg`` of flat colour (label*80, i*40, 0) plus their metadata."""
    ids, labels, sizes, boxes = [], {}, {}, {}
    for label, count in enumerate(per_class):
        (root / "images" / f"c{label}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image_id = f"c{label}/{i}.jpg"
            Image.new("RGB", (SIDE + i, SIDE), (label * 80, i * 40, 0)).save(root / "images" / image_id)
            ids.append(image_id)
            labels[image_id] = label
            sizes[image_id] = (SIDE + i, SIDE)
            boxes[image_id] = [(1, 2, SIDE - 2, SIDE - 1)]
    write_metadata(root / "meta", ids, labels, sizes, boxes=boxes)
    return root / "images", load_metadata(root / "meta")


def _dataset(image_root, meta, **kw):
    return WSOLDataset(image_root, meta, eval_transform(SIDE), class_names=["cat", "dog"], **kw)


def _red(tensor):
    """Undo the normalization of the red channel's mean."""
    return float(tensor[0].mean() * 0.229 + 0.485) * 255


def test_items_and_evaluation_accessors(tmp_path):
    image_root, meta = _make(tmp_path)
    ds = _dataset(image_root, meta)
    assert len(ds) == 6 and ds.labels == [0, 0, 0, 1, 1, 1] and ds.num_classes == 2
    image, label, index = ds[4]
    assert image.shape == (3, SIDE, SIDE) and image.dtype == torch.float32
    assert (label, index) == (1, 4)
    assert abs(_red(image) - 80) < 3
    assert ds.image_id(4) == "c1/1.jpg"
    assert ds.original_size(4) == (SIDE + 1, SIDE)
    assert ds.boxes(4) == [(1, 2, SIDE - 2, SIDE - 1)]
    assert ds.classes == ["cat", "dog"]


def test_original_size_read_from_the_file_when_metadata_has_none(tmp_path):
    image_root, meta = _make(tmp_path)
    meta.sizes.clear()  # mask data sets (OpenImages) give no sizes
    assert _dataset(image_root, meta).original_size(2) == (SIDE + 2, SIDE)


def test_missing_image_root_names_the_flag(tmp_path):
    _, meta = _make(tmp_path)
    with pytest.raises(DataError, match=r"does not exist \(check --data-root\)"):
        _dataset(tmp_path / "nowhere", meta)


def test_missing_images_are_listed(tmp_path):
    image_root, meta = _make(tmp_path, per_class=(4, 4))
    for name in ("c0/1.jpg", "c1/3.jpg"):
        (image_root / name).unlink()
    with pytest.raises(DataError) as info:
        _dataset(image_root, meta)
    message = str(info.value)
    assert "2 of 8 image(s)" in message and "image_ids.txt" in message and "--data-root" in message
    assert str(image_root / "c0/1.jpg") in message and str(image_root / "c1/3.jpg") in message


def test_missing_masks_are_listed(tmp_path):
    image_root, meta = _make(tmp_path)
    meta.mask_paths = {i: [f"m/{i}.png"] for i in meta.image_ids}
    meta.ignore_paths = {i: "" for i in meta.image_ids}
    with pytest.raises(DataError, match=r"6 mask file\(s\) listed in .*localization.txt are missing"):
        _dataset(image_root, meta, mask_root=tmp_path)


def test_unknown_policy(tmp_path):
    image_root, meta = _make(tmp_path)
    with pytest.raises(ConfigError, match="--bad-images"):
        _dataset(image_root, meta, bad_image_policy="ignore")


def _corrupt(image_root, kind):
    path = image_root / "c1/1.jpg"
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:600])
    else:
        path.write_text("<html>not an image</html>")
    return path


@pytest.mark.parametrize("kind,reason", [("zero-byte", "zero-byte"), ("truncated", "truncated"),
                                         ("not-an-image", "UnidentifiedImageError")])
def test_error_policy_names_the_file(tmp_path, kind, reason):
    image_root, meta = _make(tmp_path)
    path = _corrupt(image_root, kind)
    ds = _dataset(image_root, meta)  # construction does not decode images
    with pytest.raises(DataError) as info:
        ds[4]
    assert str(path) in str(info.value) and reason.lower() in str(info.value).lower()
    assert "--bad-images skip" in str(info.value)


@pytest.mark.parametrize("kind", ["zero-byte", "truncated", "not-an-image"])
def test_skip_policy_substitutes_the_same_class(tmp_path, kind, caplog):
    image_root, meta = _make(tmp_path)
    path = _corrupt(image_root, kind)
    ds = _dataset(image_root, meta, bad_image_policy="skip")
    with caplog.at_level(logging.WARNING):
        image, label, index = ds[4]
    assert label == 1 and index == 5, "the next image of class 1 replaces it"
    assert abs(_red(image) - 80) < 3
    assert ds.bad_images == 1
    assert str(path) in caplog.text and "c1/2.jpg" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ds[4][2] == 5, "deterministic"
    assert ds.bad_images == 2 and caplog.text == "", "counted again, logged once"
    assert ds[3][2] == 3 and ds[5][2] == 5, "readable images are untouched"


def test_skip_policy_wraps_around_within_the_class(tmp_path):
    image_root, meta = _make(tmp_path)
    (image_root / "c0/2.jpg").write_bytes(b"")
    ds = _dataset(image_root, meta, bad_image_policy="skip")
    assert ds[2][1:] == (0, 0)


def test_skip_policy_with_no_readable_image_in_the_class(tmp_path):
    image_root, meta = _make(tmp_path)
    for i in range(3):
        (image_root / f"c1/{i}.jpg").write_bytes(b"")
    ds = _dataset(image_root, meta, bad_image_policy="skip")
    with pytest.raises(DataError, match=r"no image of its class 1 \(dog\) is readable"):
        ds[3]


# spawn: the start method where the data set is pickled into the workers (forkserver, the default
# from Python 3.14 on, pickles the same way)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_bad_image_count_sums_over_loader_workers(tmp_path, start_method):
    image_root, meta = _make(tmp_path, per_class=(4, 4))
    (image_root / "c0/1.jpg").write_bytes(b"")
    (image_root / "c1/2.jpg").write_bytes(b"")
    ds = _dataset(image_root, meta, bad_image_policy="skip")
    loader = DataLoader(ds, batch_size=2, num_workers=2 if start_method == "fork" else 1,
                        multiprocessing_context=start_method)
    indices = torch.cat([batch[2] for batch in loader]).tolist()
    assert indices == [0, 2, 2, 3, 4, 5, 7, 7]
    assert ds.bad_images == 2, "substitutions made in worker processes are counted in the parent"
