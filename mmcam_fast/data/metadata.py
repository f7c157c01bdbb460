"""The standard WSOL metadata format (Choe et al., CVPR 2020), read strictly.

A split folder holds four text files::

    image_ids.txt       <image_id>                      one per line, the order of the split
    class_labels.txt    <image_id>,<label>
    image_sizes.txt     <image_id>,<width>,<height>     (empty for OpenImages)
    localization.txt    <image_id>,<x0>,<y0>,<x1>,<y1>  one line per box (CUB, ILSVRC, ...);
                        absent for a labels-only training split (ImageNet, OpenImages train)
                     or <image_id>,<mask_path>,<ignore_path>  one line per instance mask (OpenImages);
                        the ignore path is given on an image's first line only

Parsing follows the protocol's own reader line for line (the same fields, the same meaning), but a
malformed line is an error naming the file and line instead of a bare ``ValueError``, and files that
disagree (an id without a label, a size or a box; a box outside its image) are reported with the first
few offenders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mmcam_fast.errors import DataError

METADATA_FILES = ("image_ids.txt", "class_labels.txt", "image_sizes.txt", "localization.txt")
_MAX_LISTED = 5


@dataclass
class WSOLMetadata:
    """One split of a data set in the WSOL metadata format.

    Attributes:
        folder: the folder holding the four files.
        image_ids: ids in file order (paths relative to the image root).
        labels: id -> integer class label.
        sizes: id -> (width, height) of the original image; empty for mask data sets.
        boxes: id -> list of (x0, y0, x1, y1) boxes, inclusive pixel coordinates, original scale.
        mask_paths: id -> instance-mask paths (relative to the mask root), mask data sets only.
        ignore_paths: id -> ignore-mask path ('' when the file gives none), mask data sets only.
    """

    folder: Path
    image_ids: list[str]
    labels: dict[str, int]
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    boxes: dict[str, list[tuple[int, int, int, int]]] = field(default_factory=dict)
    mask_paths: dict[str, list[str]] = field(default_factory=dict)
    ignore_paths: dict[str, str] = field(default_factory=dict)

    @property
    def has_masks(self) -> bool:
        return bool(self.mask_paths)

    @property
    def num_classes(self) -> int:
        return max(self.labels.values()) + 1 if self.labels else 0

    def __len__(self) -> int:
        return len(self.image_ids)


def _lines(path: Path) -> list[tuple[int, str]]:
    """Non-empty lines of a file with their 1-based line numbers."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: metadata file is missing") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the metadata file ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {data[exc.start]:#04x}); metadata files "
                        "are UTF-8") from None
    return [(i + 1, line.rstrip("\r")) for i, line in enumerate(text.split("\n")) if line.strip()]


def _split(path: Path, lineno: int, line: str, nfields: int, what: str) -> list[str]:
    parts = line.split(",")
    if len(parts) != nfields:
        raise DataError(f"{path}:{lineno}: expected {what} ({nfields} comma-separated fields), got {line!r}")
    return parts


