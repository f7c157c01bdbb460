"""Score maps: CAMs turned into 224x224 maps in [0, 1], their files, and their validity check.

A score map is what the WSOL protocol (Choe et al., CVPR 2020) evaluates: the CAM resized to the
224x224 evaluation resolution and min-max normalized. On disk it is ``<root>/<image_id>.npy``
(float32); image ids keep their folders and extension, so ``val2/0/0.jpeg`` is stored as
``<root>/val2/0/0.jpeg.npy``, which is the name the protocol loads (``image_id + '.npy'``).

Loaded maps are returned as float64: the protocol casts every loaded map to float64 before it
evaluates it, and ``(map * 255).astype(uint8)`` can truncate differently in float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmcam_fast.errors import DataError

if TYPE_CHECKING:
    import torch

SCOREMAP_SIZE = 224
SCOREMAP_SHAPE = (SCOREMAP_SIZE, SCOREMAP_SIZE)
_MAX_LISTED = 5


def cams_to_scoremaps(cams: torch.Tensor, size: int = SCOREMAP_SIZE) -> torch.Tensor:
    """Resize CAMs to ``size x size`` (bicubic) and min-max normalize each map to [0, 1].

    Args:
        cams: ``[B, h, w]`` class activation maps (any float dtype, any device).
        size: output side length; the protocol evaluates at 224.

    Returns:
        ``[B, size, size]`` float32 score maps on the input's device. A constant map (max == min
        after the resize) becomes all zeros, and so does a map with a NaN or an infinity after the
        resize, as the protocol's ``normalize_scoremap`` does for NaN (its inference resizes, then
        normalises); :func:`nonfinite_maps` says which. No clamp is needed: after the min-max the
        values are in [0, 1] exactly (``x - min <= max - min`` and IEEE division is monotonic).
    """
    # torch is imported here, not at module level: evaluation worker processes never need it
    import torch
    import torch.nn.functional as F

    if cams.dim() != 3:
        raise DataError(f"cams_to_scoremaps: expected CAMs of shape [B, h, w], got {tuple(cams.shape)}")
    maps = F.interpolate(cams[:, None].float(), size=(size, size), mode="bicubic", align_corners=False)[:, 0]
    finite = torch.isfinite(maps).all(dim=2, keepdim=True).all(dim=1, keepdim=True)
    maps = torch.where(finite, maps, 0.0)
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    zero = (span <= 0) | ~finite
    return torch.where(zero, torch.zeros_like(maps), (maps - low) / torch.where(zero, 1.0, span))


def nonfinite_maps(cams: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool, on the CAMs' device: which CAMs hold a NaN or an infinity (their score maps are
    all zeros, see :func:`cams_to_scoremaps`)."""
    return ~cams.isfinite().flatten(1).all(dim=1)


def scoremap_path(root: str | Path, image_id: str) -> Path:
    """The file of one image's score map: ``<root>/<image_id>.npy``.

    Raises:
        DataError: the id would leave the root (absolute, or with a ``..`` component).
    """
    parts = Path(image_id).parts
    if not image_id or Path(image_id).is_absolute() or ".." in parts:
        raise DataError(f"image id {image_id!r}: not a relative path inside the score-map root {root}")
    return Path(root) / (image_id + ".npy")


def save_scoremaps(root: str | Path, image_ids: Sequence[str], scoremaps: np.ndarray | torch.Tensor,
                   check: bool = True) -> None:
    """Write score maps as ``<root>/<image_id>.npy`` (float32), creating sub-folders.

    Args:
        root: the score-map root folder.
        image_ids: one id per map.
        scoremaps: ``[B, H, W]`` array or tensor, e.g. from :func:`cams_to_scoremaps`.
        check: validate the maps first (:func:`check_scoremaps`, any ``H x W``), so that no invalid
            map is written; False only for maps validated already.

    Raises:
        DataError: a count or shape mismatch, or an invalid map (nothing is written then).
    """
    if hasattr(scoremaps, "detach"):  # a torch tensor
        scoremaps = scoremaps.detach().cpu().numpy()
    if len(image_ids) != len(scoremaps):
        raise DataError(f"save_scoremaps: {len(image_ids)} image ids for {len(scoremaps)} score maps")
    if check:
        check_scoremaps(np.asarray(scoremaps), image_ids, shape=None)
    for image_id, scoremap in zip(image_ids, scoremaps, strict=True):
        path = scoremap_path(root, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.asarray(scoremap, dtype=np.float32))


