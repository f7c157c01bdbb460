"""A training run end to end: data, model, trainer, per-epoch validation, checkpoints, final test."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mmcam_fast.checkpoint import atomic_save
from mmcam_fast.cli import torchrun_world_size
from mmcam_fast.config import TrainConfig
from mmcam_fast.engine import MetricLog, Trainer
from mmcam_fast.errors import ConfigError
from mmcam_fast.models import create_model


@dataclass
class RunResult:
    """What a finished run reports: where it wrote, how long it took, its last and final metrics."""

    run_dir: Path
    wall_time_s: float
    steps: int
    last_train: dict[str, float]
    val_history: list[dict[str, Any]] = field(default_factory=list)
    test_metrics: dict[str, Any] = field(default_factory=dict)

    def summary_line(self) -> str:
        return json.dumps({"run_dir": str(self.run_dir), "wall_time_s": round(self.wall_time_s, 1),
                           "steps": self.steps, "train": self.last_train, "test": self.test_metrics})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(config: TrainConfig) -> RunResult:
    """Train as ``config`` says; write config, metrics, checkpoints and final metrics to ``config.out``."""
    if torchrun_world_size() > 1:
        raise ConfigError("torchrun with more than one process is not supported yet: use "
                          "--nproc_per_node 1 (multi-process training is tracked as its own work item)")
    from mmcam_fast.data.loaders import build_datasets, build_loader, set_batch_sampler
    from mmcam_fast.localization import evaluate_localization

    start = time.perf_counter()
    seed_everything(config.seed)
    device = torch.device(config.device)
    run_dir = Path(config.out)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.yaml")

    data = build_datasets(config.data, config.data_root, metadata_root=config.metadata_root,
                          image_size=config.image_size, vertical_flip=config.vertical_flip,
                          bad_image_policy=config.bad_images)
    sampler = set_batch_sampler(data.train, sets_per_batch=config.sets_per_batch, set_size=config.set_size,
                                seed=config.seed, replacement=config.sample_with_replacement)
    loader, steps_per_epoch = build_loader(data.train, batch_sampler=sampler, workers=config.workers,
                                           seed=config.seed, backend=config.loader)
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)

    model = create_model(config.backbone, data.num_classes, large_feature_map=config.large_feature_map,
                         pretrained=config.pretrained).to(device)
    trainer = Trainer(model, config)
    log = MetricLog(run_dir / "metrics.jsonl", config.log_every)
    val_history: list[dict[str, Any]] = []
    best_score = -1.0
    step = 0
    for epoch in range(config.epochs):
        loader.set_epoch(epoch)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   dynamic_ncols=True)
        for i, (images, labels, _) in enumerate(loader):
            if i >= steps_per_epoch:
                break
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            metrics = trainer.train_step(images, labels)
            step += 1
            lr = trainer.optimizer.param_groups[0]["lr"]
            if log.add({"step": step, "epoch": epoch + 1, "lr": lr}, metrics):
                bar.set_postfix({k: f"{v:.4g}" for k, v in log.last.items()
                                 if k in ("ce", "acc", "crr", "frr")})
            bar.update(1)
        bar.close()
        log.flush()
        trainer.scheduler.step()

        state = {**trainer.state_dict(), "epoch": epoch + 1, "step": step, "config": config.to_dict(),
                 "classes": data.class_names, "loader": loader.state_dict()}
        is_last = epoch + 1 == config.epochs
        if data.val is not None and config.eval_every and ((epoch + 1) % config.eval_every == 0 or is_last):
            val = evaluate_localization(model, data.val, device=device,
                                        cam_curve_interval=config.cam_curve_interval)
            val = {"epoch": epoch + 1, **val}
            val_history.append(val)
            with (run_dir / "val_metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(val) + "\n")
            score = val.get("maxboxacc_v2", val.get("pxap", 0.0))
            if score > best_score:
                best_score = score
                atomic_save({**state, "val": val}, run_dir / "checkpoints" / "best.pt")
        atomic_save(state, run_dir / "checkpoints" / "last.pt")

    test_metrics: dict[str, Any] = {}
    best = run_dir / "checkpoints" / "best.pt"
    if best.exists():  # the protocol selects the model on val and reports it on test
        model.load_state_dict(torch.load(best, map_location=device, weights_only=False)["model"])
    if data.test is not None:
        test_metrics = evaluate_localization(model, data.test, device=device,
                                             cam_curve_interval=config.cam_curve_interval)
        (run_dir / "final_metrics.json").write_text(json.dumps(
            {"test": test_metrics, "last_train": log.last, "val_history": val_history}, indent=2))
    return RunResult(run_dir, time.perf_counter() - start, step, log.last, val_history, test_metrics)
