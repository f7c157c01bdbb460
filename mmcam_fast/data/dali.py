"""The DALI loader: GPU ("mixed") or CPU decoding, fed in the set sampler's order.

``DaliLoader`` has the torch ``Loader``'s interface (``loaders.py``): iterating yields ``(images [B, 3,
C, C], labels int64, indices int64)`` (and original sizes with ``return_sizes``), and ``set_epoch``,
``state_dict`` and ``load_state_dict`` behave the same way. DALI itself is optional: this module
imports without it, and ``dali_available()`` says whether it is installed.

How the order reaches DALI. A file reader would read in its own order; MinMaxCAM needs N classes x S
images per batch, in the ``SetBatchSampler``'s order. The loader therefore *plans* the batches (the
sampler's batches, or the evaluation order, plus each image's crop anchor and flips, drawn from
``(seed, rank, epoch, position)``) and writes them into a ring that the external source reads
(``dali_source.py``). DALI runs a few batches ahead of the consumer, so the plan is written ahead by
the same margin; at the end of an epoch the plan goes on with the next epoch from its start, which is
what the trainer asks for next, so consecutive epochs flow without a pause. When the consumer asks
for something else (another epoch, a resumed position, or a new pass after an epoch cut short), the
batches DALI already holds are run out and dropped (at most ``prefetch + source prefetch + 2``
batches), and planning restarts there. Every output batch is checked against its plan (indices), so
a loader out of step fails loudly instead of mislabelling images.

Bad files follow the torch backend's policy (``datasets.py``), with the torch backend's messages: a
file is unreadable exactly when PIL cannot read it (``dali_source.py``); ``error`` raises a
``DataError`` naming the file when its batch is loaded, ``skip`` substitutes the next readable image
of the same class, logs it once and counts it in ``dataset.bad_images``. Should DALI's decoder still
refuse a file (the pipeline then stops), the loader finds the file, decodes it with PIL from then on
(or applies the policy when PIL cannot read it either), rebuilds the pipeline and continues at the
same batch.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import os
import re
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcam_fast.data.dali_source import (
    NO_SUBSTITUTE,
    OK,
    RING_FIELDS,
    SUBSTITUTED,
    UNREADABLE,
    PathTable,
    PlanSource,
    encoded_for_dali,
    ring_path,
    unreadable_reason,
)
from mmcam_fast.data.dali_spec import TRAIN, TransformSpec, transform_spec
from mmcam_fast.data.datasets import WSOLDataset
from mmcam_fast.data.sampler import LoaderPosition, SetBatchSampler
from mmcam_fast.errors import ConfigError, DataError, MMCamError

log = logging.getLogger(__name__)

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "float32"}
_SAMPLE_IN_ERROR = re.compile(r"sample #(\d+)")


def dali_available() -> bool:
    """Whether NVIDIA DALI (``nvidia.dali``) is installed."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ModuleNotFoundError, ValueError):  # no ``nvidia`` package, or an import blocked on purpose
        return False


def default_decode_device() -> str:
    """``"mixed"`` (nvJPEG on the GPU) when CUDA is available, else ``"cpu"``."""
    return "mixed" if torch.cuda.is_available() else "cpu"


def unreadable_message(path: Any, reason: str) -> str:
    """The torch backend's message for an unreadable image under ``--bad-images error``."""
    return (f"{path}: cannot read the image ({reason}); fix or remove it, or pass --bad-images skip to "
            "replace unreadable images by others of their class")


def plan_augmentation(spec: TransformSpec, batch_size: int, *, seed: int, rank: int, epoch: int,
                      position: int) -> np.ndarray:
    """The augmentation of one batch, ``[B, 4]`` int64: crop anchor y and x in the ``R x R`` resized
    image, horizontal flip, vertical flip (zeros for an eval transform).

    A pure function of ``(seed, rank, epoch, position)``: the same for any number of threads or
    workers, and a resumed run continues with the same crops and flips.
    """
    params = np.zeros((batch_size, 4), dtype=np.int64)
    if spec.kind != TRAIN:
        return params
    rng = np.random.default_rng([seed, rank, epoch, position])
    params[:, 0:2] = rng.integers(0, spec.max_crop_offset + 1, size=(batch_size, 2))
    if spec.horizontal_flip:
        params[:, 2] = rng.integers(0, 2, size=batch_size)
    if spec.vertical_flip:
        params[:, 3] = rng.integers(0, 2, size=batch_size)
    return params


