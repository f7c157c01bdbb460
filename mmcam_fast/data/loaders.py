"""From a data set to a loader (the data sets of a ``--data`` name: :mod:`mmcam_fast.data.splits`).

``build_loader(dataset, ...)`` returns ``(loader, steps_per_epoch)`` behind a backend-neutral interface
(``--loader``): ``torch`` (``DataLoader`` + PIL + torchvision transforms), ``dali`` (NVIDIA DALI, GPU
decoding with a CPU fallback, ``dali.py``) or ``auto`` (DALI when it is installed and the data set is
image files with the protocol's transforms, else torch). Batches are ``(images, labels, indices)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mmcam_fast.data.datasets import WSOLDataset
from mmcam_fast.data.sampler import LoaderPosition, SetBatchSampler
from mmcam_fast.errors import ConfigError, MMCamError

BACKENDS = ("auto", "dali", "torch")


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
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 return_sizes: bool = False, rank: int = 0, world_size: int = 1,
                 decode_device: str | None = None, parallel: bool | None = None) -> tuple[Any, int]:
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
        dtype: the images' dtype (float32, float16 or bfloat16).
        channels_last: images in channels-last memory (still ``[B, 3, C, C]`` tensors).
        return_sizes: yield a fourth tensor, the original ``(width, height)`` of each image, int64.
        rank, world_size: shard of a ``batch_size`` loader (every ``world_size``-th image from
            ``rank``); a ``SetBatchSampler`` shards by itself.
        decode_device, parallel: DALI only (``dali.DaliLoader``): ``"mixed"`` (GPU) or ``"cpu"``
            decoding, and a parallel external source (default: DALI's choice for the machine).

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
                               "pin_memory": torch.cuda.is_available()}
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
