"""The DALI pipeline's external source: image files in the order the loader plans, bytes screened.

The loader decides the order (the ``SetBatchSampler``'s batches, or the evaluation order) and the
augmentation parameters of every batch, and writes them into a *plan ring*: a small file-backed
array ``[slots, batch, 5]`` of ``(index, crop_y, crop_x, hflip, vflip)``. DALI calls the source once
per sample with the sample's batch number (``iteration``) and position in the batch; the source reads
its row of the ring, reads the file and returns the encoded bytes with the label and the index. The
source holds no order of its own, so it runs unchanged in DALI's worker processes (parallel external
source, spawn) or in the loader's process, and the ring is shared through the file's pages.

Bad files follow the torch backend's definition: **a file is readable exactly when PIL reads it**.
DALI decodes a file itself only when its bytes are a complete 8-bit JPEG (baseline or progressive; 1,
3 or 4 components) or PNG (bit depth up to 8, or 16-bit gray), under PIL's decompression-bomb limit:
for those, DALI's decoder (libjpeg-turbo / libpng through nvImageCodec) gives PIL's pixels exactly
(tested). Everything else (empty files, unknown headers, a JPEG without its end marker, GIF, TIFF,
...) goes through ``images.load_rgb`` here, as in the torch backend; what PIL reads is handed to DALI
as an uncompressed PPM, what it cannot read is unreadable, with PIL's reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmcam_fast.data.images import UNREADABLE_IMAGE_ERRORS, describe_unreadable, load_rgb

RING_FIELDS = 5  # index, crop_y, crop_x, hflip, vflip

# Per-sample status returned with every image.
OK, UNREADABLE, SUBSTITUTED, NO_SUBSTITUTE = 0, 1, 2, 3

_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
_TRAILING = b"\x00\t\n\r "
# Baseline, extended sequential and progressive Huffman JPEG: what PIL and DALI decode alike.
_JPEG_SOF = {0xC0, 0xC1, 0xC2}
_JPEG_OTHER_SOF = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01} | set(range(0xD0, 0xD8))
# A 1x1 black image, the stand-in for an unreadable file (the loader raises before it is used).
PLACEHOLDER = np.frombuffer(b"P6\n1 1\n255\n\x00\x00\x00", dtype=np.uint8)


def _pixel_limit() -> float:
    # PIL refuses images above twice MAX_IMAGE_PIXELS (DecompressionBombError); so must DALI's path.
    limit = Image.MAX_IMAGE_PIXELS
    return float("inf") if limit is None else 2.0 * limit


def _content_end(view: memoryview) -> int:
    end = len(view)
    while end > 0 and view[end - 1] in _TRAILING:
        end -= 1
    return end


def _jpeg_ok(view: memoryview) -> bool:
    end = _content_end(view)
    if end < 4 or bytes(view[end - 2:end]) != _JPEG_EOI:
        return False  # truncated (or followed by data): PIL decides
    i = 2
    while i + 4 <= end:
        if view[i] != 0xFF:
            return False
        marker = view[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        length = (view[i + 2] << 8) | view[i + 3]
        if marker in _JPEG_SOF:
            if i + 10 > end:
                return False
            precision = view[i + 4]
            height = (view[i + 5] << 8) | view[i + 6]
            width = (view[i + 7] << 8) | view[i + 8]
            components = view[i + 9]
            return (precision == 8 and components in (1, 3, 4) and width > 0 and height > 0
                    and width * height <= _pixel_limit())
        if marker in _JPEG_OTHER_SOF or marker == 0xDA:  # lossless / arithmetic, or scan before a frame
            return False
        i += 2 + length
    return False


def _png_ok(view: memoryview) -> bool:
    end = _content_end(view)
    if end < 33 or bytes(view[end - 8:end]) != _PNG_IEND or bytes(view[12:16]) != b"IHDR":
        return False
    width = int.from_bytes(view[16:20], "big")
    height = int.from_bytes(view[20:24], "big")
    depth, color_type = view[24], view[25]
    # 16-bit colour: PIL keeps the high byte, DALI rescales; 16-bit gray agrees (both divide by 257).
    depth_ok = depth <= 8 or (depth == 16 and color_type == 0)
    return depth_ok and width > 0 and height > 0 and width * height <= _pixel_limit()


def dali_decodes_as_pil(data: np.ndarray) -> bool:
    """Whether DALI may decode these encoded bytes itself and give PIL's RGB pixels.

    A cheap header and tail check (no decoding): a complete 8-bit JPEG or PNG of a supported kind.
    ``False`` means the file must go through PIL (it may still be perfectly readable).
    """
    view = memoryview(data).cast("B")
    head = bytes(view[:8])
    if head.startswith(_JPEG_SOI):
        return _jpeg_ok(view)
    if head == _PNG_SIGNATURE:
        return _png_ok(view)
    return False


def ppm_bytes(image: Image.Image) -> np.ndarray:
    """An RGB PIL image as an uncompressed binary PPM, which DALI decodes losslessly."""
    pixels = np.asarray(image, dtype=np.uint8)
    height, width = pixels.shape[:2]
    header = f"P6\n{width} {height}\n255\n".encode()
    return np.frombuffer(header + pixels.tobytes(), dtype=np.uint8)


def encoded_for_dali(path: str | Path) -> np.ndarray:
    """The bytes to hand to DALI's decoder for ``path``: the file itself, or PIL's pixels as PPM.

    Raises:
        One of ``images.UNREADABLE_IMAGE_ERRORS`` when PIL cannot read the file either.
    """
    data = np.fromfile(path, dtype=np.uint8)
    if data.size and dali_decodes_as_pil(data):
        return data
    return ppm_bytes(load_rgb(path))


def unreadable_reason(path: str | Path) -> str | None:
    """Why PIL cannot read ``path`` (the torch backend's wording), or None when it can.

    A full decode, for error paths only: the screen is not consulted, so this is the torch backend's
    definition of an unreadable file even for a file that DALI's decoder met.
    """
    try:
        load_rgb(path)
    except UNREADABLE_IMAGE_ERRORS as error:
        return describe_unreadable(path, error)
    return None


class PathTable:
    """Image paths packed into one byte buffer: cheap to pickle into worker processes (ImageNet's
    1.28 million ids as a list of strings would be copied object by object)."""

    def __init__(self, root: str | Path, relative_paths: Sequence[str]) -> None:
        encoded = [p.encode() for p in relative_paths]
        self.root = os.fspath(root)
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, stop = self.offsets[index], self.offsets[index + 1]
        return os.path.join(self.root, self.blob[start:stop].tobytes().decode())


def ring_path(directory: str | Path | None = None) -> Path:
    """A fresh file name for a plan ring, in shared memory when the system has it."""
    import tempfile

    if directory is None:
        shm = Path("/dev/shm")
        directory = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    handle, name = tempfile.mkstemp(prefix="mmcam-dali-plan-", suffix=".bin", dir=directory)
    os.close(handle)
    return Path(name)


class PlanSource:
    """The per-sample callback of ``fn.external_source`` (see the module docstring).

    Returns, per sample: encoded bytes (uint8), label (int64 [1]), index (int64 [1]), status (int32
    [1]: ``OK``, ``UNREADABLE`` (error policy; the index is the planned one), ``SUBSTITUTED`` (skip
    policy; the index is the substitute's) or ``NO_SUBSTITUTE`` (skip policy, no readable image in
    the class)) and, with ``augment``, the augmentation (int32 [4]: crop y, crop x, horizontal flip,
    vertical flip).

    Args:
        paths: the data set's image paths.
        labels: the class of every index.
        ring_file, slots, batch_size: the plan ring this source reads.
        policy: ``"error"`` or ``"skip"`` (``--bad-images``).
        known_bad: indices already found unreadable (passed again when a pipeline is rebuilt).
        force_pil: indices PIL reads but DALI's decoder refused: decoded with PIL from then on.
        augment: also return the augmentation parameters (train transform).
    """

    def __init__(self, paths: PathTable, labels: Sequence[int], ring_file: str | Path, slots: int,
                 batch_size: int, policy: str, known_bad: Iterable[int] = (),
                 force_pil: Iterable[int] = (), augment: bool = False) -> None:
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ring_file = os.fspath(ring_file)
        self.shape = (slots, batch_size, RING_FIELDS)
        self.policy = policy
        self.known_bad = {int(i) for i in known_bad}
        self.force_pil = {int(i) for i in force_pil}
        self.augment = augment
        self._ring: np.ndarray | None = None
        self._members: dict[int, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ring"] = None  # each process maps the file itself
        state["_members"] = None
        return state

    def _row(self, iteration: int, position: int) -> np.ndarray:
        if self._ring is None:
            self._ring = np.memmap(self.ring_file, dtype=np.int64, mode="r", shape=self.shape)
        return np.array(self._ring[iteration % self.shape[0], position])

    def _encoded(self, index: int) -> np.ndarray | None:
        if index in self.known_bad:
            return None
        try:
            if index in self.force_pil:
                return ppm_bytes(load_rgb(self.paths[index]))
            return encoded_for_dali(self.paths[index])
        except UNREADABLE_IMAGE_ERRORS:
            self.known_bad.add(index)
            return None

    def _substitute(self, index: int) -> tuple[int, np.ndarray] | None:
        """The next readable image of the same class after ``index``, wrapping around (the torch
        backend's rule, so both backends substitute the same image)."""
        if self._members is None:
            order = np.argsort(self.labels, kind="stable")
            classes, starts = np.unique(self.labels[order], return_index=True)
            bounds = list(starts[1:]) + [len(order)]
            self._members = {int(c): order[s:e] for c, s, e in zip(classes, starts, bounds, strict=True)}
        group = self._members[int(self.labels[index])]
        start = int(np.searchsorted(group, index))
        for other in np.concatenate([group[start + 1:], group[:start]]).tolist():
            encoded = self._encoded(other)
            if encoded is not None:
                return other, encoded
        return None

    def __call__(self, sample_info: Any) -> tuple[np.ndarray, ...]:
        row = self._row(sample_info.iteration, sample_info.idx_in_batch)
        index = int(row[0])
        status = OK
        encoded = self._encoded(index)
        if encoded is None:
            if self.policy == "skip":
                found = self._substitute(index)
                if found is None:
                    status, encoded = NO_SUBSTITUTE, PLACEHOLDER
                else:
                    status, (index, encoded) = SUBSTITUTED, found
            else:
                status, encoded = UNREADABLE, PLACEHOLDER
        outputs = (encoded, np.array([self.labels[index]], np.int64), np.array([index], np.int64),
                   np.array([status], np.int32))
        if self.augment:
            outputs += (row[1:].astype(np.int32),)
        return outputs
