"""From a ``--data`` name to its data sets (the loader over a data set: :mod:`mmcam_fast.data.loaders`).

``build_datasets(data, data_root, ...)``: the train/val/test data sets of a ``--data`` name. It
knows where each data set keeps its images and metadata:

==============  =========================================================================================
``--data``      ``--data-root`` and metadata
==============  =========================================================================================
synthetic       generated on first use into ``--data-root`` (default ``runs/data/synthetic``), then reused
                as it is (a folder made by ``prepare synthetic`` keeps its own sizes; never rewritten)
tiny-imagenet   a folder made by ``python -m mmcam_fast.prepare tiny-imagenet``; or the raw Tiny
                ImageNet folder, which is then converted (metadata only, no image copies) into
                ``<cache_root>/tiny-imagenet-<hash of its path>`` and reused from there
voc             the same with ``prepare voc`` (fruit-voc layout)
cub             the CUB images (``<class folder>/<file>.jpg``, the benchmark's ``dataset/CUB``; a raw
                ``CUB_200_2011`` folder works too, its ``images/`` is used), CUBV2 for val
imagenet        ``dataset/ILSVRC``: ``train/`` (ImageNet train), ``val2/`` (ImageNetV2, the val split),
                ``val/`` (ImageNet val, the test split), ids as in the benchmark's metadata
openimages      ``dataset/OpenImages`` with ``train/ val/ test/``; masks are read relative to the mask
                root, by default the data root (the benchmark unpacks them next to the images)
==============  =========================================================================================

Metadata is read from ``<metadata root>/<split>`` or ``<metadata root>/<CUB|ILSVRC|OpenImages>/<split>``
(so ``--metadata-root`` may point at the benchmark's ``metadata/`` folder); the metadata root defaults
to ``<data root>/metadata``. A train split without ``localization.txt`` (ImageNet and OpenImages
train carry labels only) is read as labels only. Class names come from ``classes.txt`` in the data or
metadata root when present, else from the train ids' folder names (CUB: ``001.Black_footed_Albatross``
becomes ``Black_footed_Albatross``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcam_fast.data.catalogue import BENCHMARK_FOLDERS, DATA_NAMES
from mmcam_fast.data.converters import ensure_prepared
from mmcam_fast.data.datasets import WSOLDataset
from mmcam_fast.data.images import UNREADABLE_IMAGE_ERRORS, describe_unreadable, load_rgb
from mmcam_fast.data.manifest import CLASSES_FILE, read_class_names, read_manifest
from mmcam_fast.data.metadata import WSOLMetadata, load_metadata
from mmcam_fast.data.sampler import SetBatchSampler
from mmcam_fast.data.synthetic import make_synthetic, synthetic_parameters
from mmcam_fast.data.transforms import eval_transform, train_transform
from mmcam_fast.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
DEFAULT_CACHE_ROOT = Path("runs/data")


@dataclass
class DataSplits:
    """The three splits of a data set and what the model needs to know about its classes."""

    train: WSOLDataset
    val: WSOLDataset
    test: WSOLDataset
    num_classes: int
    class_names: list[str]
    data_root: Path
    metadata_root: Path


# -- metadata --------------------------------------------------------------------------------------

def _split_folder(metadata_root: Path, data: str, split: str) -> Path:
    for folder in (metadata_root / split, metadata_root / BENCHMARK_FOLDERS.get(data, "") / split):
        if (folder / "image_ids.txt").exists():
            return folder
    raise DataError(f"{metadata_root}: no {split}/image_ids.txt (nor {BENCHMARK_FOLDERS.get(data, '')}/"
                    f"{split}/image_ids.txt); check --metadata-root")


def _load_split(metadata_root: Path, data: str, split: str) -> WSOLMetadata:
    return load_metadata(_split_folder(metadata_root, data, split))


def _derived_class_names(meta: WSOLMetadata) -> list[str] | None:
    """Class names from the folders of the train ids, when every class has exactly one folder."""
    folders: dict[int, set[str]] = {}
    for image_id in meta.image_ids:
        parent = image_id.rsplit("/", 2)
        if len(parent) < 2:
            return None
        folders.setdefault(meta.labels[image_id], set()).add(parent[-2])
    if any(len(f) != 1 for f in folders.values()) or len(folders) != max(folders) + 1:
        return None
    names = [next(iter(folders[k])) for k in range(len(folders))]
    if len(set(names)) != len(names):
        return None
    return [re.sub(r"^\d+\.", "", n) for n in names]


def _class_names(roots: Sequence[Path], train: WSOLMetadata) -> list[str] | None:
    for root in roots:
        if (root / CLASSES_FILE).exists():
            return read_class_names(root / CLASSES_FILE)
    return _derived_class_names(train)


# -- data roots ------------------------------------------------------------------------------------

def _require_root(data: str, data_root: str | Path | None) -> Path:
    if data_root is None:
        raise ConfigError(f"--data {data} needs --data-root (the folder holding its images)")
    root = Path(data_root)
    if root.is_file():
        hint = (f"; an archive is converted once by `python -m mmcam_fast.prepare {data} --src {root} "
                "--out DIR`, then --data-root DIR" if data == "tiny-imagenet" else "")
        raise DataError(f"{root}: a file, not a folder (--data-root is the folder holding the images{hint})")
    if not root.is_dir():
        raise DataError(f"{root}: data folder does not exist (check --data-root)")
    return root


def _looks_raw(data: str, root: Path) -> bool:
    if data == "tiny-imagenet":
        return (root / "wnids.txt").exists() or (root / "val" / "val_annotations.txt").exists()
    return (root / "train").is_dir() and any((root / "train").glob("*.xml"))


def _prepared_root(data: str, root: Path, cache_root: Path) -> Path:
    manifest = read_manifest(root)
    if manifest is not None:
        if manifest.get("kind") != data:
            raise ConfigError(f"{root} was prepared as {manifest.get('kind')!r} data, not {data!r} (--data)")
        return root
    if _looks_raw(data, root):
        digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
        return ensure_prepared(data, root, cache_root / f"{data}-{digest}")
    raise DataError(f"{root}: neither a folder made by `python -m mmcam_fast.prepare {data}` (no "
                    f"prepared.json) nor a raw {data} source folder (check --data-root)")


def _cub_image_root(root: Path, train: WSOLMetadata) -> Path:
    first = train.image_ids[0]
    if not (root / first).exists() and (root / "images" / first).exists():
        return root / "images"  # the raw CUB_200_2011 folder
    return root


def build_datasets(data: str, data_root: str | Path | None = None, *, image_size: int = 224,
                   resize_size: int | None = None, vertical_flip: bool = False,
                   flip_before_crop: bool = False,
                   metadata_root: str | Path | None = None, mask_root: str | Path | None = None,
                   bad_image_policy: str = "error", cache_root: str | Path = DEFAULT_CACHE_ROOT,
                   synthetic: dict[str, Any] | None = None, check_files: bool = True,
                   require_localization: bool = True) -> DataSplits:
    """The train, val and test data sets of ``--data``.

    Args:
        data: one of ``DATA_NAMES`` (``--data``).
        data_root: the data folder (``--data-root``); see the module docstring per data set.
        image_size: the network's input size C (``--image-size``); train images are resized to
            ``resize_size`` (default ``round(C * 8 / 7)``) and randomly cropped to C.
        vertical_flip: add the authors' random vertical flip to the train transform.
        flip_before_crop: flip before the random crop (the released code's order), not after it.
        metadata_root: default ``<data_root>/metadata`` (``--metadata-root``).
        mask_root: where mask paths are relative to (mask data sets); default ``data_root``.
        bad_image_policy: ``"error"`` or ``"skip"`` for the train split (``--bad-images``); val and
            test always use ``"error"``, since the protocol scores every image.
        cache_root: where raw tiny-imagenet / voc sources are converted and synthetic data is made
            when no ``data_root`` is given.
        synthetic: keyword arguments of ``make_synthetic`` (number of classes, images, size, seed).
        check_files: check at construction that every listed image exists.
        require_localization: val and test must have boxes or masks (WSOL); False for a
            classification set (pretraining).

    Raises:
        ConfigError: an unknown data name, or a missing required flag.
        DataError: missing folders, metadata or images, or inconsistent metadata.
    """
    if data not in DATA_NAMES:
        raise ConfigError(f"--data {data!r} is not a known data set; valid: {', '.join(DATA_NAMES)}")
    cache_root = Path(cache_root)
    if data == "synthetic":
        root = Path(data_root) if data_root is not None else cache_root / "synthetic"
        if synthetic is None:  # a folder made by `prepare synthetic` with its own sizes is read as it is
            synthetic = synthetic_parameters(root) or {}
        root = make_synthetic(root, **synthetic)
    elif data in ("tiny-imagenet", "voc"):
        root = _prepared_root(data, _require_root(data, data_root), cache_root)
    else:
        root = _require_root(data, data_root)
    meta_root = Path(metadata_root) if metadata_root is not None else root / "metadata"
    if not meta_root.is_dir():
        raise DataError(f"{meta_root}: metadata folder does not exist (check --metadata-root)")
    metas = {split: _load_split(meta_root, data, split) for split in SPLITS}
    for split in ("val", "test") if require_localization else ():  # WSOL scores localization there
        meta = metas[split]
        if not meta.boxes and not meta.has_masks:
            loc_file = _split_folder(meta_root, data, split) / "localization.txt"
            raise DataError(f"{loc_file}: missing or empty; the {split} split needs boxes or masks (the "
                            "protocol scores localization)")

    image_root = _cub_image_root(root, metas["train"]) if data == "cub" else root
    names = _class_names([root, meta_root], metas["train"])
    max_label = max(max(m.labels.values()) for m in metas.values())
    if names is None:
        names = [str(k) for k in range(max_label + 1)]
    elif max_label >= len(names):
        raise DataError(f"{meta_root}: class label {max_label} but only {len(names)} class names "
                        f"({CLASSES_FILE} or the train folders)")
    transforms = {"train": train_transform(image_size, resize_size, vertical_flip=vertical_flip,
                                           flip_before_crop=flip_before_crop),
                  "val": eval_transform(image_size), "test": eval_transform(image_size)}
    sets = {split: WSOLDataset(image_root, metas[split], transforms[split],
                               bad_image_policy=bad_image_policy if split == "train" else "error",
                               class_names=names, mask_root=mask_root if mask_root is not None else root,
                               check_files=check_files, split=split)
            for split in SPLITS}
    return DataSplits(sets["train"], sets["val"], sets["test"], len(names), names, root, meta_root)


def check_decodable(dataset: WSOLDataset, *, threads: int = 4) -> None:
    """Decode every image of ``dataset`` once (in threads: PIL releases the GIL while decoding).

    Raises:
        DataError: the first unreadable image in the split's order, naming the file and the split.
    """
    def reason(index: int) -> str | None:
        path = dataset.image_path(index)
        try:
            load_rgb(path)
        except UNREADABLE_IMAGE_ERRORS as error:
            return describe_unreadable(path, error)
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for index, why in enumerate(pool.map(reason, range(len(dataset)))):
            if why is not None:
                raise DataError(f"{dataset.image_path(index)}: cannot read the image ({why}); every "
                                f"{dataset.split} image is scored by the protocol, so fix it or remove it "
                                "from the split's metadata (--bad-images applies to the train split only)")


def set_batch_sampler(dataset: WSOLDataset, *, sets_per_batch: int, set_size: int, seed: int,
                      replacement: bool = False, rank: int = 0, world_size: int = 1) -> SetBatchSampler:
    """The MinMaxCAM training sampler over ``dataset`` (errors name the data set's classes)."""
    return SetBatchSampler(dataset.labels, sets_per_batch, set_size, seed=seed, replacement=replacement,
                           rank=rank, world_size=world_size, class_names=dataset.classes)
