"""The converters of small public data sets into the WSOL metadata format (their command line:
``python -m mmcam_fast.prepare``, :mod:`mmcam_fast.cli.prepare`).

    python -m mmcam_fast.prepare tiny-imagenet --src tiny-imagenet-200 --out runs/data/tiny
    python -m mmcam_fast.prepare voc --src fruit-voc --out runs/data/fruit
    python -m mmcam_fast.prepare synthetic --out runs/data/synthetic

The output folder is a complete ``--data-root``::

    <out>/metadata/{train,val,test}/    the WSOL metadata (image_ids, class_labels, image_sizes, localization)
    <out>/metadata/mixed/               (voc) images whose boxes name several classes, see below
    <out>/classes.txt                   one class per line in label order: ``<key>\\t<readable name>``
    <out>/prepared.json                 what was converted, with which options, and the counts
    <out>/train, <out>/val, ...         symbolic links to the source's top-level image folders

Images are not copied: ids are paths relative to the source folder, and ``<out>`` links the source's
top-level folders, so ``<out>`` works as the image root while the pixels stay where they are.
Image sizes are read from the image files (headers only); class labels are the sorted class keys.

Box coordinates are inclusive 0-based pixels in the metadata. A box partly outside its image is
clipped into it, counted and logged (``--strict-boxes`` makes it an error); a box with no pixel in
the image, or with x1 < x0, is an error naming the annotation file.

Tiny ImageNet (``train/<wnid>/images/*.JPEG`` with ``<wnid>_boxes.txt``, ``val/images`` with
``val_annotations.txt``; boxes already inclusive 0-based):
    * test = the official ``val`` split (50 per class, labelled, with boxes);
    * val  = ``--val-per-class`` (default 10) images per class held out from ``train`` at random
      (seeded by ``--seed``), the size of the protocol's ImageNet ``train-fullsup`` split; they are
      removed from train so the splits stay disjoint, as in the protocol;
    * train = the rest of ``train``. Classes: sorted wnids, names from ``words.txt``.

PASCAL VOC XML in the fruit-voc layout (``<src>/<split>/<name>.jpg`` + ``<name>.xml``, splits
``train``, ``test`` and optionally ``val``):
    * VOC boxes are 1-based inclusive pixel coordinates; they are shifted by -1. (In fruit-voc no box
      starts at 0 and 52 boxes end at exactly the image width or height, which only the 1-based reading
      places inside the image.) ``<size>`` in the XML is ignored (it is 0x0 in some files).
    * The class of an image is the name of its objects. An image whose boxes name several classes has
      no single image-level label, so it is left out of train/val/test (counted and logged) and
      written to a separate ``mixed`` split for localization-only use: there its label is the class
      covering the largest box area and its boxes are that class's boxes only (a box of another class
      would reward localizing the wrong object). An image is classified by its boxes, not its file
      name: fruit-voc's ``mixed_20.jpg`` holds a single orange box and is an orange image.
    * Images without any object are left out (counted). val = ``<src>/val`` when present, else
      ``--val-per-class`` images per class held out from train as for Tiny ImageNet.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcam_fast.data.images import image_size
from mmcam_fast.data.manifest import CLASSES_FILE, MANIFEST, VERSION, read_manifest
from mmcam_fast.data.metadata import write_metadata
from mmcam_fast.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
_MAX_LISTED = 5

Box = tuple[int, int, int, int]


@dataclass
class _Split:
    """One output split being assembled."""

    ids: list[str] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    boxes: dict[str, list[Box]] = field(default_factory=dict)

    def add(self, image_id: str, label: int, size: tuple[int, int], boxes: list[Box]) -> None:
        self.ids.append(image_id)
        self.labels[image_id] = label
        self.sizes[image_id] = size
        self.boxes[image_id] = boxes


@dataclass
class _BoxChecker:
    """Clips boxes into their images (or refuses them) and remembers what it clipped."""

    strict: bool
    clipped: list[str] = field(default_factory=list)

    def __call__(self, box: Box, size: tuple[int, int], where: str) -> Box:
        x0, y0, x1, y1 = box
        w, h = size
        if x1 < x0 or y1 < y0:
            raise DataError(f"{where}: box {box} has x1 < x0 or y1 < y0")
        if x1 < 0 or y1 < 0 or x0 >= w or y0 >= h:
            raise DataError(f"{where}: box {box} lies entirely outside the {w}x{h} image")
        clipped = (max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1))
        if clipped != box:
            if self.strict:
                raise DataError(f"{where}: box {box} extends outside the {w}x{h} image (--strict-boxes)")
            self.clipped.append(f"{where} {box}->{clipped}")
        return clipped

    def report(self) -> None:
        if self.clipped:
            more = f" (and {len(self.clipped) - _MAX_LISTED} more)" if len(self.clipped) > _MAX_LISTED else ""
            log.warning("clipped %d box(es) into their images: %s%s", len(self.clipped),
                        "; ".join(self.clipped[:_MAX_LISTED]), more)


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _size_of(path: Path) -> tuple[int, int]:
    try:
        return image_size(path)
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: cannot read the image header ({error}); fix or remove the file "
                        "and its annotation") from None


def _hold_out(per_class: dict[int, list[str]], count: int, seed: int) -> tuple[set[str], list[str]]:
    """Pick ``count`` ids per class at random (seeded per class); returns them and a list of classes
    that had too few images to keep any for training."""
    held: set[str] = set()
    too_small = []
    for label, ids in sorted(per_class.items()):
        if count >= len(ids):
            too_small.append(str(label))
            continue
        rng = np.random.default_rng([seed, label])
        held.update(ids[i] for i in rng.choice(len(ids), size=count, replace=False))
    return held, too_small


def _link_top_folders(src: Path, out: Path, names: Sequence[str]) -> None:
    """Make ``out/<name>`` a symbolic link to ``src/<name>`` for each name."""
    for name in names:
        link, target = out / name, (src / name).resolve()
        if link.is_symlink():
            if link.resolve() == target:
                continue
            link.unlink()
        elif link.exists():
            raise DataError(f"{link}: exists and is not a link to {target}; choose an empty --out folder")
        try:
            os.symlink(target, link, target_is_directory=True)
        except OSError as error:
            raise DataError(f"{link}: cannot create a link to {target} ({error})") from None


def _write(out: Path, kind: str, src: Path, options: dict[str, Any], splits: dict[str, _Split],
           classes: list[tuple[str, str]], counts: dict[str, Any], top_folders: Sequence[str]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an interrupted run must not look complete
    _link_top_folders(src, out, top_folders)
    for stale in ("train", "val", "test", "mixed"):  # splits an earlier conversion wrote here
        if stale not in splits and (out / "metadata" / stale / "image_ids.txt").exists():
            shutil.rmtree(out / "metadata" / stale)
    for name, split in splits.items():
        write_metadata(out / "metadata" / name, split.ids, split.labels, split.sizes, boxes=split.boxes)
    (out / CLASSES_FILE).write_text("".join(f"{key}\t{name}\n" for key, name in classes))
    counts = {**counts, **{f"{name}_images": len(split.ids) for name, split in splits.items()}}
    manifest = {"version": VERSION, "kind": kind, "source": str(src), "options": options,
                "counts": counts, "splits": list(splits)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("%s: wrote %s", out, ", ".join(f"{k}={v}" for k, v in counts.items()))
    return out


# -- Tiny ImageNet ---------------------------------------------------------------------------------

def unpack_archive(archive: str | Path, cache_root: str | Path = "runs/data") -> Path:
    """Extract a ``.tar.gz`` source once into ``<cache_root>/<archive name>/`` and return its top folder.

    Extracted into a temporary sibling and renamed into place, so an interrupted extraction is
    redone, never half-used; later calls reuse the folder.
    """
    import tarfile
    import uuid

    archive = Path(archive)
    name = archive.name.removesuffix(".gz").removesuffix(".tgz").removesuffix(".tar")
    target = Path(cache_root) / name
    if not target.is_dir():
        building = target.parent / f".{name}.extracting-{uuid.uuid4().hex[:8]}"
        building.mkdir(parents=True)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(building, filter="data")
            os.replace(building, target)
        except (OSError, tarfile.TarError) as exc:
            raise DataError(f"{archive}: cannot extract the archive ({exc})") from None
        finally:
            shutil.rmtree(building, ignore_errors=True)
    tops = [p for p in target.iterdir() if p.is_dir()]
    return tops[0] if len(tops) == 1 and not (target / "train").is_dir() else target


def prepare_tiny_imagenet(src: str | Path, out: str | Path, *, val_per_class: int = 10, seed: int = 0,
                          strict_boxes: bool = False, classes: Sequence[str] | None = None,
                          labels_only: bool = False) -> Path:
    """Convert a Tiny ImageNet folder (see the module docstring for the split decisions).

    Args:
        classes: only these wnids (e.g. ``wsol20.txt``, ``pretrain172.txt``); the official val images
            of other classes are left out of the test split. None: every class.
        labels_only: a classification set (pretraining): no boxes in any split, and classes without
            a box file are accepted.

    Raises:
        DataError: the source is not in the Tiny ImageNet layout or its annotations are inconsistent.
    """
    src, out = Path(src).resolve(), Path(out)
    train_root = src / "train"
    if not train_root.is_dir():
        raise DataError(f"{src}: not a Tiny ImageNet folder (no train/ folder; check --src)")
    wnids_file = src / "wnids.txt"
    if wnids_file.exists():
        wnids = sorted({w.strip() for w in wnids_file.read_text().split() if w.strip()})
    else:
        wnids = sorted(p.name for p in train_root.iterdir() if p.is_dir())
    if classes is not None:
        unknown = sorted(set(classes) - set(wnids))
        if unknown:
            raise DataError(f"--classes: {', '.join(unknown[:_MAX_LISTED])} not among the classes of {src}")
        wnids = sorted(set(classes))
    missing = [w for w in wnids if not (train_root / w).is_dir()]
    if missing:
        raise DataError(f"{wnids_file}: no train/<wnid> folder for {', '.join(missing[:_MAX_LISTED])}")
    label_of = {w: i for i, w in enumerate(wnids)}
    words: dict[str, str] = {}
    if (src / "words.txt").exists():
        for line in (src / "words.txt").read_text(encoding="utf-8").splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.split(",")[0].strip()
    check = _BoxChecker(strict_boxes)

    per_class: dict[int, list[str]] = {}
    annotations: dict[str, tuple[int, tuple[int, int], list[Box]]] = {}
    for wnid in wnids:
        boxes_file = train_root / wnid / f"{wnid}_boxes.txt"
        boxes: dict[str, Box] = {}
        try:
            lines = boxes_file.read_text().splitlines()
        except FileNotFoundError:
            if not labels_only:
                raise DataError(f"{boxes_file}: box file is missing (--labels-only makes a classification "
                                "set without boxes)") from None
            lines = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 5:
                raise DataError(f"{boxes_file}:{lineno}: expected <file> <x0> <y0> <x1> <y1>, got {line!r}")
            try:
                boxes[parts[0]] = tuple(int(v) for v in parts[1:])  # type: ignore[assignment]
            except ValueError:
                raise DataError(f"{boxes_file}:{lineno}: box coordinates must be integers: "
                                f"{line!r}") from None
        files = sorted((p.name for p in (train_root / wnid / "images").iterdir()), key=_natural_key)
        no_box = [f for f in files if f not in boxes]
        if no_box and not labels_only:
            raise DataError(f"{boxes_file}: no box for {len(no_box)} image(s): "
                            f"{', '.join(no_box[:_MAX_LISTED])}")
        no_image = sorted(set(boxes) - set(files))
        if no_image:
            raise DataError(f"{boxes_file}: boxes for missing image(s): {', '.join(no_image[:_MAX_LISTED])}")
        for name in files:
            image_id = f"train/{wnid}/images/{name}"
            size = _size_of(src / image_id)
            box = [] if labels_only else [check(boxes[name], size, f"{boxes_file} ({name})")]
            annotations[image_id] = (label_of[wnid], size, box)
            per_class.setdefault(label_of[wnid], []).append(image_id)

    held, too_small = _hold_out(per_class, val_per_class, seed)
    if too_small:
        raise DataError(f"{src}: class(es) {', '.join(too_small)} have no more than --val-per-class "
                        f"{val_per_class} training images")
    splits = {"train": _Split(), "val": _Split(), "test": _Split()}
    for image_id, (label, size, boxes_) in annotations.items():
        splits["val" if image_id in held else "train"].add(image_id, label, size, boxes_)

    val_file = src / "val" / "val_annotations.txt"
    if not val_file.exists():
        raise DataError(f"{val_file}: missing (the official val split becomes the test split)")
    test_rows = []
    for lineno, line in enumerate(val_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 6:
            raise DataError(f"{val_file}:{lineno}: expected <file> <wnid> <x0> <y0> <x1> <y1>, got {line!r}")
        name, wnid = parts[0], parts[1]
        if classes is not None and wnid not in label_of:
            continue  # a class left out by --classes
        if wnid not in label_of:
            raise DataError(f"{val_file}:{lineno}: wnid {wnid} is not one of the {len(wnids)} "
                            "training classes")
        try:
            box = tuple(int(v) for v in parts[2:])
        except ValueError:
            raise DataError(f"{val_file}:{lineno}: box coordinates must be integers: {line!r}") from None
        test_rows.append((label_of[wnid], _natural_key(name), name, box, lineno))
    for label, _, name, box, lineno in sorted(test_rows, key=lambda r: (r[0], r[1])):
        image_id = f"val/images/{name}"
        if not (src / image_id).exists():
            raise DataError(f"{val_file}:{lineno}: image {src / image_id} is missing")
        size = _size_of(src / image_id)
        boxes_ = [] if labels_only else [check(box, size, f"{val_file}:{lineno}")]
        splits["test"].add(image_id, label, size, boxes_)
    check.report()
    options = {"val_per_class": val_per_class, "seed": seed, "strict_boxes": strict_boxes}
    if classes is not None:
        options["classes"] = list(wnids)
    if labels_only:
        options["labels_only"] = True
    names = [(w, words.get(w, w)) for w in wnids]
    return _write(out, "tiny-imagenet", src, options, splits, names,
                  {"classes": len(wnids), "clipped_boxes": len(check.clipped)}, ["train", "val"])


# -- PASCAL VOC (fruit-voc layout) -----------------------------------------------------------------

def _parse_voc(xml_path: Path) -> list[tuple[str, Box]]:
    """(name, 1-based box) of every object of one VOC annotation file."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as error:
        raise DataError(f"{xml_path}: not a valid XML file ({error})") from None
    objects = []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DataError(f"{xml_path}: object {k} has no <name>")
        values = [obj.findtext(f"bndbox/{tag}") for tag in ("xmin", "ymin", "xmax", "ymax")]
        if any(v is None for v in values):
            raise DataError(f"{xml_path}: object {k} ({name}) has no complete <bndbox>")
        try:
            box = tuple(int(round(float(v))) for v in values)  # type: ignore[arg-type]
        except ValueError:
            raise DataError(f"{xml_path}: object {k} ({name}) has a non-numeric box {values}") from None
        objects.append((name, box))
    return objects  # type: ignore[return-value]


