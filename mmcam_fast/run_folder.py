"""A training run's folder (``--out``): checked before any data work, locked while a process writes it,
and never overwritten without being asked.

- ``--out`` must be a folder that can be created and written; a file, or a path that cannot be made,
  is one clear error before the data set is read.
- A folder that already holds a run (its ``config.yaml``, logs or checkpoints) is refused unless the
  run is continued (``--resume``) or explicitly started over (``--overwrite``, which removes only the
  run's own files: the logs, the final metrics, ``curves.png`` and ``checkpoints/``).
- One process at a time: ``<out>/.lock`` is held with ``flock`` for the life of the run and holds the
  writer's pid and host. A second process is refused, naming the first one's pid; a lock left by a
  process that died is released by the kernel, so a stale lock file is detected and taken over.
- The JSON-lines logs hold every step once: a resumed run truncates them to the checkpoint it
  resumed from (a line cut short by a kill is dropped), and a run that starts afresh empties them.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmcam_fast.errors import ConfigError

LOCK_FILE = ".lock"
# The files a training run writes into its folder (beside checkpoints/).
LOG_FILES = ("metrics.jsonl", "val_metrics.jsonl")
RUN_FILES = ("config.yaml", *LOG_FILES, "final_metrics.json", "curves.png")
CHECKPOINTS = "checkpoints"


def check_output_folder(path: str | Path, flag: str = "--out") -> Path:
    """Create ``path`` (and its parents) if needed and check that files can be written into it.

    Raises:
        ConfigError: ``path`` is a file, cannot be created, or is not writable (naming the flag).
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder}: is a file, expected a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or exc
        raise ConfigError(f"{flag} {folder}: cannot create or write the folder ({reason})") from None
    return folder


def atomic_write(path: str | Path, write: Callable[[Any], None], *, binary: bool = True) -> Path:
    """``write(handle)`` into a temporary file beside ``path`` (``.<name>.*.tmp``), fsync, then
    ``os.replace`` onto ``path``: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a run's files are as readable as any other file
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(text), binary=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``<folder>/.lock``, held with ``flock`` by the process that writes the run folder."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self._fd: int | None = None
        self.stale: dict[str, Any] | None = None  # what a lock left by a dead process said

    def acquire(self, flag: str = "--out") -> RunLock:
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                host = f" on {holder['host']}" if holder.get("host") else ""
                who = f"pid {holder.get('pid', '?')}{host}"
                raise ConfigError(f"{flag} {self.path.parent}: another training process ({who}) is writing "
                                  "this run folder; wait for it to end or choose another --out") from None
            # The file may have been unlinked by its last holder between our open and our lock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = self._read(fd)
            if previous.get("pid"):
                self.stale = previous
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
            self._fd = fd
            return self
        raise ConfigError(f"{flag} {self.path.parent}: could not take the run folder's lock")

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            data = os.pread(fd, 4096, 0)
            value = json.loads(data.decode() or "{}")
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    def describe_stale(self) -> str | None:
        """A note about a lock file left by a process that no longer holds it, if there was one."""
        if not self.stale:
            return None
        pid = self.stale.get("pid")
        here = self.stale.get("host") in (None, socket.gethostname())
        state = "no longer running" if here and isinstance(pid, int) and not _pid_alive(pid) else "gone"
        return f"a stale lock of pid {pid} ({state}) was taken over"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def run_files(folder: Path) -> list[str]:
    """The files of a training run that ``folder`` holds (empty: no run there)."""
    found = [name for name in RUN_FILES if (folder / name).exists()]
    checkpoints = folder / CHECKPOINTS
    if checkpoints.is_dir():
        found += [f"{CHECKPOINTS}/{p.name}" for p in sorted(checkpoints.glob("*.pt"))]
    return found


def clear_run(folder: Path) -> None:
    """``--overwrite``: remove the run's own files from ``folder`` (nothing else in it)."""
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / CHECKPOINTS, ignore_errors=True)


def keep_lines(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite a JSON-lines log with the rows ``keep`` accepts. A line cut short (a process killed
    while writing it) is dropped. Atomic: a kill during the rewrite leaves the old file."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and keep(row):
            rows.append(json.dumps(row))
    atomic_write_text(path, "".join(row + "\n" for row in rows))


def open_run_folder(out: str | Path, *, resume: str | None, overwrite: bool) -> RunLock:
    """Check ``--out``, take its lock, and apply the run-folder rules above (rank 0 only).

    Returns the held lock (release it when the run ends).

    Raises:
        ConfigError: ``--out`` unusable, locked by another process, or holding a run that neither
            ``--resume`` nor ``--overwrite`` was given for.
    """
    if resume is not None and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: continue the run or start it over")
    folder = check_output_folder(out)
    lock = RunLock(folder).acquire()
    try:
        existing = run_files(folder)
        if existing and resume is None:
            if not overwrite:
                shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
                raise ConfigError(f"--out {folder}: already holds a run ({shown}); continue it with "
                                  "--resume auto, start it over with --overwrite, or choose another --out")
            clear_run(folder)
    except BaseException:
        lock.release()
        raise
    return lock


def start_afresh(folder: Path) -> None:
    """A run that starts from step 0 in a folder (``--resume auto`` found no checkpoint): the logs of
    the attempt that left no checkpoint are emptied, so every step is logged once."""
    for name in (*LOG_FILES, "final_metrics.json", "curves.png"):
        (folder / name).unlink(missing_ok=True)
