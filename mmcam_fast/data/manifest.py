"""The prepared-folder format: ``prepared.json`` (what was converted, with which options) and
``classes.txt`` (one class per line in label order), written by :mod:`mmcam_fast.data.converters` and
read by the loaders, the evaluator and the studies; and the ``--classes`` list files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmcam_fast.data.synthetic import MANIFEST as SYNTHETIC_MANIFEST
from mmcam_fast.errors import DataError

MANIFEST = "prepared.json"
CLASSES_FILE = "classes.txt"
VERSION = 1  # of prepared.json: a folder of another version is converted again


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The ``prepared.json`` of a converted folder, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def prepared_kind(data_root: str | Path) -> str | None:
    """The data set a folder was prepared as (``prepared.json``'s kind, or synthetic), or None."""
    manifest = read_manifest(data_root)
    if manifest is not None and manifest.get("kind"):
        return str(manifest["kind"])
    if (Path(data_root) / SYNTHETIC_MANIFEST).is_file():
        return "synthetic"
    return None


def find_class_names(folders: list[Path | None]) -> list[str] | None:
    """The class names of the first folder holding a ``classes.txt``, or None."""
    for folder in folders:
        if folder is not None and (folder / CLASSES_FILE).is_file():
            return read_class_names(folder / CLASSES_FILE)
    return None


def read_class_names(path: str | Path) -> list[str]:
    """The readable class names of a ``classes.txt`` (``<key>\\t<name>`` or one name per line)."""
    names = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            names.append(line.split("\t", 1)[-1].strip())
    return names


def read_class_list(path: str | Path) -> list[str]:
    """A ``--classes`` file: one wnid per line (blank lines and ``#`` comments ignored), sorted."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"--classes {path}: cannot read the file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise DataError(f"--classes {path}: not UTF-8 text") from None
    wnids = [line.split("#")[0].strip() for line in lines]
    wnids = [w for w in wnids if w]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"--classes {path}: expected distinct class ids, one per line")
    return sorted(wnids)