def scoremap_problem(scoremap: object, shape: tuple[int, int] | None = SCOREMAP_SHAPE) -> str | None:
    """What is wrong with a score map, or None when it is valid.

    Valid means: a numpy array of a float dtype, 2-D (of ``shape`` when given) and not empty, every
    value finite and in [0, 1] (the protocol's ``check_scoremap_validity``, plus the shape and
    infinities). This is the one check every entry point uses (files, the CLI, the evaluators); for a
    valid map it costs one ``min`` and one ``max`` (NaN propagates through both).
    """
    if not isinstance(scoremap, np.ndarray):
        return f"expected a numpy array, got {type(scoremap).__name__}"
    if not np.issubdtype(scoremap.dtype, np.floating):
        return f"expected a float array, got dtype {scoremap.dtype}"
    if scoremap.ndim != 2:
        return f"expected a 2-D array, got shape {scoremap.shape}"
    if shape is not None and scoremap.shape != tuple(shape):
        return f"expected shape {tuple(shape)}, got {scoremap.shape}"
    if scoremap.size == 0:
        return f"expected a non-empty map, got shape {scoremap.shape}"
    low, high = float(scoremap.min()), float(scoremap.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        nan, inf = int(np.isnan(scoremap).sum()), int(np.isinf(scoremap).sum())
        found = ", ".join(text for count, text in ((nan, f"{nan} NaN"), (inf, f"{inf} infinite"))
                          if count)
        return f"expected finite values in [0, 1], got {found} value(s)"
    if low < 0 or high > 1:
        return f"values must lie in [0, 1], got min {low}, max {high}"
    return None


def check_scoremap(scoremap: object, image_id: str = "?", source: str | Path | None = None,
                   shape: tuple[int, int] | None = SCOREMAP_SHAPE) -> np.ndarray:
    """Validate one score map and return it as float64 (the protocol evaluates float64 maps).

    Args:
        scoremap: the map.
        image_id: named in the error.
        source: the file it came from, named in the error when given.
        shape: the expected ``(H, W)``; None accepts any 2-D map.

    Raises:
        DataError: naming the image id and, when given, the file.
    """
    problem = scoremap_problem(scoremap, shape)
    if problem is not None:
        where = f" ({source})" if source is not None else ""
        raise DataError(f"score map of image {image_id}{where}: {problem}")
    return np.asarray(scoremap, dtype=np.float64)


def check_scoremaps(scoremaps: object, image_ids: Sequence[str],
                    shape: tuple[int, int] | None = SCOREMAP_SHAPE) -> np.ndarray:
    """Validate a batch ``[B, H, W]`` of score maps at once (vectorized); returns it as an array.

    The rules are :func:`scoremap_problem`'s. One DataError lists the first few invalid maps by
    image id and counts them.
    """
    if hasattr(scoremaps, "detach"):  # a torch tensor
        scoremaps = scoremaps.detach().cpu().numpy()
    if not isinstance(scoremaps, np.ndarray):
        raise DataError(f"score maps: expected a numpy array or tensor, got {type(scoremaps).__name__}")
    if scoremaps.ndim != 3 or len(scoremaps) != len(image_ids):
        raise DataError(f"score maps: expected shape [{len(image_ids)}, H, W] for {len(image_ids)} image "
                        f"id(s), got shape {scoremaps.shape}")
    wrong_shape = shape is not None and scoremaps.shape[1:] != tuple(shape)
    if not np.issubdtype(scoremaps.dtype, np.floating) or wrong_shape:  # the same for every map
        problems = [f"score map of image {image_ids[0]}: {scoremap_problem(scoremaps[0], shape)}"]
        raise DataError(format_offenders(problems, len(image_ids)))
    if scoremaps.size == 0:
        return scoremaps
    low, high = scoremaps.min(axis=(1, 2)), scoremaps.max(axis=(1, 2))
    bad = np.flatnonzero(~((low >= 0) & (high <= 1)))  # NaN fails both comparisons
    if len(bad):
        problems = [f"score map of image {image_ids[i]}: {scoremap_problem(scoremaps[i], shape)}"
                    for i in bad[:_MAX_LISTED]]
        raise DataError(format_offenders(problems, len(bad)))
    return scoremaps


def load_scoremap(root: str | Path, image_id: str,
                  shape: tuple[int, int] | None = SCOREMAP_SHAPE) -> np.ndarray:
    """Load and validate ``<root>/<image_id>.npy``; returns float64.

    Raises:
        DataError: a missing or unreadable file, or an invalid map, naming the image id and file.
    """
    path = scoremap_path(root, image_id)
    try:
        scoremap = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"score map of image {image_id}: file {path} is missing") from None
    except (OSError, ValueError) as err:
        raise DataError(f"score map of image {image_id}: cannot read {path} ({err})") from None
    return check_scoremap(scoremap, image_id, path, shape)


def format_offenders(problems: list[str], total: int, what: str = "invalid score map(s)") -> str:
    """One message listing the first few problems out of ``total``."""
    shown = ";\n  ".join(problems[:_MAX_LISTED])  # "; " between them once the CLI makes it one line
    more = f"\n  (and {total - _MAX_LISTED} more)" if total > _MAX_LISTED else ""
    return f"{total} {what}:\n  {shown}{more}"


def iter_scoremaps(root: str | Path, image_ids: Iterable[str],
                   shape: tuple[int, int] | None = SCOREMAP_SHAPE) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(image_id, float64 score map)`` for each id, loading from ``root``.

    On the first bad map the iteration stops yielding, checks the remaining ids (without
    yielding them) and raises one DataError listing the first few offenders and their count, so a
    whole folder's problems are seen in one run.
    """
    ids = iter(image_ids)
    for image_id in ids:
        try:
            scoremap = load_scoremap(root, image_id, shape)
        except DataError as first:
            problems = [str(first)]
            for rest in ids:
                try:
                    load_scoremap(root, rest, shape)
                except DataError as err:
                    problems.append(str(err))
            raise DataError(format_offenders(problems, len(problems))) from None
        yield image_id, scoremap
