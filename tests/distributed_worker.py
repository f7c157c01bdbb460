"""A torchrun worker for the distributed tests: the train entry point, then this rank's final state.

``torchrun ... tests/distributed_worker.py <train flags>`` trains as ``python -m mmcam_fast.train``
would, then writes ``<out>/final-rank<R>.pt`` (the rank's model and optimizer state), so a test can
compare the ranks' replicas. With ``MMCAM_TEST_KILL_AT_STEP=k``, rank 1 of the first attempt
(``TORCHELASTIC_RESTART_COUNT=0``) kills itself with SIGKILL as step k begins: a hard failure for
torchrun's ``--max-restarts`` to recover from.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from mmcam_fast import training
from mmcam_fast.cli import run_main
from mmcam_fast.cli.train import main as train_main
from mmcam_fast.models import unwrap

RANK = int(os.environ.get("RANK", "0"))
KILL_AT_STEP = int(os.environ.get("MMCAM_TEST_KILL_AT_STEP", "0"))
FIRST_ATTEMPT = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
_trainers: list[training.Trainer] = []


class _RecordingTrainer(training.Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps_here = 0
        _trainers.append(self)

    def train_step(self, images, labels):
        self.steps_here += 1
        if KILL_AT_STEP and self.steps_here == KILL_AT_STEP and RANK == 1 and FIRST_ATTEMPT:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().train_step(images, labels)


def main(argv: list[str] | None) -> None:
    training.Trainer = _RecordingTrainer
    result = train_main(argv)  # the entry point itself: rank 0 alone prints the summary line
    trainer = _trainers[-1]
    torch.save({"model": unwrap(trainer.model).state_dict(), "optimizer": trainer.optimizer.state_dict(),
                "steps": result.steps, "resumed_at": result.resumed_at},
               Path(result.run_dir) / f"final-rank{RANK}.pt")


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
