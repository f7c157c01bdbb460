"""A small procedural WSOL data set with boxes and masks, written in the WSOL metadata format.

Each image shows one object on a cluttered background. The class decides the object's shape
(ellipse, rectangle, triangle, star, cross, diamond, ring, hexagon; classes past eight reuse the
shapes) *and* its texture (a striped pattern with a class-specific hue, stripe angle and period).
The object is placed at a random position, scale (30-65 % of the image side) and rotation, so the
class evidence sits at a different place in every image: a classifier must look at the object, CAM
localization is learnable, and MaxBoxAcc / PxAP measure something. The background is a smooth
random colour field with small flat-coloured distractors (discs, bars, squares) that carry no class
information, plus pixel noise.

Layout under ``root`` (the image root and the mask root are ``root`` itself)::

    images/<split>/<class>/<split>_<i>.jpg         JPEG, quality 90
    masks/<split>/<class>/<split>_<i>.png          object mask, 0/255
    masks/<split>/<class>/<split>_<i>_ignore.png   a thin band around the object (ambiguous pixels)
    metadata/<split>/...                           boxes (the tight box of the mask, inclusive)
    metadata-masks/<split>/...                     masks, OpenImages-style (``--metadata-root``)
    classes.txt                                    ``<key>\\t<name>`` per class, in label order
    synthetic.json                                 the parameters; written last, marks a complete set

Every image is a function of ``(seed, split, class, i)`` only, so a set is reproducible bit for bit
and enlarging one split does not change the others. ``make_synthetic`` reuses a complete set made
with the same parameters and refuses (naming the differences) a folder that holds a set made with
other ones: a prepared folder is never deleted or rewritten. It builds into a temporary sibling folder
and renames it into place, so concurrent callers (e.g. the ranks of a distributed run) do not collide.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from mmcam_fast.data.metadata import write_metadata
from mmcam_fast.errors import ConfigError, DataError

SHAPES = ("ellipse", "rectangle", "triangle", "star", "cross", "diamond", "ring", "hexagon")
SPLITS = ("train", "val", "test")
MANIFEST = "synthetic.json"
_VERSION = 1  # bump when the drawing changes, so cached sets are regenerated
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def class_names(num_classes: int) -> list[str]:
    """Names of the synthetic classes: the shape, with a texture number past the eighth class."""
    return [SHAPES[k % len(SHAPES)] + (f"-{k // len(SHAPES)}" if k >= len(SHAPES) else "")
            for k in range(num_classes)]


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    pixel = np.array([[[h * 179.0, s * 255.0, v * 255.0]]], dtype=np.float32).round().astype(np.uint8)
    return cv2.cvtColor(pixel, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255.0


def _shape_mask(kind: str, size: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """A 0/1 mask of one shape centred at (cx, cy) with outer radius ``radius``, rotated by ``angle``."""
    mask = np.zeros((size, size), np.uint8)

    def polygon(radii: list[float]) -> np.ndarray:
        k = len(radii)
        t = angle + 2 * math.pi * np.arange(k) / k
        points = np.stack([cx + np.array(radii) * np.cos(t), cy + np.array(radii) * np.sin(t)], axis=1)
        return np.round(points).astype(np.int32)

    if kind == "ellipse":
        cv2.ellipse(mask, (round(cx), round(cy)), (round(radius), round(radius * 0.6)),
                    math.degrees(angle), 0, 360, 1, -1)
    elif kind == "ring":
        cv2.circle(mask, (round(cx), round(cy)), round(radius), 1, -1)
        cv2.circle(mask, (round(cx), round(cy)), round(radius * 0.5), 0, -1)
    elif kind == "rectangle":
        corners = cv2.boxPoints(((cx, cy), (1.6 * radius, radius), math.degrees(angle)))
        cv2.fillPoly(mask, [np.round(corners).astype(np.int32)], 1)
    elif kind == "triangle":
        cv2.fillPoly(mask, [polygon([radius] * 3)], 1)
    elif kind == "star":
        cv2.fillPoly(mask, [polygon([radius, radius * 0.45] * 5)], 1)
    elif kind == "diamond":
        cv2.fillPoly(mask, [polygon([radius, radius * 0.55] * 2)], 1)
    elif kind == "hexagon":
        cv2.fillPoly(mask, [polygon([radius] * 6)], 1)
    elif kind == "cross":
        arm = max(1, round(radius * 0.35))
        bar = cv2.boxPoints(((cx, cy), (2 * radius, 2 * arm), math.degrees(angle)))
        cv2.fillPoly(mask, [np.round(bar).astype(np.int32)], 1)
        bar = cv2.boxPoints(((cx, cy), (2 * radius, 2 * arm), math.degrees(angle) + 90))
        cv2.fillPoly(mask, [np.round(bar).astype(np.int32)], 1)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(kind)
    return mask


def _texture(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The class texture: stripes with a class-specific hue, angle and period (random phase)."""
    hue = (label * 0.618034) % 1.0
    theta = math.radians((label * 47) % 180)
    period = 3.0 + (label % 3) * 1.5
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    wave = 0.5 + 0.5 * np.sin(2 * math.pi * (x * math.cos(theta) + y * math.sin(theta)) / period
                              + rng.uniform(0, 2 * math.pi))
    dark, light = _hsv_to_rgb(hue, 0.9, 0.45), _hsv_to_rgb(hue, 0.7, 1.0)
    return dark + (light - dark) * wave[..., None]


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth, desaturated random colour field with a few flat-coloured distractors."""
    coarse = rng.uniform(0.15, 0.85, size=(4, 4, 3)).astype(np.float32)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    field = 0.5 * field + 0.5 * field.mean(axis=2, keepdims=True)
    canvas = np.ascontiguousarray(np.clip(field, 0, 1))
    for _ in range(rng.integers(3, 7)):
        colour = tuple(float(c) for c in rng.uniform(0, 1, 3))
        x, y = (int(v) for v in rng.integers(0, size, 2))
        extent = max(1, int(rng.integers(size // 32 + 1, size // 8 + 2)))
        kind = rng.integers(3)
        if kind == 0:
            cv2.circle(canvas, (x, y), extent, colour, -1)
        elif kind == 1:
            x2, y2 = (int(v) for v in rng.integers(0, size, 2))
            cv2.line(canvas, (x, y), (x2, y2), colour, max(1, extent // 3))
        else:
            cv2.rectangle(canvas, (x, y), (x + extent, y + extent), colour, -1)
    return canvas


def render_sample(seed: int, split: str, label: int, index: int, size: int
                  ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """One image: ``(rgb uint8 [size, size, 3], mask uint8 0/1, box (x0, y0, x1, y1) inclusive)``."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], label, index])
    kind = SHAPES[label % len(SHAPES)]
    radius = rng.uniform(0.15, 0.325) * size  # the object spans 30-65 % of the side
    margin = radius + 1
    cx, cy = rng.uniform(margin, size - 1 - margin, size=2)
    mask = _shape_mask(kind, size, cx, cy, radius, rng.uniform(0, 2 * math.pi))
    object_pixels = mask[..., None].astype(np.float32)
    image = _background(size, rng) * (1 - object_pixels) + _texture(label, size, rng) * object_pixels
    image = image + rng.normal(0, 0.03, size=image.shape).astype(np.float32)
    rgb = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    return rgb, mask, box