def _image_for(xml_path: Path) -> Path | None:
    for suffix in _IMAGE_SUFFIXES:
        candidate = xml_path.with_suffix(suffix)
        if candidate.exists():
            return candidate
    return None


def prepare_voc(src: str | Path, out: str | Path, *, val_per_class: int = 10, seed: int = 0,
                strict_boxes: bool = False) -> Path:
    """Convert a PASCAL VOC XML folder in the fruit-voc layout (decisions in the module docstring).

    Raises:
        DataError: the source is not in that layout, or an annotation is malformed or inconsistent.
    """
    src, out = Path(src).resolve(), Path(out)
    present = [s for s in ("train", "val", "test") if (src / s).is_dir()]
    if "train" not in present or "test" not in present:
        raise DataError(f"{src}: expected train/ and test/ folders of <name>.jpg + <name>.xml (check --src)")
    check = _BoxChecker(strict_boxes)
    counts: Counter[str] = Counter()
    # split -> list of (image_id, size, [(name, 0-based box)])
    parsed: dict[str, list[tuple[str, tuple[int, int], list[tuple[str, Box]]]]] = {}
    for split in present:
        rows = []
        xml_files = sorted((src / split).glob("*.xml"), key=lambda p: _natural_key(p.name))
        annotated = {p.stem for p in xml_files}
        unannotated = [p.name for p in (src / split).iterdir()
                       if p.suffix in _IMAGE_SUFFIXES and p.stem not in annotated]
        if unannotated:
            counts["images_without_annotation"] += len(unannotated)
            log.warning("%s: %d image(s) without an XML annotation left out: %s", src / split,
                        len(unannotated), ", ".join(sorted(unannotated)[:_MAX_LISTED]))
        for xml_path in xml_files:
            image_path = _image_for(xml_path)
            if image_path is None:
                raise DataError(f"{xml_path}: no image file next to it ({xml_path.stem}.jpg)")
            image_id = f"{split}/{image_path.name}"
            size = _size_of(image_path)
            objects = []
            for name, (x0, y0, x1, y1) in _parse_voc(xml_path):
                box = check((x0 - 1, y0 - 1, x1 - 1, y1 - 1), size, f"{xml_path} ({name})")
                objects.append((name, box))
            rows.append((image_id, size, objects))
        parsed[split] = rows

    keys = sorted({name for rows in parsed.values() for _, _, objects in rows for name, _ in objects})
    label_of = {k: i for i, k in enumerate(keys)}
    splits = {"train": _Split(), "val": _Split(), "test": _Split(), "mixed": _Split()}
    single: dict[str, list[tuple[str, int, tuple[int, int], list[Box]]]] = {s: [] for s in present}
    mixed_names = []
    for split, rows in parsed.items():
        for image_id, size, objects in rows:
            names = {name for name, _ in objects}
            if not names:
                counts["images_without_objects"] += 1
                continue
            if len(names) == 1:
                single[split].append((image_id, label_of[names.pop()], size, [b for _, b in objects]))
                continue
            area: Counter[str] = Counter()
            for name, (x0, y0, x1, y1) in objects:
                area[name] += (x1 - x0 + 1) * (y1 - y0 + 1)
            top = max(sorted(area), key=area.__getitem__)
            splits["mixed"].add(image_id, label_of[top], size, [b for n, b in objects if n == top])
            mixed_names.append(image_id)
    if mixed_names:
        log.warning("%d image(s) with boxes of several classes left out of train/val/test and written "
                    "to the 'mixed' split: %s%s", len(mixed_names), ", ".join(mixed_names[:_MAX_LISTED]),
                    " ..." if len(mixed_names) > _MAX_LISTED else "")
    if counts["images_without_objects"]:
        log.warning("%d image(s) without objects left out", counts["images_without_objects"])

    if "val" in present:
        held: set[str] = set()
    else:
        per_class: dict[int, list[str]] = {}
        for image_id, label, _, _ in single["train"]:
            per_class.setdefault(label, []).append(image_id)
        held, too_small = _hold_out(per_class, val_per_class, seed)
        if too_small:
            raise DataError(f"{src / 'train'}: class(es) {', '.join(too_small)} have no more than "
                            f"--val-per-class {val_per_class} single-class images")
    for split, rows in single.items():
        for image_id, label, size, boxes in sorted(rows, key=lambda r: (r[1], _natural_key(r[0]))):
            target = "val" if image_id in held else split
            splits[target].add(image_id, label, size, boxes)
    if not splits["mixed"].ids:
        del splits["mixed"]
    check.report()
    counts.update({"classes": len(keys), "mixed_images": len(mixed_names),
                   "clipped_boxes": len(check.clipped)})
    options = {"val_per_class": val_per_class, "seed": seed, "strict_boxes": strict_boxes}
    return _write(out, "voc", src, options, splits, [(k, k) for k in keys], dict(counts), present)


# -- reuse and the command line --------------------------------------------------------------------

CONVERTERS = {"tiny-imagenet": prepare_tiny_imagenet, "voc": prepare_voc}


def ensure_prepared(kind: str, src: str | Path, out: str | Path, **options: Any) -> Path:
    """Convert ``src`` into ``out`` unless ``out`` already holds that conversion with these options."""
    if kind not in CONVERTERS:
        raise ConfigError(f"no converter for {kind!r}; valid: {', '.join(CONVERTERS)}")
    defaults = {"val_per_class": 10, "seed": 0, "strict_boxes": False}
    wanted = {**defaults, **options}
    manifest = read_manifest(out)
    if (manifest is not None and manifest.get("version") == VERSION and manifest.get("kind") == kind
            and manifest.get("source") == str(Path(src).resolve()) and manifest.get("options") == wanted):
        return Path(out)
    return CONVERTERS[kind](src, out, **wanted)
