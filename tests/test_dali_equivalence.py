"""The DALI CPU pipeline against the torchvision path on real JPEGs: geometry exactly, pixels within a
stated bound (docs/data.md, "DALI": the bound and how the resize filter was chosen).

Every JPEG of fruit-voc (300 photographs, 166x160 to 2569x4605) and of tiny-imagenet-5 (2750 images
at 64x64, 36 of them grayscale) goes through both paths. Differences are measured in 8-bit levels
(``|a - b| * std * 255``): the decoders agree exactly (both are libjpeg-turbo with the same settings),
so what remains is the resize filter's fixed-point rounding, and on downscaling the outermost row and
column, where PIL renormalizes the part of the filter inside the image and DALI clamps coordinates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import shared_data_dir
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mmcam_fast.data.dali import DaliLoader, dali_available, plan_augmentation
from mmcam_fast.data.datasets import WSOLDataset
from mmcam_fast.data.images import image_size, load_rgb
from mmcam_fast.data.loaders import build_loader
from mmcam_fast.data.metadata import WSOLMetadata
from mmcam_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

pytestmark = [pytest.mark.dali,
              pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")]

DATA = shared_data_dir()
# The bound, in 8-bit levels (docs/data.md): one level away from the border; on downscaling, the outermost
# row and column of the resized image (measured at most 26 levels on these images); and on average.
INTERIOR_LEVELS = 1.0
BORDER_LEVELS = 32.0
MEAN_LEVELS = 0.25
EPS = 1e-3  # float32 normalization arithmetic, in levels
LEVEL = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0


def _dataset(folder: str, pattern: str, transform) -> WSOLDataset:
    root = DATA / folder
    ids = sorted(str(p.relative_to(root)) for p in root.glob(pattern))
    # one class per top-level name (fruit kind or wnid); the label does not matter here
    keys = sorted({Path(i).name.split("_")[0] for i in ids})
    labels = {i: keys.index(Path(i).name.split("_")[0]) for i in ids}
    return WSOLDataset(root, WSOLMetadata(root, ids, labels), transform)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The torch path runs in this process: two intra-op threads on two busy cores make each small
    # normalization op tens of times slower (measured), as DataLoader workers avoid by using one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fruit_eval():
    return _dataset("fruit-voc", "*/*.jpg", eval_transform(224))


@pytest.fixture(scope="module")
def tiny_eval():
    return _dataset("tiny-imagenet-5", "**/*.JPEG", eval_transform(64))


def _levels(dali: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (dali.float() - reference.float()).abs() * LEVEL


def _border(side: int) -> torch.Tensor:
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[[0, -1], :] = True
    mask[:, [0, -1]] = True
    return mask


def _compare(diffs: list[torch.Tensor], borders: list[torch.Tensor], ids: list[str], *,
             interior: float, border: float) -> dict[str, float]:
    worst_interior = max(float(d[:, ~b].max()) for d, b in zip(diffs, borders, strict=True))
    worst_border = max(float(d[:, b].max()) if b.any() else 0.0 for d, b in zip(diffs, borders, strict=True))
    mean = float(torch.cat([d.flatten() for d in diffs]).mean())
    stats = {"interior_max": worst_interior, "border_max": worst_border, "mean": mean}
    bad = [(i, float(d[:, ~b].max())) for i, d, b in zip(ids, diffs, borders, strict=True)
           if float(d[:, ~b].max()) > interior + EPS]
    assert not bad, f"interior pixels differ by more than {interior} level(s): {bad[:5]} ({stats})"
    bad = [(i, float(d.max())) for i, d in zip(ids, diffs, strict=True) if float(d.max()) > border + EPS]
    assert not bad, f"border pixels differ by more than {border} levels: {bad[:5]} ({stats})"
    assert mean <= MEAN_LEVELS, stats
    print(f"{len(diffs)} images: {stats}")  # docs/data.md's figures (pytest -s)
    return stats


def _eval_pairs(dataset: WSOLDataset, batch_size: int):
    dali = DaliLoader(dataset, batch_size=batch_size, workers=2, parallel=False, return_sizes=True)
    torch_loader, _ = build_loader(dataset, batch_size=batch_size, return_sizes=True)
    for (a, la, ia, sa), (b, lb, ib, sb) in zip(dali, torch_loader, strict=True):
        assert a.shape == b.shape and torch.equal(ia, ib) and torch.equal(la, lb)
        assert torch.equal(sa, sb)  # original (width, height), from DALI's header read and PIL's
        yield a, b, ia
    dali.close()


@pytest.mark.parametrize("case", ["fruit-voc at 224 (downscaling)", "tiny-imagenet-5 at 64 (same size)",
                                  "tiny-imagenet-5 val at 224 (upscaling)"])
def test_eval_transform_matches_torchvision(case, fruit_eval, tiny_eval):
    if case.startswith("fruit"):
        dataset, interior, border = fruit_eval, INTERIOR_LEVELS, BORDER_LEVELS
    elif "64" in case:
        dataset, interior, border = tiny_eval, EPS, EPS  # no resampling: identical pixels
    else:
        dataset = _dataset("tiny-imagenet-5", "val/images/*.JPEG", eval_transform(224))
        assert len(dataset) == 250
        interior, border = INTERIOR_LEVELS, INTERIOR_LEVELS  # upscaling: one level everywhere
    diffs, borders, ids = [], [], []
    for a, b, indices in _eval_pairs(dataset, 25):
        side = a.shape[-1]
        for k, index in enumerate(indices.tolist()):
            diffs.append(_levels(a[k], b[k]))
            borders.append(_border(side))
            ids.append(dataset.image_ids[index])
    assert len(diffs) == len(dataset)
    _compare(diffs, borders, ids, interior=interior, border=border)


def _reference_train(path: Path, params: np.ndarray, crop: int, resize: int) -> torch.Tensor:
    """The torchvision train transform with the crop and flips DALI used."""
    image = F.resize(load_rgb(path), [resize, resize])
    y, x, hflip, vflip = (int(v) for v in params)
    image = F.crop(image, y, x, crop, crop)
    if hflip:
        image = F.horizontal_flip(image)
    if vflip:
        image = F.vertical_flip(image)
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(image)


def _train_border(params: np.ndarray, crop: int, resize: int) -> torch.Tensor:
    """Where the outermost rows and columns of the R x R resized image land in the crop."""
    mask = torch.zeros(resize, resize, dtype=torch.bool)
    mask[[0, -1], :] = True
    mask[:, [0, -1]] = True
    y, x, hflip, vflip = (int(v) for v in params)
    mask = mask[y:y + crop, x:x + crop]
    if hflip:
        mask = mask.flip(1)
    if vflip:
        mask = mask.flip(0)
    return mask


@pytest.mark.parametrize(("folder", "pattern", "crop", "limit"), [
    ("fruit-voc", "test/*.jpg", 224, BORDER_LEVELS),  # 55 photographs, downscaled to 256 then cropped
    ("tiny-imagenet-5", "val/images/val_1*.JPEG", 64, INTERIOR_LEVELS),  # 64 -> 73 (upscaling), crop 64
])
def test_train_transform_matches_torchvision_with_the_same_crops_and_flips(folder, pattern, crop, limit):
    dataset = _dataset(folder, pattern, train_transform(crop, vertical_flip=True))
    resize = round(crop * 8 / 7)
    loader = DaliLoader(dataset, batch_size=16, workers=2, parallel=False, seed=7)
    loader.set_epoch(3)
    diffs, borders, ids, flips = [], [], [], np.zeros(2)
    for position, (images, _, indices) in enumerate(loader):
        params = plan_augmentation(loader.spec, 16, seed=7, rank=0, epoch=3, position=position)
        for k, index in enumerate(indices.tolist()):
            path = dataset.image_path(index)
            reference = _reference_train(path, params[k], crop, resize)
            assert images[k].shape == reference.shape == (3, crop, crop)
            diffs.append(_levels(images[k], reference))
            borders.append(_train_border(params[k], crop, resize))
            ids.append(dataset.image_ids[index])
            flips += params[k, 2:]
    loader.close()
    assert len(diffs) == len(dataset)
    assert 0 < flips[0] < len(diffs) and 0 < flips[1] < len(diffs)  # both flips were exercised
    _compare(diffs, borders, ids, interior=INTERIOR_LEVELS, border=limit)


def test_largest_fruit_image_goes_through_both_paths(fruit_eval):
    index = fruit_eval.image_ids.index("train/banana_57.jpg")
    assert image_size(fruit_eval.image_path(index)) == (2569, 4605)
    subset = WSOLDataset(fruit_eval.image_root, WSOLMetadata(fruit_eval.image_root, ["train/banana_57.jpg"],
                                                             {"train/banana_57.jpg": 1}), eval_transform(224))
    (a, b, _), = list(_eval_pairs(subset, 1))
    _compare([_levels(a[0], b[0])], [_border(224)], ["train/banana_57.jpg"], interior=INTERIOR_LEVELS,
             border=BORDER_LEVELS)
