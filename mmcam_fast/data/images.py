"""Reading image files as 8-bit RGB, and checking that image files exist, cheaply.

Images are opened with PIL and decoded at once, so a truncated file fails when it is read, not later
inside a transform. Every mode PIL reads becomes RGB the way the evaluation protocol's loader does it
(``Image.convert("RGB")``), with two exceptions where that conversion is wrong: palette images with a
transparent colour go through RGBA first (PIL warns and may pick the wrong colour otherwise), and
16-bit grayscale is scaled to 8 bits (``convert`` would clip it to white). Alpha is dropped, not
composited, as in the protocol. EXIF orientation is not applied: box coordinates and image sizes in
the metadata refer to the stored pixel grid.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from mmcam_fast.errors import DataError

# What PIL raises for files that are not images, are truncated or are damaged.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error,
                           Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "PA" or (mode == "P" and "transparency" in image.info):
        return image.convert("RGBA").convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0  # 16-bit range onto 8 bits
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Open, fully decode and convert one image file to RGB.

    Raises:
        One of ``UNREADABLE_IMAGE_ERRORS`` for a missing, empty, truncated or non-image file.
    """
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def read_rgb(path: str | Path, what: str | None = None, hint: str = "") -> Image.Image:
    """:func:`load_rgb` for the evaluation and localization entry points: a missing or unreadable
    file is one DataError, ``[<what>: ]<path>: cannot read the image (<reason>)[; <hint>]``, the
    wording of the training loaders."""
    try:
        return load_rgb(path)
    except UNREADABLE_IMAGE_ERRORS as error:
        prefix = f"{what}: " if what else ""
        suffix = f"; {hint}" if hint else ""
        raise DataError(f"{prefix}{path}: cannot read the image ({describe_unreadable(path, error)}){suffix}"
                        ) from None


def describe_unreadable(path: str | Path, error: BaseException) -> str:
    """A short reason why ``path`` could not be read."""
    try:
        if os.path.getsize(path) == 0:
            return "empty (zero-byte) file"
    except OSError:
        return "file is missing or not accessible"
    return f"{type(error).__name__}: {error}"


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    with Image.open(path) as image:
        return image.size


def missing_files(root: Path, relative_paths: Iterable[str]) -> list[str]:
    """The paths (relative to ``root``, '/'-separated) that do not name an existing entry.

    Lists each directory once instead of calling ``stat`` per file: on ImageNet's 1.28 million
    training images that is a thousand directory listings instead of a million system calls.
    """
    listings: dict[str, set[str] | None] = {}
    missing = []
    for rel in relative_paths:
        parent, _, name = rel.rpartition("/")
        if parent not in listings:
            try:
                listings[parent] = set(os.listdir(root / parent if parent else root))
            except (FileNotFoundError, NotADirectoryError):
                listings[parent] = None
        entries = listings[parent]
        if entries is None or name not in entries:
            missing.append(rel)
    return missing
