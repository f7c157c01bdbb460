"""Loader throughput, torchvision DataLoader against the DALI CPU pipeline, in one run.

    pytest benchmarks/test_bench_loaders.py --benchmark-only
    python benchmarks/test_bench_loaders.py          # prints the table and the ratios

Training epochs of the set sampler with the protocol's train transform (resize, random crop, flips,
normalize) on the real fruit-voc photographs (train split, 191 images, 166x160 to 2569x4605, at 224;
three epochs) and tiny-imagenet-5 (2450 training images of 64x64, at 64; one epoch). Every loader
gets the same budget of two workers: two DataLoader worker processes, or two DALI threads (plus, for
``dali-parallel``, two spawned Python processes reading the files; ``dali-inline`` reads them in the
loader's process, the default for CPU decoding). The loader is started and its first batch taken
before the clock starts; that start is reported apart. The machine is shared: the load average is
printed with the table.
"""

from __future__ import annotations

import sys  # noqa: I001 - the tests' data helpers (tests/) must be importable first
from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "tests"))

import logging
import os
import tempfile
import time
from functools import cache
from pathlib import Path

import pytest
from shared_data import shared_data_dir  # noqa: E402

from mmcam_fast.data.converters import prepare_voc
from mmcam_fast.data.dali import dali_available
from mmcam_fast.data.loaders import build_loader
from mmcam_fast.data.splits import DataSplits, build_datasets, set_batch_sampler

DATA = shared_data_dir()
WORKERS = 2
CASES = {"fruit-voc": (224, 3, 5, 3), "tiny-imagenet-5": (64, 5, 5, 1)}  # size, N sets, S images, epochs
LOADERS = {"torch": {"backend": "torch"},
           "dali-parallel": {"backend": "dali", "decode_device": "cpu", "parallel": True},
           "dali-inline": {"backend": "dali", "decode_device": "cpu", "parallel": False}}
_CACHE = Path(tempfile.mkdtemp(prefix="mmcam-bench-loaders-"))


@cache
def data(name: str) -> DataSplits:
    size = CASES[name][0]
    logging.getLogger("mmcam_fast.prepare").setLevel(logging.ERROR)
    if name == "fruit-voc":
        return build_datasets("voc", prepare_voc(DATA / "fruit-voc", _CACHE / "fruit"), image_size=size)
    return build_datasets("tiny-imagenet", DATA / "tiny-imagenet-5", cache_root=_CACHE, image_size=size)


def started(name: str, loader_name: str):
    """A loader over one epoch, started, with its first batch taken; and how long that took."""
    splits = data(name)
    _, sets, per_set, _ = CASES[name]
    sampler = set_batch_sampler(splits.train, sets_per_batch=sets, set_size=per_set, seed=0)
    start = time.perf_counter()
    loader, steps = build_loader(splits.train, batch_sampler=sampler, workers=WORKERS, seed=0,
                                 **LOADERS[loader_name])
    iterator = iter(loader)
    first = next(iterator)
    return loader, iterator, len(first[1]), steps, time.perf_counter() - start


def run(loader, iterator, epochs: int) -> int:
    """The rest of the first epoch, then ``epochs - 1`` more; the number of images."""
    images = sum(len(batch[1]) for batch in iterator)
    for epoch in range(1, epochs):
        loader.set_epoch(epoch)
        images += sum(len(batch[1]) for batch in loader)
    return images


@pytest.mark.parametrize("loader_name", list(LOADERS))
@pytest.mark.parametrize("name", list(CASES))
def test_train_epoch(benchmark, name, loader_name):
    if loader_name != "torch" and not dali_available():
        pytest.skip("nvidia-dali is not installed")
    epochs = CASES[name][3]
    benchmark.group = f"{name}: {epochs} train epoch(s), {WORKERS} workers"
    loader, iterator, first, steps, startup = started(name, loader_name)
    images = benchmark.pedantic(run, args=(loader, iterator, epochs), rounds=1, iterations=1)
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update({"images": images, "images_per_second": round(images / seconds, 1),
                                 "startup_s": round(startup, 2)})
    assert images == (steps * epochs - 1) * first
    if hasattr(loader, "close"):
        loader.close()


def main() -> None:
    print(f"load average before: {os.getloadavg()}")
    rows = []
    for name in CASES:
        rates = {}
        for loader_name in LOADERS:
            if loader_name != "torch" and not dali_available():
                continue
            loader, iterator, first, steps, startup = started(name, loader_name)
            start = time.perf_counter()
            images = run(loader, iterator, CASES[name][3])
            rates[loader_name] = images / (time.perf_counter() - start)
            rows.append(f"| {name} | {loader_name} | {images} | {rates[loader_name]:.0f} | {startup:.1f} |")
            if hasattr(loader, "close"):
                loader.close()
        for loader_name, rate in rates.items():
            if loader_name != "torch":
                rows.append(f"| {name} | {loader_name} / torch | | {rate / rates['torch']:.2f}x | |")
    print("| data | loader | images | images/s | start (s) |\n| --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
