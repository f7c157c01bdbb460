"""A training run end to end: data, model, trainer, per-epoch validation, checkpoints, final test.

One process, or one per GPU under ``torchrun`` (:mod:`mmcam_fast.distributed`): every rank draws its
own N sets of S images per step from the shared set sampler, so a set never spans ranks and the
global batch is G x N x S. Rank 0 alone writes files: the config, the metrics (averaged over the
ranks), the validation results and the checkpoints.

Checkpoints (``<out>/checkpoints``): ``last.pt`` at the end of every epoch and every
``--checkpoint-every`` steps, ``best.pt`` when the validation score improves. Each holds the
unwrapped model, optimizer, scheduler, scaler, the non-finite counters, the data loader's position,
epoch and step, the config, the validation history and every rank's RNG states, so that a resumed
run (``--resume``) continues with the very batches, augmentations and weights the uninterrupted run
would have had (bit for bit on CPU with ``--workers 0`` or the DALI loader).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mmcam_fast import distributed
from mmcam_fast.checkpoint import (
    atomic_save,
    check_finite,
    load_checkpoint,
    remove_partial,
    resolve_resume,
    restore_rng,
    rng_state,
)
from mmcam_fast.config import TrainConfig, default_run_folder
from mmcam_fast.console import format_validation
from mmcam_fast.curves import write_curves
from mmcam_fast.data.loaders import build_loader
from mmcam_fast.data.splits import build_datasets, check_decodable, set_batch_sampler
from mmcam_fast.engine import PRECISION_NAMES, Trainer
from mmcam_fast.errors import ConfigError
from mmcam_fast.localization import evaluate_localization
from mmcam_fast.metric_log import MetricLog
from mmcam_fast.models import create_model, unwrap
from mmcam_fast.run_folder import atomic_write_text, keep_lines, open_run_folder, start_afresh

# Val and test splits up to this many images are decoded once before the first step, so an
# unreadable one stops the run before any training time is spent (larger splits: at evaluation).
DECODE_CHECK_MAX_IMAGES = 5000

# Settings a run cannot change when it resumes: they define the model or the batch sequence.
_FIXED_ON_RESUME = ("data", "backbone", "feature_stride", "image_size", "vertical_flip", "flip_before_crop",
                    "set_size",
                    "sets_per_batch", "sample_with_replacement", "seed")


@dataclass
class RunResult:
    """What a finished run reports: where it wrote, how long it took, its last and final metrics."""

    run_dir: Path
    wall_time_s: float
    steps: int
    last_train: dict[str, float]
    val_history: list[dict[str, Any]] = field(default_factory=list)
    test_metrics: dict[str, Any] = field(default_factory=dict)
    skipped_steps: int = 0  # steps skipped for a non-finite loss
    resumed_at: list[int] = field(default_factory=list)  # steps this run was resumed from
    is_main: bool = True  # rank 0 (the process that reports; under torchrun the others stay quiet)

    def summary_line(self) -> str:
        return json.dumps({"run_dir": str(self.run_dir), "wall_time_s": round(self.wall_time_s, 1),
                           "steps": self.steps, "skipped_steps": self.skipped_steps,
                           "resumed_at": self.resumed_at, "train": self.last_train,
                           "test": self.test_metrics})


def eval_loader(config: TrainConfig) -> str:
    """Validation and test read images with torchvision (the protocol's own eval transform, so the
    numbers are the protocol's) unless ``--loader dali`` is asked for explicitly; ``auto`` means
    DALI for training only."""
    return "dali" if config.loader == "dali" else "torch"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class _Progress:
    """Where the run stands; saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    epoch_step: int = 0  # steps done in the current epoch (0 at an epoch boundary)
    step: int = 0  # steps done in all
    best_score: float = -1.0
    val_history: list[dict[str, Any]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)
    last_train: dict[str, Any] = field(default_factory=dict)  # the last logged step's metrics
    # wall seconds the run took up to this checkpoint, summed over the processes that ran it (a
    # resumed run's cost; the work lost after a process's last checkpoint is not counted, it is redone)
    elapsed_s: float = 0.0

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "epoch_step": self.epoch_step, "step": self.step,
                "best_score": self.best_score, "val_history": self.val_history, "resumed_at": self.resumed_at,
                "last_train": self.last_train, "elapsed_s": self.elapsed_s}