def _int(path: Path, lineno: int, text: str, line: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{path}:{lineno}: expected an integer, got {text!r} in {line!r}") from None


def _offenders(ids: list[str]) -> str:
    shown = ", ".join(ids[:_MAX_LISTED])
    more = f" (and {len(ids) - _MAX_LISTED} more)" if len(ids) > _MAX_LISTED else ""
    return f"{len(ids)} image(s): {shown}{more}"


def load_metadata(folder: str | Path, *, check_boxes: bool = True) -> WSOLMetadata:
    """Read and cross-check one split folder of WSOL metadata.

    Args:
        folder: the split folder, e.g. ``<metadata_root>/CUB/test``.
        check_boxes: verify that every box lies inside its image (0 <= x0 <= x1 < width, same for y).

    Returns:
        The parsed metadata. Whether it is a box or a mask data set is read from localization.txt.

    Raises:
        DataError: a missing file, a malformed line, or files that disagree, naming file and line or
            the offending image ids.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: metadata folder does not exist (expected {', '.join(METADATA_FILES)})")

    ids_file = folder / "image_ids.txt"
    image_ids = [line for _, line in _lines(ids_file)]
    if not image_ids:
        raise DataError(f"{ids_file}: no image ids")
    seen: set[str] = set()
    dups = [i for i in image_ids if i in seen or seen.add(i)]
    if dups:
        raise DataError(f"{ids_file}: duplicate ids, {_offenders(dups)}")

    labels_file = folder / "class_labels.txt"
    labels: dict[str, int] = {}
    for lineno, line in _lines(labels_file):
        image_id, label = _split(labels_file, lineno, line, 2, "<image_id>,<label>")
        labels[image_id] = _int(labels_file, lineno, label, line)
        if labels[image_id] < 0:
            raise DataError(f"{labels_file}:{lineno}: negative class label in {line!r}")

    sizes_file = folder / "image_sizes.txt"
    sizes: dict[str, tuple[int, int]] = {}
    if sizes_file.exists():
        for lineno, line in _lines(sizes_file):
            image_id, w, h = _split(sizes_file, lineno, line, 3, "<image_id>,<width>,<height>")
            sizes[image_id] = (_int(sizes_file, lineno, w, line), _int(sizes_file, lineno, h, line))
            if min(sizes[image_id]) <= 0:
                raise DataError(f"{sizes_file}:{lineno}: image size must be positive, got {line!r}")

    loc_file = folder / "localization.txt"
    boxes: dict[str, list[tuple[int, int, int, int]]] = {}
    mask_paths: dict[str, list[str]] = {}
    ignore_paths: dict[str, str] = {}
    # A training split without localization (ImageNet / OpenImages train) is read as labels only.
    loc_lines = _lines(loc_file) if loc_file.exists() else []
    is_mask = bool(loc_lines) and len(loc_lines[0][1].split(",")) == 3
    for lineno, line in loc_lines:
        if is_mask:
            image_id, mask_path, ignore_path = _split(loc_file, lineno, line, 3,
                                                      "<image_id>,<mask_path>,<ignore_path>")
            if image_id in mask_paths:
                if ignore_path:
                    raise DataError(f"{loc_file}:{lineno}: second ignore mask for {image_id} "
                                    "(the ignore path belongs on an image's first line only)")
                mask_paths[image_id].append(mask_path)
            else:
                mask_paths[image_id] = [mask_path]
                ignore_paths[image_id] = ignore_path
        else:
            parts = _split(loc_file, lineno, line, 5, "<image_id>,<x0>,<y0>,<x1>,<y1>")
            x0, y0, x1, y1 = (_int(loc_file, lineno, p, line) for p in parts[1:])
            if x1 < x0 or y1 < y0:
                raise DataError(f"{loc_file}:{lineno}: box must satisfy x0 <= x1 and y0 <= y1, got {line!r}")
            boxes.setdefault(parts[0], []).append((x0, y0, x1, y1))

    meta = WSOLMetadata(folder, image_ids, labels, sizes, boxes, mask_paths, ignore_paths)
    _cross_check(meta, check_boxes=check_boxes)
    return meta


def _cross_check(meta: WSOLMetadata, *, check_boxes: bool) -> None:
    folder = meta.folder
    missing = [i for i in meta.image_ids if i not in meta.labels]
    if missing:
        raise DataError(f"{folder / 'class_labels.txt'}: no label for {_offenders(missing)}")
    if meta.has_masks:
        missing = [i for i in meta.image_ids if i not in meta.mask_paths]
        if missing:
            raise DataError(f"{folder / 'localization.txt'}: no mask for {_offenders(missing)}")
        return
    if meta.boxes:
        missing = [i for i in meta.image_ids if i not in meta.boxes]
        if missing:
            raise DataError(f"{folder / 'localization.txt'}: no box for {_offenders(missing)}")
        missing = [i for i in meta.image_ids if i not in meta.sizes]
        if missing:
            raise DataError(f"{folder / 'image_sizes.txt'}: no size for {_offenders(missing)}")
    if check_boxes and meta.boxes:
        outside = []
        for image_id in meta.image_ids:
            w, h = meta.sizes[image_id]
            if any(x0 < 0 or y0 < 0 or x1 >= w or y1 >= h for x0, y0, x1, y1 in meta.boxes[image_id]):
                outside.append(image_id)
        if outside:
            raise DataError(f"{folder / 'localization.txt'}: box outside the image "
                            f"(sizes from image_sizes.txt) for {_offenders(outside)}")


def write_metadata(folder: str | Path, image_ids: list[str], labels: dict[str, int],
                   sizes: dict[str, tuple[int, int]] | None = None,
                   boxes: dict[str, list[tuple[int, int, int, int]]] | None = None,
                   mask_paths: dict[str, list[str]] | None = None,
                   ignore_paths: dict[str, str] | None = None) -> Path:
    """Write one split folder in the WSOL metadata format (the inverse of :func:`load_metadata`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = sizes or {}
    (folder / "image_ids.txt").write_text("".join(f"{i}\n" for i in image_ids))
    (folder / "class_labels.txt").write_text("".join(f"{i},{labels[i]}\n" for i in image_ids))
    (folder / "image_sizes.txt").write_text(
        "".join(f"{i},{sizes[i][0]},{sizes[i][1]}\n" for i in image_ids if i in sizes))
    loc = []
    for i in image_ids:
        if mask_paths is not None:
            for k, m in enumerate(mask_paths.get(i, [])):
                loc.append(f"{i},{m},{(ignore_paths or {}).get(i, '') if k == 0 else ''}\n")
        elif boxes is not None:
            loc.extend(f"{i},{x0},{y0},{x1},{y1}\n" for x0, y0, x1, y1 in boxes.get(i, []))
    (folder / "localization.txt").write_text("".join(loc))
    return folder
