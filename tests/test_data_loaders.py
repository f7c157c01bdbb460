"""build_datasets for every --data name, and build_loader (batches, worker errors, resume)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shared_data import shared_data_dir

from mmcam_fast.data.catalogue import DATA_NAMES
from mmcam_fast.data.converters import prepare_voc
from mmcam_fast.data.loaders import build_loader
from mmcam_fast.data.metadata import write_metadata
from mmcam_fast.data.splits import build_datasets, set_batch_sampler
from mmcam_fast.errors import ConfigError, DataError

DATA = shared_data_dir()
WSOL = DATA / "wsol-metadata"
SYNTHETIC = {"num_classes": 4, "train_per_class": 10, "val_per_class": 2, "test_per_class": 2, "size": 32}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return build_datasets("synthetic", tmp_path_factory.mktemp("syn") / "set", image_size=32,
                          synthetic=SYNTHETIC)


def test_unknown_data_name_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        build_datasets("cifar10", "anywhere")
    assert "--data 'cifar10'" in str(info.value)
    assert all(name in str(info.value) for name in DATA_NAMES)


@pytest.mark.parametrize("data", ["tiny-imagenet", "voc", "cub", "imagenet", "openimages"])
def test_missing_data_root(tmp_path, data):
    with pytest.raises(ConfigError, match="--data-root"):
        build_datasets(data, None)
    with pytest.raises(DataError, match="--data-root"):
        build_datasets(data, tmp_path / "missing")


def test_synthetic(synthetic, tmp_path):
    assert synthetic.num_classes == 4
    assert synthetic.class_names == ["ellipse", "rectangle", "triangle", "star"]
    assert (len(synthetic.train), len(synthetic.val), len(synthetic.test)) == (40, 8, 8)
    image, label, index = synthetic.train[0]
    assert image.shape == (3, 32, 32) and (label, index) == (0, 0)
    assert synthetic.val.bad_image_policy == "error"
    # the default location is <cache_root>/synthetic
    made = build_datasets("synthetic", None, cache_root=tmp_path, image_size=32, synthetic=SYNTHETIC)
    assert made.data_root == tmp_path / "synthetic"
    # the mask variant through --metadata-root
    masks = build_datasets("synthetic", synthetic.data_root, image_size=32, synthetic=SYNTHETIC,
                           metadata_root=synthetic.data_root / "metadata-masks")
    assert masks.test.metadata.has_masks
    mask_files, ignore = masks.test.mask_paths(0)
    assert mask_files[0].is_file() and ignore is not None and ignore.is_file()


def test_tiny_imagenet_raw_source_is_converted_into_the_cache(tmp_path):
    sets = build_datasets("tiny-imagenet", DATA / "tiny-imagenet-5", cache_root=tmp_path, image_size=64)
    assert sets.data_root.parent == tmp_path and sets.data_root.name.startswith("tiny-imagenet-")
    assert (len(sets.train), len(sets.val), len(sets.test)) == (2450, 50, 250)
    assert sets.class_names[0] == "goldfish" and sets.num_classes == 5
    gray = sets.train.image_ids.index("train/n01882714/images/n01882714_386.JPEG")
    image, label, _ = sets.train[gray]
    assert image.shape == (3, 64, 64) and label == 2
    # the prepared folder itself works as --data-root; a folder of the wrong kind is refused
    again = build_datasets("tiny-imagenet", sets.data_root, image_size=64)
    assert again.test.image_ids == sets.test.image_ids
    with pytest.raises(ConfigError, match="prepared as 'tiny-imagenet'"):
        build_datasets("voc", sets.data_root)
    with pytest.raises(DataError, match="prepared.json"):
        build_datasets("voc", tmp_path)


def test_voc_prepared(tmp_path):
    out = prepare_voc(DATA / "fruit-voc", tmp_path / "fruit")
    sets = build_datasets("voc", out, image_size=32)
    assert sets.class_names == ["apple", "banana", "orange"]
    index = sets.train.image_ids.index("train/banana_57.jpg")  # the 2569 x 4605 photograph
    image, label, _ = sets.train[index]
    assert image.shape == (3, 32, 32) and label == 1
    assert sets.train.original_size(index) == (2569, 4605)


def _subset(src: Path, dst: Path, keep) -> list[str]:
    """Copy the metadata lines of the ids ``keep`` selects from a real split folder."""
    dst.mkdir(parents=True)
    ids = [i for i in (src / "image_ids.txt").read_text().split("\n") if i and keep(i)]
    wanted = set(ids)
    for name in ("image_ids.txt", "class_labels.txt", "image_sizes.txt", "localization.txt"):
        lines = [line for line in (src / name).read_text().split("\n")
                 if line and line.split(",")[0] in wanted]
        (dst / name).write_text("".join(f"{line}\n" for line in lines))
    return ids


def _images(root: Path, sizes: dict[str, tuple[int, int]]) -> None:
    for image_id, size in sizes.items():
        (root / image_id).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (90, 120, 30)).save(root / image_id)


def _sizes(folder: Path) -> dict[str, tuple[int, int]]:
    rows = [line.split(",") for line in (folder / "image_sizes.txt").read_text().split("\n") if line]
    return {r[0]: (int(r[1]), int(r[2])) for r in rows}


def test_cub_with_benchmark_metadata_layout(tmp_path):
    meta = tmp_path / "metadata"  # the benchmark's metadata/ folder: metadata/CUB/<split>
    for split in ("train", "val", "test"):
        _subset(WSOL / "CUB" / split, meta / "CUB" / split, lambda i: i.startswith(("001.", "002.")))
    data_root = tmp_path / "CUB_200_2011"  # the raw CUB folder: images under images/
    for split in ("train", "val", "test"):
        _images(data_root / "images", _sizes(meta / "CUB" / split))
    sets = build_datasets("cub", data_root, metadata_root=meta, image_size=32)
    assert sets.train.image_root == data_root / "images"
    assert sets.class_names == ["Black_footed_Albatross", "Laysan_Albatross"]
    assert len(sets.test) == sum(1 for _ in (meta / "CUB/test/image_ids.txt").open())
    assert sets.test[0][0].shape == (3, 32, 32)
    # a listed image that is not there
    (data_root / "images" / sets.val.image_ids[0]).unlink()
    with pytest.raises(DataError, match=r"1 of \d+ image\(s\) listed in .*val/image_ids.txt are missing"):
        build_datasets("cub", data_root, metadata_root=meta)


def test_imagenet_splits_and_labels_only_train(tmp_path):
    root = tmp_path / "ILSVRC"
    meta = root / "metadata"
    val_ids = _subset(WSOL / "ILSVRC" / "val", meta / "val", lambda i: i.startswith(("val2/0/", "val2/1/")))
    assert val_ids and all(i.startswith("val2/") for i in val_ids)
    _images(root, _sizes(meta / "val"))
    # ImageNet train metadata carries labels only; the test split is ImageNet val
    train_labels = {f"train/n0144076{k}/n0144076{k}_{i}.JPEG": k for k in (0, 1) for i in range(3)}
    train_ids = list(train_labels)
    (meta / "train").mkdir(parents=True)
    (meta / "train/image_ids.txt").write_text("".join(f"{i}\n" for i in train_ids))
    (meta / "train/class_labels.txt").write_text("".join(f"{i},{k}\n" for i, k in train_labels.items()))
    _images(root, {i: (40, 30) for i in train_ids})
    test_ids = ["val/ILSVRC2012_val_00000001.JPEG", "val/ILSVRC2012_val_00000002.JPEG"]
    write_metadata(meta / "test", test_ids, {test_ids[0]: 0, test_ids[1]: 1}, {i: (50, 40) for i in test_ids},
                   boxes={i: [(3, 4, 30, 20)] for i in test_ids})
    _images(root, {i: (50, 40) for i in test_ids})
    sets = build_datasets("imagenet", root, image_size=32)
    assert sets.class_names == ["n01440760", "n01440761"]
    assert sets.train.boxes(0) == [] and sets.train.labels == [0, 0, 0, 1, 1, 1]
    assert sets.val.image_ids == val_ids and sets.test.image_ids == test_ids


def test_openimages_masks_relative_to_the_data_root(tmp_path):
    root = tmp_path / "OpenImages"
    meta = root / "metadata"
    sample = WSOL / "openimages-sample" / "test_masks"
    with_masks = {p.name.split("_")[0] for p in sample.rglob("*.png")}
    val_ids = _subset(WSOL / "OpenImages" / "val", meta / "val",
                      lambda i: Path(i).stem in with_masks)
    assert len(val_ids) == 5
    _subset(WSOL / "OpenImages" / "val", meta / "test", lambda i: Path(i).stem in with_masks)
    for png in sample.rglob("*.png"):  # masks next to the images, as the benchmark unpacks them
        target = root / png.relative_to(sample)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png.read_bytes())
    _images(root, {i: Image.open(next(sample.rglob(f"{Path(i).stem}_*.png"))).size for i in val_ids})
    (meta / "train").mkdir(parents=True)
    (meta / "train/image_ids.txt").write_text("train/0bt_c3/a.jpg\ntrain/0by6g/b.jpg\n")
    (meta / "train/class_labels.txt").write_text("train/0bt_c3/a.jpg,80\ntrain/0by6g/b.jpg,81\n")
    _images(root, {"train/0bt_c3/a.jpg": (20, 20), "train/0by6g/b.jpg": (20, 20)})
    sets = build_datasets("openimages", root, image_size=32)
    assert sets.num_classes == 82
    assert sets.val.metadata.has_masks
    index = sets.val.image_ids.index("val/0bt_c3/3a29f0b33894d4a6.jpg")
    masks, ignore = sets.val.mask_paths(index)
    assert len(masks) == 2 and all(m.is_file() for m in masks) and ignore.is_file()
    assert sets.val.original_size(index) == Image.open(masks[0]).size  # no sizes in the metadata
    (root / "val/0by6g/490365f63135f3e0_ignore.png").unlink()
    with pytest.raises(DataError, match="490365f63135f3e0_ignore.png"):
        build_datasets("openimages", root)


def test_box_outside_its_image_is_reported_through_the_builder(synthetic, tmp_path):
    root = synthetic.data_root
    meta = tmp_path / "meta"
    for split in ("train", "val", "test"):
        (meta / split).mkdir(parents=True)
        for name in ("image_ids.txt", "class_labels.txt", "image_sizes.txt", "localization.txt"):
            (meta / split / name).write_text((root / "metadata" / split / name).read_text())
    loc = meta / "test" / "localization.txt"
    lines = loc.read_text().splitlines()
    first = lines[0].split(",")
    lines[0] = ",".join(first[:3] + ["32", first[4]])  # x1 = 32 in a 32-pixel-wide image
    loc.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"localization.txt: box outside the image .*" + first[0]):
        build_datasets("synthetic", root, metadata_root=meta, synthetic=SYNTHETIC)


def test_missing_metadata_root(synthetic, tmp_path):
    with pytest.raises(DataError, match="--metadata-root"):
        build_datasets("synthetic", synthetic.data_root, metadata_root=tmp_path / "none", synthetic=SYNTHETIC)


def test_set_batches_through_the_loader(synthetic):
    sampler = set_batch_sampler(synthetic.train, sets_per_batch=3, set_size=4, seed=0)
    loader, steps = build_loader(synthetic.train, batch_sampler=sampler, workers=0)
    assert steps == len(loader) == 40 // 12
    batches = list(loader)
    assert len(batches) == steps
    images, labels, indices = batches[0]
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and indices.dtype == torch.int64
    per_set = labels.view(3, 4)
    assert (per_set == per_set[:, :1]).all() and len(set(per_set[:, 0].tolist())) == 3
    assert [synthetic.train.labels[i] for i in indices.tolist()] == labels.tolist()


def test_small_class_error_names_the_class_through_the_helper(synthetic):
    with pytest.raises(DataError, match=r"class \d \((ellipse|rectangle|triangle|star)\) has 10"):
        set_batch_sampler(synthetic.train, sets_per_batch=2, set_size=11, seed=0)


def test_eval_loader_steps(synthetic):
    loader, steps = build_loader(synthetic.test, batch_size=3)
    assert steps == 3 and [len(b[2]) for b in loader] == [3, 3, 2]
    _, steps = build_loader(synthetic.test, batch_size=3, drop_last=True)
    assert steps == 2


def test_backends_and_arguments():
    with pytest.raises(ConfigError, match="unknown loader backend 'tf'"):
        build_loader(None, batch_size=2, backend="tf")
    with pytest.raises(ConfigError, match="exactly one"):
        build_loader(None)


def test_worker_error_arrives_as_the_original_message(synthetic, tmp_path):
    sets = build_datasets("synthetic", tmp_path / "copy", image_size=32, synthetic=SYNTHETIC)
    bad = sets.test.image_path(5)
    bad.write_bytes(b"")
    loader, _ = build_loader(sets.test, batch_size=4, workers=2)
    with pytest.raises(DataError) as info:
        list(loader)
    message = str(info.value)
    assert message.startswith(f"{bad}: cannot read the image (empty (zero-byte) file)")
    assert "Traceback" not in message


def test_loader_resume_continues_the_epoch(synthetic):
    def make():
        sampler = set_batch_sampler(synthetic.train, sets_per_batch=2, set_size=2, seed=4)
        return build_loader(synthetic.train, batch_sampler=sampler, workers=1, seed=4)[0]

    reference = make()
    reference.set_epoch(1)
    full = [b[2].tolist() for b in reference]
    run = make()
    run.set_epoch(1)
    it = iter(run)
    head = [next(it)[2].tolist() for _ in range(3)]  # the worker has prefetched further
    state = run.state_dict()
    assert state["position"] == 3 and state["sampler"]["position"] == 3
    del it
    resumed = make()
    resumed.load_state_dict(state)
    tail = [b[2].tolist() for b in resumed]
    assert head + tail == full
    # augmentations of an epoch are reproducible for a fixed number of workers
    a = make()
    a.set_epoch(2)
    b = make()
    b.set_epoch(2)
    first_a, first_b = next(iter(a)), next(iter(b))
    assert torch.equal(first_a[0], first_b[0])
    assert np.array_equal(first_a[2].numpy(), first_b[2].numpy())
