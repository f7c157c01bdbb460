"""Process groups under ``torchrun``: start-up, rank helpers, the reductions the trainer needs.

This is the one module that reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``TORCHELASTIC_RESTART_COUNT``). Outside torchrun, or under torchrun with one
process, there is no process group and every helper here is a no-op, so single-process code paths
are the distributed ones minus the communication.

Backends: NCCL for CUDA devices (one GPU per process, ``cuda:LOCAL_RANK``), gloo for CPU. Multi-node
runs use torchrun's rendezvous (``--nnodes``, ``--rdzv-backend c10d``, ``--rdzv-endpoint``); this
module only consumes the environment torchrun sets up.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mmcam_fast.errors import ConfigError, MMCamError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """Where this process stands in the run.

    Attributes:
        rank: global rank (0 writes files and logs).
        world_size: number of processes (``G`` per node times the nodes).
        local_rank: rank within the node; the CUDA device index on GPU machines.
        local_world_size: processes on this node.
        backend: ``"nccl"``, ``"gloo"``, or None without a process group (one process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)"
                          ) from None


def torchrun_world_size() -> int:
    """The WORLD_SIZE torchrun set (1 outside torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def restart_count() -> int:
    """How many times torchrun has restarted the worker group (``--max-restarts``); 0 at first."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own random streams (augmentations): ``seed`` itself on rank 0."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, np.uint32)[0])


def _device_for(device: str, local_rank: int, local_world_size: int) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        elif local_world_size > 1:
            raise ConfigError(f"--device {device} names one GPU, but torchrun starts {local_world_size} "
                              "processes per node: pass --device cuda (process i uses cuda:i)")
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"process {local_rank} of this node needs cuda:{dev.index}, but "
                              f"{torch.cuda.device_count()} GPU(s) are visible (torchrun "
                              "--nproc-per-node at most the number of GPUs)")
    return dev


def init(device: str, *, timeout_min: float = 60.0) -> tuple[World, torch.device]:
    """Join torchrun's process group (when there is more than one process) and pick this rank's device.

    Args:
        device: ``--device``; ``cuda`` becomes ``cuda:LOCAL_RANK``.
        timeout_min: collective timeout. Rank 0 alone validates and writes checkpoints while the
            others wait in the next collective, so this must exceed the longest validation.

    Returns:
        ``(world, device)``.
    """
    world_size = torchrun_world_size()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", 1)
    dev = _device_for(device, local_rank, local_world_size)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1:
        return World(), dev
    if dist.is_initialized():  # a caller (a test, a notebook) set the group up already
        backend = dist.get_backend()
    else:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = timedelta(minutes=timeout_min)
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun's agent keeps one store across restarts of the worker group (--max-restarts):
        # without a key prefix of its own, a restarted group can read the addresses the failed one
        # published, and its ranks then try to connect to processes that are gone.
        store = dist.PrefixStore(f"mmcam_fast/attempt_{restart_count()}", store)
        options: dict[str, Any] = {"timeout": timeout, "store": store, "rank": rank,
                                   "world_size": world_size}
        if dev.type == "cuda":
            options["device_id"] = dev  # binds the communicator to this GPU at start-up
        dist.init_process_group(backend, **options)
        global _STORE
        _STORE = store
    return World(rank, world_size, local_rank, local_world_size, backend), dev


_STORE: Any = None  # the store this module's process group was built on (rank 0 serves it)