def train(config: TrainConfig) -> RunResult:
    """Train as ``config`` says; write config, metrics, checkpoints and final metrics to ``config.out``.

    Under torchrun with several processes, joins the process group (NCCL on GPUs, gloo on CPU) and
    leaves it at the end; every rank returns, rank 0's result carries the test metrics.
    """
    world, device = distributed.init(config.device, timeout_min=config.dist_timeout_min)
    try:
        return _Run(config, world, device).run()
    finally:
        distributed.shutdown()


def _note(message: str) -> None:
    print(f"mmcam_fast.train: {message}", file=sys.stderr, flush=True)


def _load_resume(resume: str | None, folder: Path) -> tuple[str, dict[str, Any]] | None:
    path = resolve_resume(resume, folder)
    if path is None:
        if resume == "auto":
            _note(f"--resume auto: no checkpoint in {folder}, starting from the beginning")
        return None
    return str(path), load_checkpoint(path, flag="--resume")


def _init_weights(model: torch.nn.Module, path: str) -> None:
    """``--init``: the model weights (backbone and fc) of another run's checkpoint, strictly.

    Only the weights: the optimizer, the schedule, the step count and the random streams start
    afresh (unlike ``--resume``). The checkpoint must hold the same architecture and classes.
    """
    state = load_checkpoint(path, flag="--init")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[:3]
        raise ConfigError(f"--init {path}: does not fit this model ({' '.join(first)}); expected a "
                          "checkpoint of the same backbone, feature-map size and number of classes") from None


