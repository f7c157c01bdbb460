"""Per-image evaluation work spread over threads or worker processes, with bounded memory.

Score maps stream in (from files or from a model); at most a few chunks per worker are in flight,
so evaluating 50,000 maps never holds them all in memory.

- Threads (``threads > 1``): the box evaluator's kernels are numba functions that release the GIL,
  and OpenCV releases it too, so images are evaluated in parallel with no start-up cost and
  nothing pickled. What stays serial is the per-image Python glue (a small part of the time).
- Processes (``processes > 1``): for work that holds the GIL (PNG decoding of masks in Python,
  many-core machines where the glue would serialize threads). Started with ``spawn`` (no inherited
  OpenCV or OpenMP thread state; torch is never imported in them); each takes about 0.3 s to start.
  As with any ``spawn`` pool, a script that asks for ``processes > 1`` must keep its top-level code
  under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from itertools import islice
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

CHUNK = 16
_IN_FLIGHT_PER_WORKER = 4
_MAX_AUTO_THREADS = 8


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_threads(threads: int | None) -> int:
    """``None`` (auto): one thread per available core, at most 8; otherwise ``threads`` (>= 1)."""
    if threads is None:
        return max(1, min(available_cores(), _MAX_AUTO_THREADS))
    if threads < 1:
        raise ValueError(f"threads must be at least 1 (or None for one per core), got {threads}")
    return int(threads)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core; OpenCV's own threads would only compete


def _run_chunk(fn: Callable[[Any], Any], chunk: list) -> list:
    return [fn(item) for item in chunk]


def ordered_map(fn: Callable[[T], R], items: Iterable[T], processes: int = 1,
                chunk: int = CHUNK, threads: int = 1) -> Iterator[R]:
    """``map(fn, items)`` in order, in ``processes`` processes or ``threads`` threads.

    Args:
        fn: for processes, a module-level function (it is pickled by reference).
        items: any iterable; consumed lazily.
        processes: process count; takes precedence over ``threads`` when above 1.
        chunk: items per task.
        threads: thread count when ``processes`` is 1; 1 runs in the calling thread.
    """
    if processes > 1:
        context = multiprocessing.get_context("spawn")
        pool: Executor = ProcessPoolExecutor(max_workers=processes, mp_context=context,
                                             initializer=_init_worker)
        parallel = processes
    elif threads > 1:
        pool, parallel = ThreadPoolExecutor(max_workers=threads), threads
    else:
        yield from map(fn, items)
        return
    iterator = iter(items)
    with pool:
        pending: deque[Future] = deque()
        while True:
            while len(pending) < parallel * _IN_FLIGHT_PER_WORKER:
                batch = list(islice(iterator, chunk))
                if not batch:
                    break
                pending.append(pool.submit(_run_chunk, fn, batch))
            if not pending:
                return
            yield from pending.popleft().result()
