"""Nothing of one machine is tracked: no symlinks, no absolute home/workspace paths, no environments."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Absolute paths that exist on one machine only: home folders, workspace and cache roots. Written in
# pieces so that this file does not match itself.
_MACHINE_PATH = re.compile("(?<![\\w.])/(?:" + "|".join(["ro" + "ot/", "ho" + "me/", "wo" + "rk/",
                                                         "tmp/" + "bash_jobs", "Users/"]) + ")")
# Text files that may quote a machine path as an example of what the check rejects: none today.
_ALLOWED: set[str] = set()


def _tracked() -> list[tuple[str, str]]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (the check runs on the repository)")
    out = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True)
    rows = []
    for line in out.stdout.splitlines():
        meta, path = line.split("\t", 1)
        rows.append((meta.split()[0], path))
    return rows


def test_no_symlinks_are_tracked():
    links = [path for mode, path in _tracked() if mode == "120000"]
    assert links == [], f"tracked symlinks (mode 120000): {links}"


def test_no_environment_or_build_folder_is_tracked():
    bad = [path for _, path in _tracked()
           if re.match(r"(\.venv|venv|runs|build|\.benchmarks)(/|$)", path) or "__pycache__" in path]
    assert bad == []


def test_no_absolute_machine_paths_in_tracked_text():
    hits = []
    for mode, path in _tracked():
        if mode == "120000" or path in _ALLOWED:
            continue
        data = (ROOT / path).read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (PNG, checkpoints)
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if _MACHINE_PATH.search(line):
                hits.append(f"{path}:{number}: {line.strip()[:100]}")
    assert hits == [], "machine-specific paths:\n" + "\n".join(hits)


def test_the_pattern_catches_what_it_is_for():
    for text in ["/ro" + "ot/.cache/mmcam-ci/venv", "see /wo" + "rk/shared/data", "/ho" + "me/me/x"]:
        assert _MACHINE_PATH.search(text), text
    for text in ["../shared/data", "runs/demo", "https://example.org/home/x", "/data/ILSVRC"]:
        assert not _MACHINE_PATH.search(text), text


def test_the_specification_is_in_the_repository_and_the_library_cites_it():
    """Code cited ``METHOD.md`` of a folder users do not have; it cites ``docs/method.md`` now, and
    library code finds no data through ``../shared``."""
    assert (ROOT / "docs" / "method.md").is_file()
    offenders = []
    for path in sorted([*(ROOT / "mmcam_fast").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]):
        text = path.read_text()
        if "../shared" in text or "METHOD.md" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
    cited = [p for p in (ROOT / "mmcam_fast").rglob("*.py") if "docs/method.md" in p.read_text()]
    assert cited, "the method module cites its specification"
