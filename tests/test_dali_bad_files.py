"""Bad and unusual image files through both backends: the same policy and the same messages.

Readable but unusual files (PNG, grayscale, CMYK, the largest fruit-voc photograph, GIF, RGBA and
palette PNG, 16-bit gray PNG, a JPEG followed by junk) give both backends the same pixels within the
equivalence bound. Unreadable ones (zero-byte, truncated, not an image) raise the same ``DataError``
naming the file under ``--bad-images error`` and get the same substitute under ``skip``. The last
tests switch the byte screen off so that DALI's own decoder meets the bad files: the loader must find
the file, and apply the same policy.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shared_data import shared_data_dir

from mmcam_fast.data import dali_source
from mmcam_fast.data.dali import DaliLoader, dali_available
from mmcam_fast.data.datasets import WSOLDataset
from mmcam_fast.data.loaders import build_loader
from mmcam_fast.data.metadata import WSOLMetadata
from mmcam_fast.data.transforms import IMAGENET_STD, eval_transform
from mmcam_fast.errors import DataError

pytestmark = [pytest.mark.dali,
              pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")]

DATA = shared_data_dir()
TINY = DATA / "tiny-imagenet-5" / "train" / "n01443537" / "images"
PHOTO = DATA / "fruit-voc" / "train" / "apple_1.jpg"
LARGEST = DATA / "fruit-voc" / "train" / "banana_57.jpg"  # 2569 x 4605
GRAY = DATA / "tiny-imagenet-5" / "train" / "n01882714" / "images" / "n01882714_386.JPEG"
SIZE = 32
LEVEL = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0
UNREADABLE = ("zero.jpg", "truncated.jpg", "text.jpg")


def _make_files(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(sorted(TINY.glob("*.JPEG"))[:6]):
        shutil.copy(path, root / f"ok_{k}.jpg")
    photo = Image.open(PHOTO).convert("RGB")
    data = PHOTO.read_bytes()
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (root / "text.jpg").write_bytes(b"id,label\nthis is not an image\n" * 20)
    shutil.copy(root / "text.jpg", root / "text_b.jpg")
    (root / "trailing.jpg").write_bytes(data + b"\x00junk after the end marker" * 8)
    photo.save(root / "photo.png")
    photo.convert("CMYK").save(root / "cmyk.jpg", quality=90)
    photo.convert("RGBA").save(root / "rgba.png")
    photo.save(root / "anim.gif")
    palette = photo.convert("P")
    palette.info["transparency"] = 0
    palette.save(root / "palette.png", transparency=0)
    ramp = (np.arange(64 * 96, dtype=np.uint32).reshape(64, 96) * 10).astype(np.uint16)
    Image.fromarray(ramp).save(root / "gray16.png")
    shutil.copy(GRAY, root / "gray.jpg")
    os.symlink(LARGEST, root / "largest.jpg")


READABLE = ("ok_0.jpg", "photo.png", "gray.jpg", "cmyk.jpg", "largest.jpg", "anim.gif", "rgba.png",
            "palette.png", "gray16.png", "trailing.jpg", "ok_1.jpg")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad") / "images"
    _make_files(folder)
    return folder


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the torch path runs in this process (see test_dali_equivalence.py)
    yield
    torch.set_num_threads(threads)


def _dataset(root: Path, classes: dict[int, list[str]], policy: str = "error") -> WSOLDataset:
    ids = [name for label in sorted(classes) for name in classes[label]]
    labels = {name: label for label in classes for name in classes[label]}
    return WSOLDataset(root, WSOLMetadata(root, ids, labels), eval_transform(SIZE), bad_image_policy=policy)


def _dali(dataset: WSOLDataset, batch_size: int = 4) -> DaliLoader:
    return DaliLoader(dataset, batch_size=batch_size, workers=1, parallel=False)


def _torch(dataset: WSOLDataset, batch_size: int = 4):
    return build_loader(dataset, batch_size=batch_size)[0]


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() * LEVEL


def test_the_screen_sends_only_complete_jpeg_and_png_to_dali(root):
    decided = {name: dali_source.dali_decodes_as_pil(np.fromfile(root / name, np.uint8))
               for name in READABLE + UNREADABLE[1:]}
    assert decided == {"ok_0.jpg": True, "photo.png": True, "gray.jpg": True, "cmyk.jpg": True,
                       "largest.jpg": True, "anim.gif": False, "rgba.png": True, "palette.png": True,
                       "gray16.png": True, "trailing.jpg": False, "ok_1.jpg": True,
                       "truncated.jpg": False, "text.jpg": False}


def test_readable_files_give_the_same_pixels(root):
    dataset = _dataset(root, {0: list(READABLE)})
    dali = _dali(dataset, batch_size=6)
    pairs = list(zip(dali, _torch(dataset, batch_size=6), strict=True))
    for (a, la, ia), (b, lb, ib) in pairs:
        assert a.shape == b.shape and torch.equal(ia, ib) and torch.equal(la, lb)
        diff = _levels(a, b)
        interior = diff[..., 1:-1, 1:-1]
        # the DALI equivalence bound (docs/data.md, "DALI"; tests/test_dali_equivalence.py): one 8-bit level
        # inside, 32 on the outermost row and column, plus 1e-3 level of float32 normalisation
        assert float(interior.max()) <= 1.0 + 1e-3, [dataset.image_ids[i] for i in ia.tolist()]
        assert float(diff.max()) <= 32.0 + 1e-3  # the outermost row and column (equivalence bound)
    assert dataset.bad_images == 0


@pytest.mark.parametrize("name", UNREADABLE)
def test_error_policy_names_the_file_with_the_same_message(root, name):
    dataset = _dataset(root, {0: ["ok_0.jpg", "ok_1.jpg", "ok_2.jpg", name, "ok_3.jpg"]})
    with pytest.raises(DataError) as from_torch:
        list(_torch(dataset, batch_size=2))
    with pytest.raises(DataError) as from_dali:
        list(_dali(dataset, batch_size=2))
    assert str(from_dali.value) == str(from_torch.value)
    assert str(from_dali.value).startswith(f"{root / name}: cannot read the image (")
    assert "--bad-images skip" in str(from_dali.value)


def _skip_classes() -> dict[int, list[str]]:
    return {0: ["ok_0.jpg", "zero.jpg", "ok_1.jpg", "truncated.jpg", "text.jpg", "ok_2.jpg"],
            1: ["ok_3.jpg", "text_b.jpg", "ok_4.jpg", "ok_5.jpg"]}


def _run_skip(root: Path, loader_of, caplog) -> tuple[list[int], list[int], torch.Tensor, int, set[str]]:
    dataset = _dataset(root, _skip_classes(), policy="skip")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        batches = list(loader_of(dataset))
    indices = torch.cat([b[2] for b in batches]).tolist()
    labels = torch.cat([b[1] for b in batches]).tolist()
    messages = {r.getMessage() for r in caplog.records if "cannot read the image" in r.getMessage()}
    return indices, labels, torch.cat([b[0] for b in batches]), dataset.bad_images, messages


def test_skip_policy_substitutes_the_same_images(root, caplog):
    t_indices, t_labels, t_images, t_count, t_messages = _run_skip(root, lambda d: _torch(d, 3), caplog)
    d_indices, d_labels, d_images, d_count, d_messages = _run_skip(root, lambda d: _dali(d, 3), caplog)
    # zero, truncated and text (class 0) -> the next readable image of class 0; text_b (class 1) -> ok_4
    assert t_indices == [0, 2, 2, 5, 5, 5, 6, 8, 8, 9]
    assert (d_indices, d_labels) == (t_indices, t_labels)
    assert t_labels == [0] * 6 + [1] * 4
    assert d_count == t_count == 4
    assert d_messages == t_messages and len(d_messages) == 4
    assert float(_levels(d_images, t_images)[..., 1:-1, 1:-1].max()) <= 1.0 + 1e-3  # the bound, as above


def test_skip_policy_with_no_readable_image_in_the_class(root):
    dataset = _dataset(root, {0: ["ok_0.jpg", "ok_1.jpg"], 1: ["zero.jpg", "text.jpg"]}, policy="skip")
    with pytest.raises(DataError) as from_torch:
        list(_torch(dataset, batch_size=2))
    dataset = _dataset(root, {0: ["ok_0.jpg", "ok_1.jpg"], 1: ["zero.jpg", "text.jpg"]}, policy="skip")
    with pytest.raises(DataError) as from_dali:
        list(_dali(dataset, batch_size=2))
    assert str(from_dali.value) == str(from_torch.value)
    assert "no image of its class 1 is readable" in str(from_dali.value)


@pytest.fixture
def no_screen(monkeypatch):
    """Hand every non-empty file to DALI's decoder as it is (the loader's own process only)."""
    monkeypatch.setattr(dali_source, "dali_decodes_as_pil", lambda data: True)


def test_a_file_dali_cannot_decode_is_found_error_policy(root, no_screen):
    dataset = _dataset(root, {0: ["ok_0.jpg", "ok_1.jpg", "ok_2.jpg", "truncated.jpg", "ok_3.jpg"]})
    with pytest.raises(DataError) as from_dali:
        list(_dali(dataset, batch_size=2))
    assert str(from_dali.value).startswith(f"{root / 'truncated.jpg'}: cannot read the image (OSError: image "
                                           "file is truncated")


def test_a_file_dali_cannot_decode_is_found_skip_policy(root, no_screen, caplog):
    classes = {0: ["ok_0.jpg", "ok_1.jpg", "truncated.jpg", "ok_2.jpg"], 1: ["ok_3.jpg", "anim.gif"]}
    dataset = _dataset(root, classes, policy="skip")
    reference = [b for b in _torch(_dataset(root, classes, policy="skip"), batch_size=3)]
    with caplog.at_level(logging.WARNING):
        batches = list(_dali(dataset, batch_size=3))
    # truncated.jpg -> ok_2 (skip policy); anim.gif: PIL reads it, DALI refused it -> decoded by PIL
    assert torch.cat([b[2] for b in batches]).tolist() == [0, 1, 3, 3, 4, 5]
    assert torch.cat([b[2] for b in reference]).tolist() == [0, 1, 3, 3, 4, 5]
    diff = _levels(torch.cat([b[0] for b in batches]), torch.cat([b[0] for b in reference]))
    assert float(diff[..., 1:-1, 1:-1].max()) <= 1.0 + 1e-3 and float(diff.max()) <= 32.0 + 1e-3  # as above
    assert any("anim.gif: DALI's decoder refused the image" in r.getMessage() for r in caplog.records)
    assert dataset.bad_images == 1