def shutdown(*, clean: bool | None = None, timeout_s: float = 60.0) -> None:
    """Leave the process group, if this process joined one.

    On a clean exit (``clean``; by default, when no exception is propagating) the ranks leave
    together: a barrier, then ``destroy_process_group``, then a count in the store that rank 0, which
    serves the store, waits for before it returns. Without it a rank could tear its gloo
    connections down while a peer is still destroying its own, and that peer's process then aborts
    at exit ("terminate called without an active exception", exit -6) after a run that succeeded.
    After a failure nothing waits on the other ranks: they may be gone.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean is None:
        clean = sys.exc_info()[0] is None
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if clean and world_size > 1:
        dist.barrier()
    dist.destroy_process_group()
    global _STORE
    store, _STORE = _STORE, None
    if not (clean and world_size > 1 and store is not None):
        return
    try:
        left = store.add("left", 1)
        deadline = time.monotonic() + timeout_s
        while rank == 0 and left < world_size and time.monotonic() < deadline:
            time.sleep(0.02)
            left = store.add("left", 0)
    except Exception:  # noqa: BLE001 - a peer's store client already gone is fine at this point
        pass


def active() -> bool:
    """Whether there is a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap(model: nn.Module, device: torch.device, *, sync_bn: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` when there is a process group, else ``model`` unchanged.

    Call it after every change of the parameters' memory format (DDP's buckets follow the layout
    they see here) and before ``torch.compile``. With ``sync_bn``, BatchNorm layers are converted to
    ``SyncBatchNorm`` first (batch statistics over all ranks in Stage I; GPUs only).
    """
    if sync_bn and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA devices (SyncBatchNorm runs on GPUs only)")
    if not active():
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_true(flag: torch.Tensor) -> torch.Tensor:
    """``flag`` (a bool scalar on any device) AND-ed over all ranks, without a host synchronisation."""
    if not active():
        return flag
    value = flag.to(torch.int32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value.reshape(()).bool()


def average_gradients(params: list[torch.Tensor]) -> None:
    """Average the ``.grad`` of ``params`` over the ranks, in place, as DDP does for its buckets.

    DDP's reducer scales each gradient by ``1 / world_size`` and then sums across ranks; this does
    the same (SUM, not AVG, which gloo lacks), so every rank ends with the same bits.
    """
    if not active():
        return
    world_size = dist.get_world_size()
    for param in params:
        if param.grad is None:
            raise MMCamError(f"average_gradients: a parameter of shape {tuple(param.shape)} has no gradient")
        param.grad.mul_(1.0 / world_size)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The elementwise mean of ``values`` over the ranks (for logged metrics); identity in one process."""
    if not active():
        return values
    total = values.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size()


def barrier() -> None:
    if active():
        dist.barrier()


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    holder = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def on_main(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``function`` on rank 0 only and hand its result to every rank.

    A project error raised on rank 0 is raised on every rank with the same message, so the ranks
    stop together instead of waiting for each other.
    """
    if not active():
        return function(*args, **kwargs)
    outcome: tuple[str, Any] = ("ok", None)
    if dist.get_rank() == 0:
        try:
            outcome = ("ok", function(*args, **kwargs))
        except MMCamError as error:
            outcome = ("error", (type(error), str(error)))
    outcome = broadcast_object(outcome)
    if outcome[0] == "error":
        kind, message = outcome[1]
        raise kind(message)
    return outcome[1]


def parameter_fingerprint(module: nn.Module) -> str:
    """SHA-1 of a module's parameters (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha1()
    for name, param in module.named_parameters():
        value = param.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas_equal(module: nn.Module) -> None:
    """Raise if the ranks' parameters differ in any bit (a no-op in one process).

    Replicas drift apart only through a bug (a gradient that was not reduced, a rank-dependent
    update); this makes such a bug an error at the end of the run instead of a silent one. Buffers
    are not compared: each rank's last forward pass updated its BatchNorm statistics from its own
    batch, and DDP replaces them with rank 0's at the next forward (see :func:`broadcast_buffers`).
    """
    if not active():
        return
    fingerprints = gather_objects(parameter_fingerprint(module))
    if len(set(fingerprints)) > 1:
        ranks = ", ".join(f"rank {r}: {f[:12]}" for r, f in enumerate(fingerprints))
        raise MMCamError(f"the model replicas of the ranks differ at the end of training ({ranks})")


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does before each forward."""
    if not active():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)
