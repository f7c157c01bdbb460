"""Per-image evaluation work spread over worker processes, with bounded memory.

Score maps stream in (from files or from a model); at most a few chunks per worker are in flight,
so evaluating 50,000 maps never holds them all in memory. Workers are started with ``spawn`` (no
inherited OpenCV or OpenMP thread state; torch is never imported in them) and take about 0.3 s each
to start. As with any ``spawn`` pool, a script that asks for ``workers > 1`` must keep its top-level
code under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

CHUNK = 16
_IN_FLIGHT_PER_WORKER = 4


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core; OpenCV's own threads would only compete


def _run_chunk(fn: Callable[[Any], Any], chunk: list) -> list:
    return [fn(item) for item in chunk]


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int = 1,
                chunk: int = CHUNK) -> Iterator[R]:
    """``map(fn, items)`` in order, in ``workers`` processes when ``workers > 1``.

    Args:
        fn: a module-level function (it is pickled by reference).
        items: any iterable; consumed lazily.
        workers: process count; 1 runs in this process.
        chunk: items per task.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    iterator = iter(items)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker) as pool:
        pending: deque[Future] = deque()
        while True:
            while len(pending) < workers * _IN_FLIGHT_PER_WORKER:
                batch = list(islice(iterator, chunk))
                if not batch:
                    break
                pending.append(pool.submit(_run_chunk, fn, batch))
            if not pending:
                return
            yield from pending.popleft().result()