def _params(num_classes: int, train_per_class: int, val_per_class: int, test_per_class: int,
            size: int, seed: int) -> dict[str, Any]:
    return {"version": _VERSION, "num_classes": num_classes, "train_per_class": train_per_class,
            "val_per_class": val_per_class, "test_per_class": test_per_class, "size": size, "seed": seed}


def synthetic_parameters(root: str | Path) -> dict[str, Any] | None:
    """The keyword arguments of :func:`make_synthetic` that made the set in ``root`` (None: no set)."""
    params = _read_manifest(Path(root))
    if params is None:
        return None
    return {k: v for k, v in params.items() if k != "version"}


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _generate(folder: Path, params: dict[str, Any]) -> None:
    names = class_names(params["num_classes"])
    size, seed = params["size"], params["seed"]
    ignore_kernel = np.ones((5, 5), np.uint8)
    for split in SPLITS:
        count = params[f"{split}_per_class"]
        ids: list[str] = []
        labels: dict[str, int] = {}
        sizes: dict[str, tuple[int, int]] = {}
        boxes: dict[str, list[tuple[int, int, int, int]]] = {}
        masks: dict[str, list[str]] = {}
        ignores: dict[str, str] = {}
        for label, name in enumerate(names):
            (folder / "images" / split / name).mkdir(parents=True, exist_ok=True)
            (folder / "masks" / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rgb, mask, box = render_sample(seed, split, label, i, size)
                stem = f"{split}/{name}/{split}_{i:04d}"
                image_id = f"images/{stem}.jpg"
                Image.fromarray(rgb).save(folder / image_id, quality=90)
                Image.fromarray(mask * 255).save(folder / "masks" / f"{stem}.png")
                ignore = cv2.dilate(mask, ignore_kernel) - mask  # the band just outside the object
                Image.fromarray(ignore * 255).save(folder / "masks" / f"{stem}_ignore.png")
                ids.append(image_id)
                labels[image_id] = label
                sizes[image_id] = (size, size)
                boxes[image_id] = [box]
                masks[image_id] = [f"masks/{stem}.png"]
                ignores[image_id] = f"masks/{stem}_ignore.png"
        write_metadata(folder / "metadata" / split, ids, labels, sizes, boxes=boxes)
        write_metadata(folder / "metadata-masks" / split, ids, labels, sizes, mask_paths=masks,
                       ignore_paths=ignores)
    (folder / "classes.txt").write_text("".join(f"{n}\t{n}\n" for n in names))
    (folder / MANIFEST).write_text(json.dumps(params, indent=2) + "\n")


def make_synthetic(root: str | Path, *, num_classes: int = 4, train_per_class: int = 100,
                   val_per_class: int = 20, test_per_class: int = 20, size: int = 64,
                   seed: int = 0) -> Path:
    """Generate the synthetic WSOL set into ``root``, or reuse the one already there.

    Args:
        root: the data folder (image root and mask root; metadata under ``root/metadata``).
        num_classes: number of classes (1 to 64).
        train_per_class, val_per_class, test_per_class: images per class of each split.
        size: image side in pixels (at least 32).
        seed: the seed every image is derived from.

    Returns:
        ``root`` as a Path.

    Raises:
        ConfigError: parameters out of range.
        DataError: ``root`` exists, is not empty and was not made by this function, or holds a
            synthetic set made with other parameters.
    """
    if not 1 <= num_classes <= 64:
        raise ConfigError(f"synthetic data: num_classes must be in 1..64, got {num_classes}")
    if size < 32:
        raise ConfigError(f"synthetic data: image size must be at least 32, got {size}")
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    if min(counts.values()) < 1:
        raise ConfigError(f"synthetic data: every split needs at least one image per class, got {counts}")
    root = Path(root)
    params = _params(num_classes, train_per_class, val_per_class, test_per_class, size, seed)
    existing = _read_manifest(root)
    if existing == params:
        return root
    if existing is not None:
        differences = ", ".join(f"{key} {existing.get(key)!r} there, {value!r} asked"
                                for key, value in params.items() if existing.get(key) != value)
        raise DataError(f"{root}: holds a synthetic set made with other parameters ({differences}); it is "
                        "never rewritten: choose another --data-root (or --out), or delete the folder")
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root}: not empty and holds no {MANIFEST}; the synthetic set is only written "
                        "into an empty folder (choose another --data-root)")

    root.parent.mkdir(parents=True, exist_ok=True)
    building = root.parent / f".{root.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _generate(building, params)
        if root.exists() and _read_manifest(root) == params:  # someone else finished first
            return root
        if root.exists() and _read_manifest(root) is not None:  # a concurrent caller, other parameters
            raise DataError(f"{root}: another process wrote a synthetic set with other parameters")
        if root.exists():  # an empty folder
            old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(root, old)
            except FileNotFoundError:  # a concurrent caller moved it already
                old = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(building, root)
        except OSError:
            if _read_manifest(root) != params:  # lost a race to a different request
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return root
