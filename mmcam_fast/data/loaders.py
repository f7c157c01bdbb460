"""From a ``--data`` name to data sets, and from a data set to a loader.

``build_datasets(data, data_root, ...)`` knows where each data set keeps its images and metadata:

==============  =========================================================================================
``--data``      ``--data-root`` and metadata
==============  =========================================================================================
synthetic       generated on first use into ``--data-root`` (default ``runs/data/synthetic``), then reused
                as it is (a folder made by ``prepare synthetic`` keeps its own sizes; never rewritten)
tiny-imagenet   a folder made by ``python -m mmcam_fast.data.prepare tiny-imagenet``; or the raw Tiny
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

``build_loader(dataset, ...)`` returns ``(loader, steps_per_epoch)`` behind a backend-neutral interface
(``--loader``): ``torch`` (``DataLoader`` + PIL + torchvision transforms), ``dali`` (NVIDIA DALI, GPU
decoding with a CPU fallback, ``dali.py``) or ``auto`` (DALI when it is installed and the data set is
image files with the protocol's transforms, else torch). Batches are ``(images, labels, indices)``.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mmcam_fast.data.catalogue import BENCHMARK_FOLDERS, DATA_NAMES
from mmcam_fast.data.converters import ensure_prepared
from mmcam_fast.data.datasets import WSOLDataset
from mmcam_fast.data.images import UNREADABLE_IMAGE_ERRORS, describe_unreadable, load_rgb
from mmcam_fast.data.manifest import CLASSES_FILE, read_class_names, read_manifest
from mmcam_fast.data.metadata import WSOLMetadata, load_metadata
from mmcam_fast.data.sampler import LoaderPosition, SetBatchSampler
from mmcam_fast.data.synthetic import make_synthetic, synthetic_parameters
from mmcam_fast.data.transforms import eval_transform, train_transform
from mmcam_fast.errors import ConfigError, DataError, MMCamError

BACKENDS = ("auto", "dali", "torch")
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
    raise DataError(f"{root}: neither a folder made by `python -m mmcam_fast.data.prepare {data}` (no "
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


# -- loaders ---------------------------------------------------------------------------------------

_WORKER_ERROR_LINE = re.compile(r"^[\w.]*?(\w+Error): (.*)$")


def _clean_worker_error(error: MMCamError) -> MMCamError:
    """torch re-raises a worker's exception with the worker's traceback in the message; keep the
    original one-line message, which names the file at fault."""
    text = str(error)
    if not text.startswith("Caught "):
        return error
    for line in reversed(text.strip().splitlines()):
        match = _WORKER_ERROR_LINE.match(line.strip())
        if match and match.group(1) == type(error).__name__:
            return type(error)(match.group(2))
    return error


def _stop_workers(iterator: Any) -> None:
    """Stop a failed torch iterator's workers now. Left to the garbage collector, the exception's
    traceback keeps the iterator alive and its workers are joined later with a 5 s timeout each."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class Loader(LoaderPosition):
    """A data loader with the interface every backend provides.

    Iterating yields ``(images [B, 3, C, C] float32, labels [B] int64, indices [B] int64)``.
    ``set_epoch`` selects the epoch (the sampler's class draw and the workers' augmentation seeds);
    ``state_dict`` records the batches actually consumed, so a resumed run continues the sequence.
    """

    def __init__(self, loader: DataLoader, steps_per_epoch: int, *, seed: int,
                 batch_sampler: SetBatchSampler | None, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 return_sizes: bool = False) -> None:
        self._loader = loader
        self.steps_per_epoch = steps_per_epoch
        self.batch_sampler = batch_sampler
        self._seed = seed
        self._generator = generator
        self._dtype = dtype
        self._channels_last = channels_last
        self._return_sizes = return_sizes
        self.epoch = 0
        self.consumed = 0
        self.set_epoch(0)

    @property
    def dataset(self) -> WSOLDataset:
        return self._loader.dataset  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.consumed = 0
        # Workers seed their RNGs from this generator at each iteration: fixing it per epoch makes an
        # epoch's augmentations a function of (seed, epoch, number of workers).
        seed = np.random.SeedSequence([self._seed, self.epoch]).generate_state(1, np.uint64)[0]
        self._generator.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        if self.batch_sampler is not None:
            self.batch_sampler.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.batch_sampler is not None:
            self.consumed = self.batch_sampler.next_position  # where this pass starts
        iterator = iter(self._loader)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except MMCamError as error:
                _stop_workers(iterator)
                raise _clean_worker_error(error) from None
            except Exception:
                _stop_workers(iterator)
                raise
            self.consumed += 1
            yield self._finish(batch)

    def _finish(self, batch: Any) -> tuple[torch.Tensor, ...]:
        images, labels, indices = batch
        if self._channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if images.dtype != self._dtype:
            images = images.to(self._dtype)
        if not self._return_sizes:
            return images, labels, indices
        sizes = torch.tensor([self.dataset.original_size(int(i)) for i in indices], dtype=torch.int64)
        return images, labels, indices, sizes.reshape(-1, 2)