class _Run:
    def __init__(self, config: TrainConfig, world: distributed.World, device: torch.device):
        self.config = config
        self.world = world
        self.device = device
        if config.out is None:
            config.out = default_run_folder(config.data, config.backbone)
        self.run_dir = Path(config.out)
        self.checkpoints = self.run_dir / "checkpoints"
        self.progress = _Progress()
        self._clock = (time.perf_counter(), 0.0)  # (this process's start, the processes' before it)
        self.lock = None

    def run(self) -> RunResult:
        try:
            return self._run()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _open_folder(self, resume: str | None) -> tuple[str, dict[str, Any]] | None:
        """Rank 0: check and lock ``--out``, apply the run-folder rules, find the checkpoint to resume."""
        self.lock = open_run_folder(self.run_dir, resume=resume, overwrite=self.config.overwrite)
        stale = self.lock.describe_stale()
        if stale:
            _note(f"{self.run_dir}: {stale}")
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        remove_partial(self.checkpoints)
        loaded = _load_resume(resume, self.checkpoints)
        if loaded is None:
            start_afresh(self.run_dir)
        return loaded

    def _check_inputs(self) -> None:
        """Files the run reads later, checked before any data work."""
        for flag, value in (("--pretrained", self.config.pretrained), ("--init", self.config.init)):
            if value and not Path(value).is_file():
                raise ConfigError(f"{flag} {value}: file not found")

    def _run(self) -> RunResult:
        config, world, device = self.config, self.world, self.device
        start = time.perf_counter()
        self._clock = (start, 0.0)
        seed_everything(config.seed)
        resume = config.resume
        if resume is None and distributed.restart_count() > 0:
            resume = "auto"  # a worker group restarted by torchrun continues, never starts over
        self._check_inputs()
        loaded = distributed.on_main(self._open_folder, resume)

        data = build_datasets(config.data, config.data_root, metadata_root=config.metadata_root,
                              image_size=config.image_size, vertical_flip=config.vertical_flip,
                              flip_before_crop=config.flip_before_crop,
                              bad_image_policy=config.bad_images)
        if world.is_main and len(data.val) + len(data.test) <= DECODE_CHECK_MAX_IMAGES:
            for split in (data.val, data.test):
                check_decodable(split)
        # Absolute roots in config.yaml and the checkpoints: evaluate --checkpoint works from anywhere.
        config.data_root = str(Path(data.data_root).resolve())
        config.metadata_root = str(Path(data.metadata_root).resolve())
        self._fit_sets_to_classes(data.num_classes)
        self.classes = data.class_names
        sampler = set_batch_sampler(data.train, sets_per_batch=config.sets_per_batch,
                                    set_size=config.set_size, seed=config.seed,
                                    replacement=config.sample_with_replacement, rank=world.rank,
                                    world_size=world.world_size)
        self.loader, steps_per_epoch = build_loader(
            data.train, batch_sampler=sampler, workers=config.workers, backend=config.loader,
            seed=distributed.rank_seed(config.seed, world.rank), rank=world.rank, world_size=world.world_size)
        if config.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)

        model = create_model(config.backbone, data.num_classes, feature_stride=config.feature_stride,
                             conv6_init=config.conv6_init, pretrained=config.pretrained)
        if config.init and loaded is None:  # a resumed run has its own weights
            _init_weights(model, config.init)
        model = model.to(device)
        # The weights above are the same on every rank; from here each rank has its own random streams.
        seed_everything(distributed.rank_seed(config.seed, world.rank))
        self.trainer = trainer = Trainer(model, config)
        model = unwrap(trainer.model)
        self.log = MetricLog(self.run_dir / "metrics.jsonl" if world.is_main else None, config.log_every,
                             reduce=distributed.mean_over_ranks)
        loader_state = self._restore(*loaded) if loaded is not None else None
        self.log.last = dict(self.progress.last_train)  # a resumed run reports the last logged step
        if world.is_main:
            config.save(self.run_dir / "config.yaml")

        progress = self.progress
        for epoch in range(progress.epoch, config.epochs):
            first = progress.epoch_step if loader_state is not None else 0
            if first:
                self.loader.load_state_dict(loader_state)  # the rest of the interrupted epoch
            else:
                self.loader.set_epoch(epoch)
            loader_state = None
            # a with-block: an error closes the bar (clearing its line) before the message is printed
            with tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{config.epochs}",
                      leave=False, dynamic_ncols=True, disable=not world.is_main) as bar:
                for images, labels, _ in islice(self.loader, max(0, steps_per_epoch - first)):
                    images = images.to(device, non_blocking=True)
                    labels = labels.to(device, non_blocking=True)
                    metrics = trainer.train_step(images, labels)
                    progress.step += 1
                    progress.epoch_step += 1
                    lr = trainer.optimizer.param_groups[0]["lr"]
                    if self.log.add({"step": progress.step, "epoch": epoch + 1, "lr": lr},
                                    {**metrics, "skipped": trainer.guard.last}):
                        trainer.guard.check(progress.step)
                        bar.set_postfix({k: f"{v:.4g}" for k, v in self.log.last.items()
                                         if k in ("ce", "acc", "crr", "frr")})
                    bar.update(1)
                    if (config.checkpoint_every and progress.step % config.checkpoint_every == 0
                            and progress.epoch_step < steps_per_epoch):
                        self._save({"last.pt": {}})
            trainer.scheduler.step()
            progress.epoch, progress.epoch_step = epoch + 1, 0
            self._end_of_epoch(data, model)

        self.log.flush()
        skipped = trainer.guard.check(progress.step)
        distributed.check_replicas_equal(model)
        distributed.broadcast_buffers(model)  # rank 0's statistics, the ones its checkpoints hold
        test_metrics: dict[str, Any] = {}
        if world.is_main:
            test_metrics = self._final_test(data, model)
        return RunResult(self.run_dir, time.perf_counter() - start, progress.step, self.log.last,
                         progress.val_history, test_metrics, skipped, progress.resumed_at, world.is_main)

    def _elapsed(self) -> float:
        """Wall seconds of this run so far: this process's and those of the processes before it."""
        start, before = self._clock
        return before + time.perf_counter() - start

    def _fit_sets_to_classes(self, num_classes: int) -> None:
        """A preset's N (sets per batch) above the data set's number of classes: use every class.

        Each set of a batch is a distinct class, so N cannot exceed the classes; a preset's N (12 for
        the voc preset, on a data set of 3 classes) becomes the number of classes, logged. An N given
        on the command line or in --config is kept, and the sampler's error names it.
        """
        config = self.config
        if num_classes >= config.sets_per_batch or "sets_per_batch" in getattr(config, "explicit", ()):
            return
        if self.world.is_main:
            _note(f"the data set has {num_classes} classes, fewer than the preset's --sets-per-batch "
                  f"{config.sets_per_batch}: using all {num_classes} (a batch of {num_classes} x "
                  f"{config.set_size} images)")
        config.sets_per_batch = num_classes
        if hasattr(config, "sources"):
            config.sources["sets_per_batch"] = f"fitted to the data set's {num_classes} classes"

    def _restore(self, path: str, state: dict[str, Any]) -> dict[str, Any] | None:
        """Load a checkpoint into the trainer; returns the loader state when it was taken mid-epoch."""
        saved = state["config"]
        changed = [f"{k}: {saved.get(k)!r} in the checkpoint, {getattr(self.config, k)!r} now"
                   for k in _FIXED_ON_RESUME if k in saved and saved[k] != getattr(self.config, k)]
        if changed:
            raise ConfigError(f"--resume {path}: the run cannot continue with other settings ("
                              + "; ".join(changed) + ")")
        try:
            self.trainer.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ConfigError(f"--resume {path}: does not fit this model and optimizer ({exc})") from None
        p = self.progress
        p.epoch, p.step = int(state["epoch"]), int(state["step"])
        p.epoch_step = int(state.get("epoch_step", 0))
        p.best_score = float(state.get("best_score", -1.0))
        p.val_history = list(state.get("val_history", []))
        p.resumed_at = [*state.get("resumed_at", []), p.step]
        p.last_train = dict(state.get("last_train", {}))
        self._clock = (self._clock[0], float(state.get("elapsed_s", 0.0)))
        rng = state.get("rng")
        if rng is not None and len(rng) == self.world.world_size:
            restore_rng(rng[self.world.rank], self.device)
        elif self.world.is_main:
            _note(f"{path} was written by {len(rng or [])} process(es), this run has "
                  f"{self.world.world_size}: random streams start afresh")
        if self.world.is_main:
            _note(f"resuming from {path}: epoch {p.epoch + 1}, step {p.step}"
                  + (f" ({p.epoch_step} steps into the epoch)" if p.epoch_step else ""))
            keep_lines(self.run_dir / "metrics.jsonl", lambda row: row.get("step", 0) <= p.step)
            keep_lines(self.run_dir / "val_metrics.jsonl", lambda row: row.get("epoch", 0) <= p.epoch)
        if p.epoch_step:
            saved_world = int(state.get("world_size", 1))
            if saved_world != self.world.world_size:
                raise ConfigError(
                    f"--resume {path}: taken {p.epoch_step} steps into an epoch by {saved_world} "
                    f"process(es), this run has {self.world.world_size}: the rest of the epoch's batches "
                    f"exist only for {saved_world}; resume with that many, or from a checkpoint taken at "
                    "the end of an epoch")
            loader_state = state.get("loader")
            if loader_state is None or int(loader_state.get("epoch", -1)) != p.epoch:
                raise ConfigError(f"--resume {path}: a mid-epoch checkpoint without the loader position "
                                  "of its epoch")
            return loader_state
        return None

    def _save(self, files: dict[str, dict[str, Any]]) -> None:
        """Write checkpoints (rank 0) once every rank reached this point; all ranks call it.

        Args:
            files: file name -> entries added to the common state (``best.pt`` gets ``val``).
        """
        self.log.flush()
        self.progress.last_train = dict(self.log.last)
        self.progress.elapsed_s = self._elapsed()
        self.trainer.guard.check(self.progress.step)  # a run past the limit stops before writing
        rng = distributed.gather_objects(rng_state(self.device))
        if self.world.is_main:
            state = {**self.trainer.state_dict(), **self.progress.state(), "config": self.config.to_dict(),
                     "classes": self.classes, "loader": self.loader.state_dict(), "rng": rng,
                     "world_size": self.world.world_size}
            check_finite(state["model"], self.checkpoints)
            for name, extra in files.items():
                atomic_save({**state, **extra}, self.checkpoints / name)
        # Nobody runs ahead of a checkpoint being written: after a failure, it is complete.
        distributed.barrier()

    def _end_of_epoch(self, data: Any, model: torch.nn.Module) -> None:
        config, progress = self.config, self.progress
        epoch = progress.epoch
        files: dict[str, dict[str, Any]] = {}
        is_last = epoch == config.epochs
        val = None
        if data.val is not None and config.eval_every and (epoch % config.eval_every == 0 or is_last):
            if self.world.is_main:  # the others wait in the checkpoint's barrier
                val = evaluate_localization(model, data.val, device=self.device, loader=eval_loader(config),
                                            cam_curve_interval=config.cam_curve_interval, desc="val")
                val = {"epoch": epoch, **val}
                progress.val_history.append(val)
                with (self.run_dir / "val_metrics.jsonl").open("a") as handle:
                    handle.write(json.dumps(val) + "\n")
                if _selection_score(val) > progress.best_score:
                    progress.best_score = _selection_score(val)
                    files["best.pt"] = {"val": val}
        files["last.pt"] = {}  # after best.pt, so last.pt is the newer of the two
        self._save(files)
        if self.world.is_main:
            if val is not None:
                best_epoch = max(progress.val_history, key=_selection_score)["epoch"]
                line = format_validation(val, epochs=config.epochs, best=progress.best_score,
                                         best_epoch=best_epoch, saved=list(files))
                print(line, file=sys.stderr, flush=True)
            self._curves()

    def _curves(self) -> None:
        """``curves.png`` from the logs; a plotting failure is noted, never the end of a run."""
        try:
            write_curves(self.run_dir)
        except (OSError, ValueError) as exc:
            _note(f"{self.run_dir / 'curves.png'}: not written ({exc})")

    def _final_test(self, data: Any, model: torch.nn.Module) -> dict[str, Any]:
        best = self.checkpoints / "best.pt"
        if best.exists():  # the protocol selects the model on val and reports it on test
            model.load_state_dict(load_checkpoint(best, flag="best.pt")["model"])
        if data.test is None:
            return {}
        test_metrics = evaluate_localization(model, data.test, device=self.device,
                                             loader=eval_loader(self.config),
                                             cam_curve_interval=self.config.cam_curve_interval, desc="test")
        atomic_write_text(self.run_dir / "final_metrics.json", json.dumps(
            {"test": test_metrics, "last_train": self.log.last, "val_history": self.progress.val_history,
             "skipped_steps": self.trainer.guard.state_dict()["skipped"],
             # what --amp auto resolved to on this machine (the config says only "auto")
             "precision": PRECISION_NAMES[self.trainer.amp_dtype],
             # the whole run's wall time, over every process that ran it (see _Progress.elapsed_s)
             "wall_s": round(self._elapsed(), 1), "resumed_at": self.progress.resumed_at}, indent=2))
        self._curves()
        return test_metrics


def _selection_score(val: dict[str, Any]) -> float:
    """The protocol's model-selection score of a validation: MaxBoxAccV2 (boxes) or PxAP (masks)."""
    return float(val.get("maxboxacc_v2", val.get("pxap", 0.0)))
