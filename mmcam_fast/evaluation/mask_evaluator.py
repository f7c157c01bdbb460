"""PxAP (Choe et al., CVPR 2020): pixel precision-recall over CAM thresholds, on OpenImages masks.

Per image the ground truth is ``1`` on the union of the instance masks, ``255`` on the ignore mask
minus that foreground (these pixels are not counted), ``0`` elsewhere; masks are read as grayscale,
resized to 224x224 with nearest-neighbour interpolation and compared with 0.5. The score-map values
of foreground and background pixels are counted in bins with edges
``cam_thresholds + [1.0, 2.0, 3.0]`` (``np.histogram``'s rule: ``[e_i, e_i+1)``, the last bin
closed), summed over images; PxAP is the area under the precision-recall curve built from these
counts (:func:`pxap_from_histograms`).

``impl="reference"`` bins with ``np.histogram`` per image, literally as the protocol does;
``impl="fast"`` sorts each class's values once (in float32 when the map is float32-exact, which is
exact because every comparison is then made between identical float64 values) and counts bins with
``searchsorted``. The counts are integers and identical, so PxAP is identical bit for bit. Mask
decoding (PNG) is most of the time here; ``processes`` spreads whole images over processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from mmcam_fast.data.metadata import WSOLMetadata
from mmcam_fast.errors import DataError
from mmcam_fast.evaluation.parallel import ordered_map
from mmcam_fast.evaluation.scoremaps import SCOREMAP_SIZE, check_scoremap, format_offenders
from mmcam_fast.evaluation.thresholds import cam_thresholds as make_cam_thresholds
from mmcam_fast.evaluation.thresholds import check_impl

Histograms = tuple[np.ndarray, np.ndarray]

IGNORE = 255


def load_mask(path: str | Path, image_id: str = "?", size: int = SCOREMAP_SIZE) -> np.ndarray:
    """One mask PNG as float32 ``[size, size]``: grayscale, nearest-neighbour resize.

    Raises:
        DataError: the file is missing or unreadable, naming the image id and the path.
    """
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        state = "is missing" if not os.path.exists(path) else "cannot be read as an image"
        raise DataError(f"mask of image {image_id}: {path} {state}")
    return cv2.resize(np.float32(image), (size, size), interpolation=cv2.INTER_NEAREST)


def load_gt_mask(mask_dir: str | Path, mask_paths: Sequence[str], ignore_path: str, image_id: str = "?",
                 size: int = SCOREMAP_SIZE) -> np.ndarray:
    """The ground truth of one image: uint8 ``[size, size]`` with 1 foreground, 255 ignored, 0 background.

    Args:
        mask_dir: the folder the metadata's mask paths are relative to (``<mask_root>/OpenImages``).
        mask_paths: the image's instance masks.
        ignore_path: its ignore mask; ``''`` means none (the protocol's reader would fail on it).
    """
    foreground = np.zeros((size, size), dtype=bool)
    for mask_path in mask_paths:
        foreground |= load_mask(Path(mask_dir) / mask_path, image_id, size) > 0.5
    if ignore_path:
        ignore = (load_mask(Path(mask_dir) / ignore_path, image_id, size) > 0.5) & ~foreground
    else:
        ignore = np.zeros_like(foreground)
    return foreground.astype(np.uint8) + IGNORE * ignore.astype(np.uint8)


def bin_edges(cam_thresholds: Sequence[float]) -> np.ndarray:
    """The protocol's bin edges: ``cam_thresholds + [1.0, 2.0, 3.0]``."""
    return np.append(np.asarray(cam_thresholds, dtype=np.float64), [1.0, 2.0, 3.0])


def histograms_reference(scoremap: np.ndarray, gt_mask: np.ndarray, edges: np.ndarray) -> Histograms:
    """Foreground and background score histograms of one image, with ``np.histogram`` (the protocol)."""
    true_hist, _ = np.histogram(scoremap[gt_mask == 1], bins=edges)
    false_hist, _ = np.histogram(scoremap[gt_mask == 0], bins=edges)
    return true_hist, false_hist


def _sorted_histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``np.histogram(values, edges)[0]`` for values inside ``[edges[0], edges[-1]]``: sort, then search."""
    ordered = np.sort(values).astype(np.float64)
    below = np.concatenate([np.searchsorted(ordered, edges[:-1], side="left"),
                            np.searchsorted(ordered, edges[-1:], side="right")])  # last bin is closed
    return np.diff(below)


def histograms_fast(scoremap: np.ndarray, gt_mask: np.ndarray, edges: np.ndarray) -> Histograms:
    """Same counts as :func:`histograms_reference` (valid maps lie in [0, 1], inside the edges)."""
    single = scoremap.astype(np.float32)
    # sorting float32 is about twice as fast; exact only when no value was rounded
    values = single if np.array_equal(single, scoremap) else scoremap
    return _sorted_histogram(values[gt_mask == 1], edges), _sorted_histogram(values[gt_mask == 0], edges)


def pxap_from_histograms(true_hist: np.ndarray, false_hist: np.ndarray) -> float:
    """PxAP (percent) from accumulated score histograms, the protocol's ``MaskEvaluator.compute``.

    Raises:
        DataError: histograms that are not two 1-D arrays of equal length with finite, non-negative
            counts; no foreground pixel, or no pixel scored at all, in the evaluated images.
    """
    true_hist, false_hist = check_histograms((true_hist, false_hist))
    tp = true_hist[::-1].cumsum()
    fn = true_hist.sum() - tp
    fp = false_hist[::-1].cumsum()
    if ((tp + fn) <= 0).all():
        raise DataError("PxAP: no positive ground-truth pixel in the evaluated masks")
    if ((tp + fp) <= 0).all():
        raise DataError("PxAP: no positive prediction in the evaluated score maps")
    nonzero = (tp + fp) != 0
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 bins are masked out below, as in the protocol
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
    return float((precision[1:] * np.diff(recall))[nonzero[1:]].sum() * 100)


def check_histograms(histograms: Histograms, length: int | None = None) -> Histograms:
    """Two 1-D count arrays of equal length (``length`` bins when given), finite and non-negative.

    Returns them as float64 arrays.

    Raises:
        DataError: saying what was expected.
    """
    where = "PxAP score histograms"
    if len(histograms) != 2:
        raise DataError(f"{where}: expected (foreground counts, background counts), "
                        f"got {len(histograms)} arrays")
    try:
        true_hist, false_hist = (np.asarray(h, dtype=np.float64) for h in histograms)
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected two arrays of counts") from None
    expected = f"[{length}]" if length is not None else "[bins]"
    if (true_hist.ndim != 1 or true_hist.shape != false_hist.shape
            or (length is not None and len(true_hist) != length)):
        raise DataError(f"{where}: expected two arrays of shape {expected}, got {true_hist.shape} and "
                        f"{false_hist.shape}")
    low = min(true_hist.min(initial=0.0), false_hist.min(initial=0.0))
    high = max(true_hist.max(initial=0.0), false_hist.max(initial=0.0))
    if not (low >= 0 and np.isfinite(high)):
        raise DataError(f"{where}: counts must be finite and non-negative, got min {low}, max {high}")
    return true_hist, false_hist


def _mask_job(item: tuple[str, np.ndarray, list[str], str], mask_dir: str, edges: np.ndarray,
              impl: str) -> Histograms:
    image_id, scoremap, mask_paths, ignore_path = item
    gt_mask = load_gt_mask(mask_dir, mask_paths, ignore_path, image_id, scoremap.shape[0])
    histograms = histograms_reference if impl == "reference" else histograms_fast
    return histograms(scoremap, gt_mask, edges)


class MaskEvaluator:
    """Accumulates score histograms over images; :meth:`compute` gives PxAP.

    Args:
        mask_paths: image id -> instance-mask paths (relative to ``mask_dir``).
        ignore_paths: image id -> ignore-mask path (``''`` for none).
        mask_dir: the folder the paths are relative to (``<mask_root>/OpenImages``).
        cam_curve_interval: CAM thresholds are ``np.arange(0, 1, cam_curve_interval)``.
        impl: ``"fast"`` (default) or ``"reference"``.
        cam_thresholds: an explicit threshold list instead of ``cam_curve_interval``.
        check_files: verify up front that every mask file exists (one error lists the first few missing).
    """

    def __init__(self, mask_paths: Mapping[str, Sequence[str]], ignore_paths: Mapping[str, str],
                 mask_dir: str | Path, *, cam_curve_interval: float = 0.01, impl: str = "fast",
                 cam_thresholds: Sequence[float] | None = None, check_files: bool = True):
        self.mask_paths = {k: list(v) for k, v in mask_paths.items()}
        self.ignore_paths = dict(ignore_paths)
        self.mask_dir = Path(mask_dir)
        self.cam_thresholds = (np.asarray(cam_thresholds, dtype=np.float64) if cam_thresholds is not None
                               else make_cam_thresholds(cam_curve_interval))
        self.edges = bin_edges(self.cam_thresholds)
        self.impl = check_impl(impl)
        self.true_hist = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.false_hist = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.count = 0
        if check_files:
            self.check_files()

    @classmethod
    def from_metadata(cls, metadata: WSOLMetadata, mask_dir: str | Path, **kwargs) -> MaskEvaluator:
        """An evaluator for one split of a mask data set; ``mask_dir`` is ``<mask_root>/OpenImages``."""
        if not metadata.has_masks:
            raise DataError(f"{metadata.folder / 'localization.txt'}: no masks (PxAP needs "
                            "<image_id>,<mask_path>,<ignore_path> lines)")
        return cls(metadata.mask_paths, metadata.ignore_paths, mask_dir, **kwargs)

    def check_files(self) -> None:
        """Raise one DataError listing the first few images whose mask files are missing."""
        missing = []
        for image_id, paths in self.mask_paths.items():
            ignore = self.ignore_paths.get(image_id, "")
            for path in [*paths, *([ignore] if ignore else [])]:
                if not (self.mask_dir / path).is_file():
                    missing.append(f"mask of image {image_id}: {self.mask_dir / path} is missing")
        if missing:
            raise DataError(format_offenders(missing, len(missing), "missing mask file(s)"))

    def _item(self, scoremap: np.ndarray, image_id: str, check: bool) -> tuple:
        if image_id not in self.mask_paths:
            raise DataError(f"image {image_id}: no ground-truth mask in the metadata")
        scoremap = check_scoremap(scoremap, image_id) if check else np.asarray(scoremap, dtype=np.float64)
        return image_id, scoremap, self.mask_paths[image_id], self.ignore_paths.get(image_id, "")

    def add(self, histograms: Histograms) -> None:
        """Add one image's ``(foreground, background)`` score histograms (computed elsewhere).

        Raises:
            DataError: not two integer arrays with one count per bin, non-negative.
        """
        true_hist, false_hist = check_histograms(histograms, len(self.true_hist))
        if not all(np.array_equal(h, np.trunc(h)) for h in (true_hist, false_hist)):
            raise DataError("PxAP score histograms: expected integer pixel counts")
        self.true_hist += true_hist.astype(np.int64)
        self.false_hist += false_hist.astype(np.int64)
        self.count += 1

    def accumulate(self, scoremap: np.ndarray, image_id: str, check: bool = True) -> None:
        """Add one image: load its masks and count its scores.

        Raises:
            DataError: an image without masks in the metadata, a missing mask file, or (with
                ``check``) a map that is not 224x224, finite and in [0, 1].
        """
        self._add(_mask_job(self._item(scoremap, image_id, check), str(self.mask_dir), self.edges, self.impl))

    def _add(self, histograms: Histograms) -> None:
        self.true_hist += histograms[0]
        self.false_hist += histograms[1]
        self.count += 1

    def accumulate_many(self, scoremaps: Iterable[tuple[str, np.ndarray]], processes: int = 1,
                        check: bool = True) -> int:
        """Add ``(image_id, scoremap)`` pairs, in ``processes`` processes; returns how many."""
        items = (self._item(scoremap, image_id, check) for image_id, scoremap in scoremaps)
        job = partial(_mask_job, mask_dir=str(self.mask_dir), edges=self.edges, impl=self.impl)
        added = 0
        for histograms in ordered_map(job, items, processes):
            self._add(histograms)
            added += 1
        return added

    def compute(self) -> float:
        """PxAP in percent."""
        if self.count == 0:
            raise DataError("PxAP: no image was accumulated")
        return pxap_from_histograms(self.true_hist, self.false_hist)
