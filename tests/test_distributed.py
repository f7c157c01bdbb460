"""Data-parallel training on CPU (gloo): torchrun end to end, Stage II's averaged gradient, restarts.

Every process runs with one thread (``OMP_NUM_THREADS=1``): the ranks share two cores, and the same
thread count in every run keeps the CPU kernels' results bit-identical between runs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmcam_fast import distributed
from mmcam_fast.config import TrainConfig
from mmcam_fast.data.synthetic import make_synthetic
from mmcam_fast.engine import Trainer
from mmcam_fast.models import create_model

TESTS = Path(__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--monitor-interval", "0.2"]
STEPS_PER_EPOCH = 3
TRAIN_FLAGS = ["--data", "synthetic", "--backbone", "resnet18", "--feature-stride", "16",
               "--image-size", "32", "--epochs", "2", "--max-steps-per-epoch", str(STEPS_PER_EPOCH),
               "--sets-per-batch", "2",
               "--set-size", "3", "--impl", "reference", "--loader", "torch", "--workers", "0",
               "--log-every", "1", "--eval-every", "0", "--checkpoint-every", "2"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return make_synthetic(tmp_path_factory.getbasetemp() / "synthetic-shared")


def _torchrun(out: Path, data_root: Path, *launcher: str, env: dict[str, str] | None = None):
    command = [*TORCHRUN, *launcher, str(TESTS / "distributed_worker.py"), *TRAIN_FLAGS,
               "--data-root", str(data_root), "--out", str(out)]
    result = subprocess.run(command, env=env or _env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def _momentum(optimizer_state: dict) -> dict[str, torch.Tensor]:
    return {str(i): s["momentum_buffer"] for i, s in optimizer_state["state"].items()}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, synthetic_root):
    """An uninterrupted two-rank run: its folder."""
    out = tmp_path_factory.mktemp("ddp")
    result = _torchrun(out, synthetic_root)
    (out / "stdout.txt").write_text(result.stdout)
    return out


def test_under_torchrun_rank_0_alone_prints_the_summary_and_writes_run_files(ddp_run):
    """Every rank printed a summary line (rank 1's with ``"test": {}``), in racy order."""
    summaries = [json.loads(line) for line in (ddp_run / "stdout.txt").read_text().splitlines()
                 if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["test"]["images"] == 80
    written = sorted(str(p.relative_to(ddp_run)) for p in ddp_run.rglob("*") if p.is_file())
    assert written == ["checkpoints/last.pt", "config.yaml", "curves.png", "final-rank0.pt", "final-rank1.pt",
                       "final_metrics.json", "metrics.jsonl", "stdout.txt"]


def test_torchrun_two_ranks_end_with_identical_replicas_and_one_checkpoint(ddp_run):
    ranks = [_load(ddp_run / f"final-rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["steps"] == 2 * STEPS_PER_EPOCH
    assert _differences(ranks[0]["model"], ranks[1]["model"]) == []  # fc and backbone, buffers too
    assert _differences(_momentum(ranks[0]["optimizer"]), _momentum(ranks[1]["optimizer"])) == []
    # rank 0 alone writes: one checkpoint, one metrics file with one row per step
    assert sorted(p.name for p in (ddp_run / "checkpoints").iterdir()) == ["last.pt"]
    last = _load(ddp_run / "checkpoints" / "last.pt")
    assert (last["epoch"], last["step"], last["world_size"], len(last["rng"])) == (2, 6, 2, 2)
    assert _differences(last["model"], ranks[0]["model"]) == []
    rows = [json.loads(line) for line in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert json.loads((ddp_run / "final_metrics.json").read_text())["test"]["images"] == 80


def test_torchrun_max_restarts_resumes_to_the_uninterrupted_weights(ddp_run, tmp_path, synthetic_root):
    """Rank 1 is killed (SIGKILL) as step 3 begins; torchrun restarts both ranks, which continue from
    the checkpoint of step 2 and end bit-identical to the uninterrupted run."""
    result = _torchrun(tmp_path, synthetic_root, "--max-restarts", "1", env=_env(MMCAM_TEST_KILL_AT_STEP="3"))
    assert "exitcode: -9" in result.stderr  # the first attempt really died
    assert "resuming from" in result.stderr
    ranks = [_load(tmp_path / f"final-rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["resumed_at"] == ranks[1]["resumed_at"] == [2]
    uninterrupted = _load(ddp_run / "final-rank0.pt")
    for rank in ranks:
        assert _differences(rank["model"], uninterrupted["model"]) == []
        assert _differences(_momentum(rank["optimizer"]), _momentum(uninterrupted["optimizer"])) == []
    assert (tmp_path / "metrics.jsonl").read_text() == (ddp_run / "metrics.jsonl").read_text()


# -- Stage II under DDP, in two spawned gloo processes ------------------------------------------------

def _batch(num_sets: int = 4, set_size: int = 3, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(num_sets * set_size, 3, size, size, generator=generator)
    labels = torch.arange(num_sets).repeat_interleave(set_size)
    return images, labels


def _trainer() -> Trainer:
    torch.manual_seed(0)
    config = TrainConfig(set_size=3, sets_per_batch=2, lr=0.05, impl="reference")
    return Trainer(create_model("resnet18", 4), config)


def _rank_worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        trainer = _trainer()
        assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
        images, labels = _batch()
        shard = slice(6 * rank, 6 * rank + 6)  # two whole sets per rank
        trainer.stage2_step(images[shard], labels[shard])
        after_stage2 = trainer.model.module.state_dict()["fc.weight"].clone()
        # A non-finite loss on rank 1 only: both ranks skip both stages.
        poisoned = images[shard].clone()
        if rank == 1:
            poisoned[0, 0, 0, 0] = float("nan")
        before = {k: v.clone() for k, v in trainer.model.module.state_dict().items()}
        trainer.train_step(poisoned, labels[shard])
        unchanged = _differences(before, trainer.model.module.state_dict()) == []
        torch.save({"fc_after_stage2": after_stage2, "unchanged_after_nan": unchanged,
                    "skipped": trainer.guard.state_dict()["skipped"]}, Path(out) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_stage2_fc_gradient_is_averaged_over_ranks_and_nonfinite_skips_everywhere(tmp_path, one_thread):
    """Stage II runs the frozen backbone in eval mode, so its loss over the global batch is the mean
    of the ranks' losses: two ranks with two sets each must make the single-process step over all
    four sets (up to rounding), and make it identically on both ranks."""
    mp.start_processes(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    ranks = [_load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0]["fc_after_stage2"], ranks[1]["fc_after_stage2"])
    single = _trainer()
    before = single.model.fc.weight.detach().clone()
    single.stage2_step(*_batch())
    expected = single.model.fc.weight.detach()
    assert not torch.equal(expected, before)
    # fp32: two ranks' half-batch gradients averaged against one full-batch sum (another summation
    # order, ~1e-7 relative), then one SGD step
    torch.testing.assert_close(ranks[0]["fc_after_stage2"], expected, rtol=1e-5, atol=1e-7)
    assert [r["unchanged_after_nan"] for r in ranks] == [True, True]
    assert [r["skipped"] for r in ranks] == [1, 1]


def test_device_and_sync_bn_errors_name_the_flag(monkeypatch):
    from mmcam_fast import distributed
    from mmcam_fast.errors import ConfigError

    with pytest.raises(ConfigError, match="--sync-bn needs CUDA"):
        Trainer(create_model("resnet18", 3), TrainConfig(impl="reference", sync_bn=True))
    with pytest.raises(ConfigError, match="--device 'gpu0' is not a device"):
        distributed.init("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device cuda: CUDA is not available"):
        distributed.init("cuda")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        distributed.init("cpu")
    assert distributed.rank_seed(7, 0) == 7 and distributed.rank_seed(7, 1) != distributed.rank_seed(7, 2)


def _shutdown_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init("cpu", timeout_min=1)
    if rank == 1:  # rank 1 is slow to tear its group down; rank 0 serves the store
        destroy = dist.destroy_process_group

        def slow_destroy(*args, **kwargs):
            time.sleep(1.0)
            destroy(*args, **kwargs)
            Path(out, "rank1-destroyed").write_text(repr(time.time()))

        dist.destroy_process_group = slow_destroy
    distributed.shutdown()
    Path(out, f"rank{rank}-returned").write_text(repr(time.time()))


def test_clean_shutdown_lets_rank_0_return_only_after_every_rank_left(tmp_path):
    """Rank 0 serves the rendezvous store: it must outlive every rank's teardown, or a peer can
    abort at exit after a successful run."""
    mp.start_processes(_shutdown_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    rank1_destroyed = float((tmp_path / "rank1-destroyed").read_text())
    rank0_returned = float((tmp_path / "rank0-returned").read_text())
    assert rank0_returned >= rank1_destroyed
    assert not dist.is_initialized()