@dataclass
class _Batch:
    """One planned batch: where it is in which epoch, its images and their augmentation."""

    epoch: int
    position: int
    count: int  # valid samples (the last evaluation batch is padded to the batch size)
    rows: np.ndarray  # [B, RING_FIELDS]: index, crop_y, crop_x, hflip, vflip

    @property
    def indices(self) -> np.ndarray:
        return self.rows[:self.count, 0]


class DaliLoader(LoaderPosition):
    """Loads a ``WSOLDataset`` with a DALI pipeline (see the module docstring).

    Args:
        dataset: the data set; its torchvision transform says what the pipeline computes.
        batch_sampler: a ``SetBatchSampler`` (training); or give ``batch_size`` (evaluation).
        batch_size, shuffle, drop_last: for loaders without a batch sampler.
        seed: seeds the augmentation (and the order when ``shuffle``).
        workers: DALI's CPU threads, and its Python workers when ``parallel`` (``--workers``).
        decode_device: ``"mixed"`` (GPU) or ``"cpu"``; default: ``"mixed"`` when CUDA is available.
        parallel: read and screen the files in ``workers`` spawned processes (parallel external
            source); default: on with the GPU decoder and ``workers > 0``, where the per-file Python
            work would otherwise hold the GIL against the training loop at thousands of images per
            second; off for CPU decoding, where two spawned readers on a small machine compete with
            the decoding threads for the same cores (measured: no faster on 2 cores, and 1.6 to 17 s
            to start them, since each spawned process re-imports the main module).
        dtype: ``torch.float32``, ``torch.float16`` (both made by DALI) or ``torch.bfloat16`` (cast
            from float32 after DALI, which has no bfloat16).
        channels_last: images in channels-last memory (a ``[B, 3, C, C]`` tensor all the same).
        return_sizes: also yield the original ``(width, height)`` of every image, int64 ``[B, 2]``.
        rank, world_size: shard of an evaluation loader (every ``world_size``-th image from
            ``rank``); a batch sampler shards by itself.
        prefetch: batches DALI prepares ahead.
    """

    def __init__(self, dataset: WSOLDataset, *, batch_sampler: SetBatchSampler | None = None,
                 batch_size: int | None = None, shuffle: bool = False, drop_last: bool = False, seed: int = 0,
                 workers: int = 0, decode_device: str | None = None, parallel: bool | None = None,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False, return_sizes: bool = False,
                 rank: int = 0, world_size: int = 1, prefetch: int = 2) -> None:
        if not dali_available():
            raise ConfigError("--loader dali needs NVIDIA DALI: pip install -e '.[dali]' "
                              "(or use --loader torch)")
        if (batch_sampler is None) == (batch_size is None):
            raise ConfigError("build_loader needs exactly one of batch_sampler and batch_size")
        if workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {workers}")
        if dtype not in _DTYPES:
            raise ConfigError(f"the DALI loader makes float32, float16 or bfloat16 images, not {dtype}")
        decode_device = default_decode_device() if decode_device is None else decode_device
        if decode_device not in ("cpu", "mixed"):
            raise ConfigError(f"DALI decode device must be 'cpu' or 'mixed', got {decode_device!r}")
        if decode_device == "mixed" and not torch.cuda.is_available():
            raise ConfigError("DALI decode device 'mixed' needs a CUDA device; use 'cpu'")
        self.spec = transform_spec(dataset.transform)
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.workers = workers
        self.decode_device = decode_device
        self.parallel = (decode_device == "mixed" and workers > 0) if parallel is None else parallel
        self.dtype = dtype
        self.channels_last = channels_last
        self.return_sizes = return_sizes
        self.prefetch = prefetch
        self._source_prefetch = 2
        if batch_sampler is not None:
            self.batch_size = batch_sampler.batch_size
            self.steps_per_epoch = len(batch_sampler)
        else:
            assert batch_size is not None
            if batch_size < 1:
                raise ConfigError(f"batch size must be at least 1, got {batch_size}")
            if world_size < 1 or not 0 <= rank < world_size:
                raise ConfigError(f"rank {rank} is not in a world of size {world_size}")
            if world_size > 1 and shuffle:
                raise ConfigError("a sharded (world_size > 1) evaluation loader does not shuffle")
            self.batch_size = batch_size
            self._shuffle = shuffle
            shard = len(range(rank, len(dataset), world_size))
            self.steps_per_epoch = shard // batch_size if drop_last else math.ceil(shard / batch_size)
        # The plan ring: DALI may have scheduled up to `ahead` batches past the last one it returned.
        self._ahead = prefetch + (self._source_prefetch if self.parallel else 0) + 2
        self._slots = 2 * self._ahead + 2
        self._paths = PathTable(dataset.image_root, dataset.image_ids)
        self._ring_file: Path | None = None
        self._ring_finalizer: weakref.finalize | None = None
        self._ring: np.ndarray | None = None
        self._pipe: Any = None
        self._plan: Iterator[_Batch] | None = None
        self._inflight: deque[_Batch] = deque()
        self._written = self._produced = 0
        self._known_bad: set[int] = set()
        self._force_pil: set[int] = set()
        self._warned: set[int] = set()
        self.epoch = 0
        self.consumed = 0
        self.set_epoch(0)

    def __len__(self) -> int:
        return self.steps_per_epoch

    # -- the torch Loader's interface ------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.consumed = 0
        if self.batch_sampler is not None:
            self.batch_sampler.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        start = 0
        if self.batch_sampler is not None:
            start = self.batch_sampler.next_position  # where this pass starts (set by a resume)
            self.batch_sampler.set_epoch(self.epoch)  # a later pass starts at 0, as with torch
        self.consumed = start
        if start >= self.steps_per_epoch:
            return
        self._align(self.epoch, start)
        while self.consumed < self.steps_per_epoch:
            batch, outputs = self._next()
            result = self._to_torch(batch, outputs)
            self.consumed += 1
            yield result

    def close(self) -> None:
        """Stop the pipeline (and its worker processes) and remove the plan ring."""
        self._teardown()
        self._ring = None
        if self._ring_finalizer is not None:
            self._ring_finalizer()  # removes the file (once); also runs at exit if never called
        self._ring_file = self._ring_finalizer = None

    # -- planning ------------------------------------------------------------------------------

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[tuple[int, np.ndarray]]:
        if self.batch_sampler is not None:
            planner = copy.copy(self.batch_sampler)  # shares the read-only class tables
            planner.load_state_dict({**self.batch_sampler.state_dict(), "epoch": epoch, "position": start})
            for offset, rows in enumerate(planner):
                yield start + offset, np.asarray(rows, dtype=np.int64)
            return
        n = len(self.dataset)
        order = np.arange(n, dtype=np.int64)
        if self._shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        order = order[self.rank::self.world_size]
        for position in range(start, self.steps_per_epoch):
            yield position, order[position * self.batch_size:(position + 1) * self.batch_size]

    def _planned(self, epoch: int, start: int) -> Iterator[_Batch]:
        """The batches from (epoch, start) on, then the following epochs from their starts."""
        while True:
            for position, indices in self._epoch_batches(epoch, start):
                yield self._batch(epoch, position, indices)
            epoch, start = epoch + 1, 0

    def _batch(self, epoch: int, position: int, indices: np.ndarray) -> _Batch:
        b, count = self.batch_size, len(indices)
        rows = np.zeros((b, RING_FIELDS), dtype=np.int64)
        rows[:count, 0] = indices
        rows[count:, 0] = indices[-1]  # padding, decoded and dropped
        rows[:, 1:] = plan_augmentation(self.spec, b, seed=self.seed, rank=self.rank, epoch=epoch,
                                        position=position)
        return _Batch(epoch, position, count, rows)

    # -- running the pipeline -------------------------------------------------------------------

    def _build(self) -> None:
        from mmcam_fast.data.dali_pipeline import wsol_pipeline

        if self._ring_file is None:
            self._ring_file = ring_path()
            # Removed when the loader is collected or at interpreter exit, whichever comes first
            # (``__del__`` is not guaranteed to run at exit).
            self._ring_finalizer = weakref.finalize(self, _remove_file, self._ring_file)
        shape = (self._slots, self.batch_size, RING_FIELDS)
        self._ring = np.memmap(self._ring_file, dtype=np.int64, mode="w+", shape=shape)
        source = PlanSource(self._paths, self.dataset.labels, self._ring_file, self._slots, self.batch_size,
                            self.dataset.bad_image_policy, known_bad=self._known_bad,
                            force_pil=self._force_pil, augment=self.spec.kind == TRAIN)
        options: dict[str, Any] = {}
        if self.parallel:
            options = {"py_num_workers": max(1, self.workers), "py_start_method": "spawn"}
        device_id = torch.cuda.current_device() if self.decode_device == "mixed" else None
        self._pipe = wsol_pipeline(
            source=source, spec=self.spec, decode_device=self.decode_device, parallel=self.parallel,
            image_dtype=_DTYPES[self.dtype], channels_last=self.channels_last,
            source_prefetch=self._source_prefetch, batch_size=self.batch_size,
            num_threads=max(1, self.workers), device_id=device_id, prefetch_queue_depth=self.prefetch,
            seed=self.seed, **options)
        self._pipe.build()
        self._inflight.clear()
        self._written = self._produced = 0

    def _teardown(self) -> None:
        self._pipe = None  # DALI stops its threads and worker processes when the pipeline goes
        self._plan = None
        self._inflight.clear()
        self._written = self._produced = 0

    def _fill(self) -> None:
        assert self._plan is not None and self._ring is not None
        while self._written <= self._produced + self._ahead:
            batch = next(self._plan)
            self._ring[self._written % self._slots] = batch.rows
            self._inflight.append(batch)
            self._written += 1

    def _align(self, epoch: int, start: int) -> None:
        """Make the next batch out of the pipeline the batch ``start`` of ``epoch``."""
        if self._pipe is None:
            self._build()
            self._plan = self._planned(epoch, start)
            return
        if self._inflight and (self._inflight[0].epoch, self._inflight[0].position) == (epoch, start):
            return
        # DALI may already be working on every batch written so far: those come out first and are
        # dropped, while the ring goes on with the new plan.
        stale = len(self._inflight)
        self._plan = self._planned(epoch, start)
        try:
            for _ in range(stale):
                self._fill()
                self._pipe.run()
                self._inflight.popleft()
                self._produced += 1
        except RuntimeError:  # a file DALI refuses in a dropped batch: start afresh instead
            self._teardown()
            self._build()
            self._plan = self._planned(epoch, start)

    def _next(self) -> tuple[_Batch, Any]:
        while True:
            self._fill()
            try:
                outputs = self._pipe.run()
            except RuntimeError as error:
                self._recover(error)
                continue
            self._produced += 1
            return self._inflight.popleft(), outputs

    def _recover(self, error: RuntimeError) -> None:
        """DALI refused a file that passed the screen: find it, apply the policy, rebuild, go on."""
        head = self._inflight[0]
        message = " ".join(str(error).split())
        paths = [self.dataset.image_path(int(i)) for i in head.indices]
        unreadable = [(int(i), p, r) for i, p in zip(head.indices, paths, strict=True)
                      if (r := unreadable_reason(p)) is not None]
        if unreadable:
            if self.dataset.bad_image_policy != "skip":
                self.close()
                raise DataError(unreadable_message(unreadable[0][1], unreadable[0][2])) from None
            self._known_bad.update(i for i, _, _ in unreadable)
        else:
            from mmcam_fast.data.dali_pipeline import dali_decode_failures

            encoded = [encoded_for_dali(p) for p in paths]
            refused = [int(head.indices[k]) for k in dali_decode_failures(encoded)]
            refused = [i for i in refused if i not in self._force_pil]
            if not refused:
                self.close()
                listed = ", ".join(str(p) for p in paths[:5]) + (" ..." if len(paths) > 5 else "")
                raise MMCamError(f"the DALI pipeline failed on a batch of {listed} and no single file is "
                                 f"at fault: {message[:500]}") from None
            for index in refused:
                log.warning("%s: DALI's decoder refused the image, which PIL reads; decoding it with PIL "
                            "from now on", self.dataset.image_path(index))
            self._force_pil.update(refused)
        self._teardown()
        self._build()
        self._plan = self._planned(head.epoch, head.position)

    # -- outputs ---------------------------------------------------------------------------------

    def _check(self, batch: _Batch, indices: np.ndarray, status: np.ndarray) -> None:
        planned = batch.indices
        for j in np.flatnonzero(status != OK).tolist():
            path = self.dataset.image_path(int(planned[j]))
            if status[j] == UNREADABLE:
                self.close()
                raise DataError(unreadable_message(path, unreadable_reason(path) or "unreadable"))
            if status[j] == NO_SUBSTITUTE:
                label = self.dataset.labels[int(planned[j])]
                classes = self.dataset.classes
                name = f" ({classes[label]})" if classes and label < len(classes) else ""
                self.close()
                raise DataError(f"{path}: cannot read the image ({unreadable_reason(path)}), and no image of "
                                f"its class {label}{name} is readable, so --bad-images skip has nothing to "
                                "substitute")
            if status[j] == SUBSTITUTED:
                self.dataset._bad_count.add()  # the data set's count of substitutions
                if int(planned[j]) not in self._warned:
                    self._warned.add(int(planned[j]))
                    log.warning("%s: cannot read the image (%s); using %s of the same class instead "
                                "(--bad-images skip)", path, unreadable_reason(path),
                                self.dataset.image_path(int(indices[j])))
        ok = status == OK
        if not np.array_equal(indices[ok], planned[ok]):
            self.close()
            raise MMCamError(f"DALI loader out of step at epoch {batch.epoch} batch {batch.position}: "
                             f"planned {planned[ok][:8].tolist()}, got {indices[ok][:8].tolist()}")

    def _to_torch(self, batch: _Batch, outputs: Any) -> tuple[torch.Tensor, ...]:
        images, labels, indices, sizes, status = outputs
        count = batch.count
        status_np = np.array(status.as_tensor()).reshape(-1)[:count]
        indices_np = np.array(indices.as_tensor()).reshape(-1)[:count]
        self._check(batch, indices_np, status_np)
        images_t = _images_to_torch(images, self.dtype)[:count]
        if self.channels_last:  # HWC from DALI: the [B, 3, C, C] view is channels-last memory
            images_t = images_t.permute(0, 3, 1, 2)
        if self.dtype == torch.bfloat16:
            images_t = images_t.to(torch.bfloat16)
        result = (images_t, torch.from_numpy(np.array(labels.as_tensor()).reshape(-1)[:count]),
                  torch.from_numpy(indices_np.copy()))
        if self.return_sizes:
            shapes = np.array(sizes.as_tensor()).reshape(-1, 3)[:count]  # [H, W, C] of the files
            result += (torch.from_numpy(np.ascontiguousarray(shapes[:, 1::-1]).astype(np.int64)),)
        return result


def _remove_file(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _images_to_torch(images: Any, dtype: torch.dtype) -> torch.Tensor:
    """A DALI batch of uniform shape as a new torch tensor (on the GPU for GPU outputs)."""
    from nvidia.dali.backend import TensorListGPU

    tensor = images.as_tensor()
    if isinstance(images, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(tensor.shape(), dtype=torch.float16 if dtype == torch.float16 else torch.float32,
                          device=torch.device("cuda", torch.cuda.current_device()))
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(tensor))


def build_dali_loader(dataset: WSOLDataset, **options: Any) -> tuple[DaliLoader, int]:
    """``(DaliLoader(dataset, **options), steps_per_epoch)``, the shape ``build_loader`` returns."""
    loader = DaliLoader(dataset, **options)
    return loader, loader.steps_per_epoch


def dali_supports(dataset: Any) -> bool:
    """Whether ``--loader auto`` may use DALI for ``dataset``: DALI is installed, the data set is image
    files on disk (a ``WSOLDataset``) and its transform is one the DALI pipeline implements."""
    if not dali_available() or not isinstance(dataset, WSOLDataset):
        return False
    try:
        transform_spec(dataset.transform)
    except ConfigError:
        return False
    return True

