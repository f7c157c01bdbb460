"""A data set in the WSOL metadata format: images under an image root, labels and boxes or masks.

Unreadable images (an empty file, a truncated JPEG, a file that is not an image) are found when they
are loaded, not at construction: decoding every image up front would take hours on ImageNet, while a
listing check (every id has a file) is cheap and is done at construction. At load time the policy
decides:

* ``"error"`` (default): a ``DataError`` naming the file and the reason. Inside a DataLoader worker it
  reaches the main process as that same error with its message (see ``loaders.py``).
* ``"skip"``: the image is replaced by the next readable image *of the same class* (in the data set's
  order, wrapping around), so a set of the set-structured batch keeps one class. The returned index
  is the substitute's, so anything keyed by the index (image id, boxes) describes the pixels that
  were returned. Each substitution is logged once per file and process and counted in
  ``bad_images``, which sums over DataLoader worker processes. Evaluation should run with ``"error"``:
  the protocol scores every test image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, get_worker_info

from mmcam_fast.data.images import (
    UNREADABLE_IMAGE_ERRORS,
    describe_unreadable,
    image_size,
    load_rgb,
    missing_files,
)
from mmcam_fast.data.metadata import WSOLMetadata
from mmcam_fast.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
_MAX_LISTED = 5


class _SharedCounter:
    """A count kept together by a process and its DataLoader workers, whatever their start method.

    The slots live in shared memory (torch shares them with workers started by fork, spawn or
    forkserver). Each process adds to its own slot (worker id + 1; 0 outside workers), so no lock is
    needed; the value is the sum. Pickled outside a worker start, it carries a copy.
    """

    _SLOTS = 257

    def __init__(self) -> None:
        self._slots = torch.zeros(self._SLOTS, dtype=torch.int64).share_memory_()

    def add(self, amount: int = 1) -> None:
        worker = get_worker_info()
        slot = 0 if worker is None else 1 + worker.id % (self._SLOTS - 1)
        self._slots[slot] += amount

    @property
    def value(self) -> int:
        return int(self._slots.sum())


def _listed(paths: Sequence[str]) -> str:
    more = f" (and {len(paths) - _MAX_LISTED} more)" if len(paths) > _MAX_LISTED else ""
    return ", ".join(str(p) for p in paths[:_MAX_LISTED]) + more


class WSOLDataset(Dataset):
    """Images and labels of one split; items are ``(image tensor, label, index)``.

    Args:
        image_root: the folder image ids are relative to (``--data-root``).
        metadata: the split's metadata (``load_metadata``).
        transform: maps a PIL RGB image to a tensor (``transforms.train_transform`` / ``eval_transform``).
        bad_image_policy: ``"error"`` or ``"skip"`` (``--bad-images``), see the module docstring.
        class_names: the name of every class label, when known.
        mask_root: the folder mask paths are relative to (mask data sets); default ``image_root``.
        check_files: check at construction that every image (and mask) file exists.
        split: the split's name (``train``, ``val``, ``test``), for messages; ``--bad-images skip``
            applies to the train split only.

    Raises:
        DataError: the image root does not exist, or images or masks listed in the metadata are
            missing (the first few are named).
        ConfigError: an unknown ``bad_image_policy``.
    """

    def __init__(self, image_root: str | Path, metadata: WSOLMetadata,
                 transform: Callable[[Any], torch.Tensor], *, bad_image_policy: str = "error",
                 class_names: Sequence[str] | None = None, mask_root: str | Path | None = None,
                 check_files: bool = True, split: str = "train") -> None:
        if bad_image_policy not in BAD_IMAGE_POLICIES:
            raise ConfigError(f"--bad-images must be one of {', '.join(BAD_IMAGE_POLICIES)}, "
                              f"got {bad_image_policy!r}")
        self.image_root = Path(image_root)
        self.mask_root = Path(mask_root) if mask_root is not None else self.image_root
        self.metadata = metadata
        self.transform = transform
        self.bad_image_policy = bad_image_policy
        self.split = split
        # only the train split may substitute unreadable images (--bad-images skip)
        self.skippable = split == "train"
        self.classes = list(class_names) if class_names is not None else None
        self.image_ids = list(metadata.image_ids)
        self.labels = [metadata.labels[i] for i in self.image_ids]
        if not self.image_root.is_dir():
            raise DataError(f"{self.image_root}: image folder does not exist (check --data-root)")
        if check_files:
            self._check_files()
        self._bad_count = _SharedCounter()
        self._known_bad: dict[int, str] = {}  # index -> why it is unreadable (this process)
        self._warned: set[int] = set()
        self._class_members: dict[int, list[int]] | None = None
        self._sizes: dict[int, tuple[int, int]] = {}

    def _check_files(self) -> None:
        missing = missing_files(self.image_root, self.image_ids)
        if missing:
            raise DataError(f"{len(missing)} of {len(self.image_ids)} image(s) listed in "
                            f"{self.metadata.folder / 'image_ids.txt'} are missing under {self.image_root} "
                            f"(check --data-root): {_listed([str(self.image_root / m) for m in missing])}")
        if self.metadata.has_masks:
            masks = [m for i in self.image_ids for m in self.metadata.mask_paths.get(i, [])]
            masks += [p for p in self.metadata.ignore_paths.values() if p]
            missing = missing_files(self.mask_root, masks)
            if missing:
                raise DataError(f"{len(missing)} mask file(s) listed in "
                                f"{self.metadata.folder / 'localization.txt'} are missing under "
                                f"{self.mask_root}: {_listed([str(self.mask_root / m) for m in missing])}")

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return len(self.classes)
        return max(self.labels) + 1

    @property
    def bad_images(self) -> int:
        """Images substituted under the "skip" policy so far, in this process and its workers."""
        return self._bad_count.value

    def image_id(self, index: int) -> str:
        return self.image_ids[index]

    def image_path(self, index: int) -> Path:
        return self.image_root / self.image_ids[index]

    def original_size(self, index: int) -> tuple[int, int]:
        """(width, height) of the original image: from the metadata, else from the file header."""
        image_id = self.image_ids[index]
        if image_id in self.metadata.sizes:
            return self.metadata.sizes[image_id]
        if index not in self._sizes:
            self._sizes[index] = image_size(self.image_path(index))
        return self._sizes[index]

    def boxes(self, index: int) -> list[tuple[int, int, int, int]]:
        """Ground-truth boxes (x0, y0, x1, y1), inclusive pixel coordinates, original scale."""
        return list(self.metadata.boxes.get(self.image_ids[index], []))

    def mask_paths(self, index: int) -> tuple[list[Path], Path | None]:
        """Instance-mask files and the ignore-mask file (None when not given) of a mask data set."""
        image_id = self.image_ids[index]
        masks = [self.mask_root / m for m in self.metadata.mask_paths.get(image_id, [])]
        ignore = self.metadata.ignore_paths.get(image_id, "")
        return masks, (self.mask_root / ignore if ignore else None)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        index = int(index)
        label = self.labels[index]
        if index not in self._known_bad:  # an image found unreadable once is not retried
            path = self.image_path(index)
            try:
                return self.transform(load_rgb(path)), label, index
            except UNREADABLE_IMAGE_ERRORS as error:
                reason = describe_unreadable(path, error)
                if self.bad_image_policy == "error" and not self.skippable:
                    raise DataError(f"{path}: cannot read the image ({reason}); every {self.split} image "
                                    "is scored by the protocol, so fix it or remove it from the split's "
                                    "metadata (--bad-images applies to the train split only)") from None
                if self.bad_image_policy == "error":
                    raise DataError(f"{path}: cannot read the image ({reason}); fix or remove it, or pass "
                                    "--bad-images skip to replace unreadable images by others of their "
                                    "class") from None
                self._known_bad[index] = reason
        substitute, image = self._substitute(index)
        return self.transform(image), label, substitute

    def _substitute(self, index: int) -> tuple[int, Any]:
        """The next readable image of the same class after ``index`` (wrapping around)."""
        if self._class_members is None:
            members: dict[int, list[int]] = {}
            for i, label in enumerate(self.labels):
                members.setdefault(label, []).append(i)
            self._class_members = members
        label = self.labels[index]
        group = self._class_members[label]
        start = group.index(index)
        path = self.image_path(index)
        for other in group[start + 1:] + group[:start]:
            if other in self._known_bad:
                continue
            try:
                image = load_rgb(self.image_path(other))
            except UNREADABLE_IMAGE_ERRORS as error:
                self._known_bad[other] = describe_unreadable(self.image_path(other), error)
                continue
            self._bad_count.add()
            if index not in self._warned:
                self._warned.add(index)
                log.warning("%s: cannot read the image (%s); using %s of the same class instead "
                            "(--bad-images skip)", path, self._known_bad[index], self.image_path(other))
            return other, image
        name = f" ({self.classes[label]})" if self.classes and label < len(self.classes) else ""
        raise DataError(f"{path}: cannot read the image ({self._known_bad[index]}), and no image of its "
                        f"class {label}{name} is readable, so --bad-images skip has nothing to substitute")