def resolve_backend(backend: str, dataset: Any) -> str:
    """The backend ``--loader`` selects for ``dataset``: ``auto`` becomes ``dali`` when DALI is installed and
    the data set is image files with the protocol's transforms, else ``torch``.

    Raises:
        ConfigError: an unknown backend.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown loader backend {backend!r} (--loader); valid: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    from mmcam_fast.data.dali import dali_supports

    return "dali" if dali_supports(dataset) else "torch"


def build_loader(dataset: WSOLDataset, *, batch_sampler: SetBatchSampler | None = None,
                 batch_size: int | None = None, workers: int = 0, backend: str = "torch",
                 shuffle: bool = False, drop_last: bool = False, seed: int = 0,
                 pin_memory: bool | None = None, prefetch_factor: int | None = None,
                 persistent_workers: bool = False, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, return_sizes: bool = False, rank: int = 0,
                 world_size: int = 1, decode_device: str | None = None,
                 parallel: bool | None = None) -> tuple[Any, int]:
    """A loader over ``dataset`` and its number of steps per epoch.

    Args:
        dataset: the data set.
        batch_sampler: a ``SetBatchSampler`` for training; or give ``batch_size`` (evaluation).
        batch_size: images per batch when there is no ``batch_sampler``.
        workers: loader worker processes (``--workers``); 0 loads in the calling process. With DALI:
            its CPU threads (at least one), and its Python workers when ``parallel``.
        backend: ``"torch"``, ``"dali"`` or ``"auto"`` (``--loader``, see ``resolve_backend``).
        shuffle, drop_last: for ``batch_size`` loaders.
        seed: seeds the augmentation (and the order when ``shuffle``).
        pin_memory: default: when CUDA is available (torch backend).
        prefetch_factor, persistent_workers: passed to the ``DataLoader`` when ``workers > 0``.
        dtype: the images' dtype (float32, float16 or bfloat16).
        channels_last: images in channels-last memory (still ``[B, 3, C, C]`` tensors).
        return_sizes: yield a fourth tensor, the original ``(width, height)`` of each image, int64.
        rank, world_size: shard of a ``batch_size`` loader (every ``world_size``-th image from
            ``rank``); a ``SetBatchSampler`` shards by itself.
        decode_device, parallel: DALI only (``dali.DaliLoader``): ``"mixed"`` (GPU) or ``"cpu"``
            decoding, and a parallel external source.

    Returns:
        ``(loader, steps_per_epoch)``; the loader is a ``Loader`` or a ``dali.DaliLoader``.

    Raises:
        ConfigError: an unknown or unavailable backend, or neither/both of batch_sampler and batch_size.
    """
    backend = resolve_backend(backend, dataset)
    if (batch_sampler is None) == (batch_size is None):
        raise ConfigError("build_loader needs exactly one of batch_sampler and batch_size")
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in a world of size {world_size}")
    if backend == "dali":
        from mmcam_fast.data.dali import build_dali_loader

        return build_dali_loader(dataset, batch_sampler=batch_sampler, batch_size=batch_size,
                                 shuffle=shuffle, drop_last=drop_last, seed=seed, workers=workers,
                                 decode_device=decode_device, parallel=parallel, dtype=dtype,
                                 channels_last=channels_last, return_sizes=return_sizes, rank=rank,
                                 world_size=world_size)
    generator = torch.Generator()
    options: dict[str, Any] = {"num_workers": workers, "generator": generator,
                               "pin_memory": torch.cuda.is_available() if pin_memory is None else pin_memory}
    if workers > 0:
        options["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            options["prefetch_factor"] = prefetch_factor
    if batch_sampler is not None:
        loader = DataLoader(dataset, batch_sampler=batch_sampler, **options)
        steps = len(batch_sampler)
    else:
        assert batch_size is not None
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        if world_size > 1:
            if shuffle:
                raise ConfigError("a sharded (world_size > 1) evaluation loader does not shuffle")
            shard = range(rank, len(dataset), world_size)
            loader = DataLoader(dataset, batch_size=batch_size, sampler=shard, drop_last=drop_last, **options)
        else:
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                **options)
        size = len(range(rank, len(dataset), world_size))
        steps = size // batch_size if drop_last else math.ceil(size / batch_size)
    return Loader(loader, steps, seed=seed, batch_sampler=batch_sampler, generator=generator, dtype=dtype,
                  channels_last=channels_last, return_sizes=return_sizes), steps
