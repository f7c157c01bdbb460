"""Classification pretraining (its command line: ``python -m mmcam_fast.pretrain``,
:mod:`mmcam_fast.cli.pretrain`) from scratch, the stand-in for ImageNet
weights where none can be had (the Tiny-ImageNet study's 172 pretraining classes).

The network is torchvision's own, at its standard strides (ImageNet weights come from standard
classification; the WSOL stride change happens at fine-tuning time, as in the paper), trained with
plain cross-entropy on the train split of a prepared data set (``prepare tiny-imagenet --classes
pretrain172.txt``) and scored on its held-out val split every epoch. SGD (momentum 0.9, Nesterov,
weight decay 5e-4), a cosine learning-rate schedule per step, bf16 autocast where the CPU or GPU has
it. A checkpoint is written atomically after every epoch, and ``--resume auto`` continues from it (a
stopped epoch is redone), so a pretraining longer than a session goes on in the next.

``--export PATH`` writes the final weights as a torchvision-format state dict (fp16 by default, as
committed to the repository) beside ``PATH.sha256``: the file ``--pretrained`` reads::

    python -m mmcam_fast.pretrain --data-root runs/data/pretrain172 --arch resnet18 --epochs 8 \\
        --out runs/pretrain/resnet18 --resume auto --export experiments/pretrained/resnet18-172.pth
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision import models as tvm
from tqdm import tqdm

from mmcam_fast.checkpoint import atomic_save, load_checkpoint
from mmcam_fast.data.loaders import build_loader
from mmcam_fast.data.splits import build_datasets
from mmcam_fast.engine import PRECISION_NAMES, resolve_amp, resolve_channels_last
from mmcam_fast.errors import ConfigError
from mmcam_fast.run_folder import atomic_write, atomic_write_text, check_output_folder

ARCHS = {"resnet18": tvm.resnet18, "mobilenet_v2": tvm.mobilenet_v2}


def build_network(arch: str, num_classes: int) -> torch.nn.Module:
    if arch not in ARCHS:
        raise ConfigError(f"--arch {arch!r}: expected one of {', '.join(ARCHS)}")
    return ARCHS[arch](weights=None, num_classes=num_classes)


def _cosine(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def top1(model: torch.nn.Module, loader: Any, device: torch.device, amp: torch.dtype | None) -> float:
    model.eval()
    correct = count = 0
    for images, labels, *_ in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(images)
        correct += int((logits.argmax(1) == labels).sum())
        count += len(labels)
    return 100.0 * correct / max(1, count)


def export_state_dict(state: dict[str, torch.Tensor], path: str | Path, *, half: bool = True) -> str:
    """Write a torchvision-format state dict (fp16 floats when ``half``) and ``<path>.sha256``."""
    path = Path(path)
    tensors = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    atomic_write(path, lambda handle: torch.save(tensors, handle))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    atomic_write_text(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n")
    return digest


def pretrain(args: Any) -> dict[str, Any]:
    out = check_output_folder(args.out)
    device = torch.device(args.device)
    data = build_datasets("tiny-imagenet", args.data_root, image_size=args.image_size,
                          require_localization=False)
    torch.manual_seed(args.seed)
    amp = resolve_amp(args.amp, device.type)
    # the fine-tuning engine's rule (engine.resolve_channels_last): channels-last on CUDA and under
    # autocast, contiguous for fp32 on a CPU, where oneDNN's AVX2 convolutions are slower channels-last
    channels_last = resolve_channels_last(args.channels_last, device.type, amp)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_network(args.arch, data.num_classes).to(device).to(memory_format=memory_format)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]  # no weight decay on BN and biases
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=args.lr, momentum=0.9,
                                nesterov=True)
    train_loader, steps = build_loader(data.train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                       workers=args.workers, seed=args.seed, channels_last=channels_last)
    val_loader, _ = build_loader(data.val, batch_size=256, workers=args.workers)
    if args.max_steps_per_epoch:
        steps = min(steps, args.max_steps_per_epoch)
    total = steps * args.epochs
    state_path = out / "checkpoint.pt"
    first, history, wall = 0, [], 0.0
    if args.resume and state_path.exists():
        state = load_checkpoint(state_path, flag="--resume")
        if state["arch"] != args.arch or state["num_classes"] != data.num_classes:
            raise ConfigError(f"--resume {state_path}: a {state['arch']} of {state['num_classes']} classes")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        first, history, wall = state["epoch"], state["history"], state["wall_s"]
        print(f"mmcam_fast.pretrain: resuming after epoch {first}", file=sys.stderr, flush=True)
    for epoch in range(first, args.epochs):
        start = time.perf_counter()
        model.train()
        train_loader.set_epoch(epoch)
        with tqdm(total=steps, desc=f"pretrain {epoch + 1}/{args.epochs}", leave=False,
                  dynamic_ncols=True) as bar:
            for i, (images, labels, _) in zip(range(steps), train_loader, strict=False):
                for group in optimizer.param_groups:
                    group["lr"] = _cosine(epoch * steps + i, total, args.lr, warmup=min(500, total // 20))
                images = images.to(device).contiguous(memory_format=memory_format)
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss = F.cross_entropy(model(images).float(), labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update(1)
        accuracy = top1(model, val_loader, device, amp)
        wall += time.perf_counter() - start
        history.append({"epoch": epoch + 1, "val_top1": accuracy, "wall_s": round(wall, 1)})
        print(json.dumps(history[-1]), file=sys.stderr, flush=True)
        atomic_save({"arch": args.arch, "num_classes": data.num_classes, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch + 1,
                     "history": history, "wall_s": wall, "classes": data.class_names,
                     "config": {k: str(v) for k, v in vars(args).items()}}, state_path)
    result = {"arch": args.arch, "epochs": args.epochs, "history": history, "wall_s": round(wall, 1),
              "val_top1": history[-1]["val_top1"] if history else None,
              "precision": PRECISION_NAMES[amp], "channels_last": channels_last}
    if args.export:
        result["sha256"] = export_state_dict(model.state_dict(), args.export)
        result["export"] = str(args.export)
    atomic_write_text(out / "pretrain.json", json.dumps(result, indent=2))
    return result
