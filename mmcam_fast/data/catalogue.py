"""The data sets by name, in one place: the ``--data`` names (the config's ``DataName``), which of
them are the protocol's benchmarks and the metadata folder each benchmark's files sit in."""

from __future__ import annotations

from mmcam_fast.config import DATA_NAMES

# --data name -> the benchmark's folder in the WSOL metadata (wsolevaluation's layout)
BENCHMARK_FOLDERS = {"cub": "CUB", "imagenet": "ILSVRC", "openimages": "OpenImages"}
# data sets converted into the metadata format by mmcam_fast.prepare (or generated)
PREPARED_DATA = tuple(name for name in DATA_NAMES if name not in BENCHMARK_FOLDERS)

__all__ = ["BENCHMARK_FOLDERS", "DATA_NAMES", "PREPARED_DATA"]
