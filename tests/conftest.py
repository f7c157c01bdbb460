"""Shared fixtures: one short training run on generated data, reused by the CLI tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A 2-epoch, 4-step MinMaxCAM run (reference step) on the synthetic set: its run folder."""
    from mmcam_fast.cli.train import main

    out = tmp_path_factory.mktemp("run")
    data_root = tmp_path_factory.mktemp("data") / "synthetic"
    main(["--data", "synthetic", "--data-root", str(data_root), "--backbone", "resnet18",
          "--epochs", "2", "--max-steps-per-epoch", "2", "--workers", "0", "--out", str(out),
          "--log-every", "3", "--sets-per-batch", "2", "--set-size", "3", "--impl", "reference"])
    return out


@pytest.fixture(scope="session")
def shared_data():
    """The project's real data folder (``$MMCAM_SHARED_DATA``, else ``../shared/data`` of the checkout)."""
    from shared_data import shared_data_dir

    return shared_data_dir()
