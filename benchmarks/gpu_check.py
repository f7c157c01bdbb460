"""`make gpu-check`: the GPU paths of the project proven on a real GPU, stage by stage, in under 8 minutes.

    python benchmarks/gpu_check.py               # CUDA machine: stages a-g -> results/gpu/<gpu>.{json,md}
    python benchmarks/gpu_check.py --dry-run     # CPU, tiny shapes (CI) -> results/gpu/dry-run.{json,md}
    python benchmarks/gpu_check.py --stages c,e --budget e=600 --out DIR

Stages (docs/gpu-check.md says what each proves and why its budget is what it is):

    a  environment: GPU, compute capability, driver, CUDA, cuDNN, NCCL, torch, triton, DALI; CUDA works
    b  the gpu-marked tests (pytest -m gpu) and the kernel tests of tests/interpret on CUDA, compiled by
       the driver (no TRITON_INTERPRET): values and gradients against the references, fp32/bf16/fp16,
       channels-last, S = 2 and 5
    c  the fast engine on CUDA: fp32 fast == reference over 20 steps (the CPU tolerance), bf16 within the
       documented band, Stage II replayed from CUDA graphs, no recompilation after warm-up
    d  DALI "mixed" (nvJPEG) decoding against the torchvision path on the shared JPEGs, within the bound
       the CPU equivalence asserts
    e  the step benchmark: ResNet50-CAM at 224, N x S = 12 x 5, at each feature-map geometry (28x28 and
       14x14): reference, fast eager, fast + compile, fast + compile + CUDA graphs, and the same engines'
       plain cross-entropy step (lambda_crr = lambda_frr = 0): images/s, peak GPU memory, and the
       MinMaxCAM step's cost in CE steps
    f  the box evaluator on 2,000 generated 224x224 maps: fast against reference, identical counts
    g  with two or more GPUs: two NCCL ranks train a few steps and end with identical weights

Each stage runs in its own process (its own session) with its own time limit: a hang is killed with
its process group when the limit is reached, a crash (a CUDA error, a segfault) ends only that
process, and an exception is recorded with its message; the next stage runs in every case. Results
are written after every stage. The exit status is 1 when a stage failed or crashed, or when a
correctness stage ran out of time (a slow timing stage, e, is not a failure); 2 for a usage error or,
without ``--dry-run``, a machine without CUDA.

``--dry-run`` runs the same stages on the CPU with tiny shapes; what needs CUDA (or, on a CPU, would
take minutes: torch.compile) is reported as skipped with the reason.

This file is also the pytest plugin (``-p gpu_check``) that stage b loads to run the kernel tests of
``tests/interpret`` on a device: their calls of the kernels get inputs moved to it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
RESULTS = ROOT / "benchmarks" / "results" / "gpu"
SCHEMA = "mmcam-gpu-check/1"
STATUSES = ("pass", "fail", "error", "timeout", "skip")
CHECK_STATUSES = ("pass", "fail", "skip")


@dataclasses.dataclass(frozen=True)
class Stage:
    key: str
    title: str
    proves: str
    budget_s: float  # time limit on a GPU machine
    dry_budget_s: float  # time limit of the --dry-run (CPU, tiny shapes)
    kind: str  # "correctness": a timeout fails the check; "timing": a timeout keeps what was measured


# Budgets: on one GPU a-f add up to 430 s, with g (two or more GPUs) 480 s = 8 minutes.
STAGES = (
    Stage("a", "environment", "GPU name, compute capability, driver, CUDA, cuDNN, NCCL, torch, triton and "
          "DALI versions; a CUDA matmul agrees with the CPU's", 15, 90, "correctness"),
    Stage("b", "gpu tests and Triton kernels", "pytest -m gpu; tests/interpret's cam_mask and "
          "set_regularizers tests with the kernels compiled by the driver: values and gradients against the "
          "references, fp32/bf16/fp16, contiguous and channels-last, S = 2 and 5", 130, 180, "correctness"),
    Stage("c", "fast engine", "fp32 fast (compile + CUDA graphs) == reference over 20 steps within "
          "1e-4; bf16 within the documented band; Stage II replayed from CUDA graphs; no recompilation "
          "after warm-up; step metrics stay readable between log flushes", 70, 150, "correctness"),
    Stage("d", "DALI decoding", "nvJPEG ('mixed') decoding + GPU resize/crop/flip/normalize against "
          "the torchvision path on the shared JPEGs, within the CPU equivalence's bound", 30, 120,
          "correctness"),
    Stage("e", "step benchmark", "ResNet50-CAM at 224, N x S = 60, 28x28 and 14x14 maps: reference, fast "
          "eager, + compile, + CUDA graphs, and each engine's plain CE step: images/s, peak memory, "
          "MinMaxCAM step in CE steps", 130, 180, "timing"),
    Stage("f", "evaluator", "MaxBoxAcc and MaxBoxAccV2 on 2,000 generated 224x224 maps: fast and reference "
          "give identical counts; their times", 55, 120, "correctness"),
    Stage("g", "two ranks", "two ranks (NCCL, one GPU each) train a few fast-engine steps under DDP "
          "and end with bit-identical weights", 50, 150, "correctness"),
)
STAGE_KEYS = tuple(s.key for s in STAGES)


# -- shapes ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shapes:
    e_backbone: str
    e_image: int
    e_sets: int  # N
    e_set_size: int  # S
    e_classes: int
    e_strides: tuple[int, ...]  # feature strides measured: 8 -> 28x28 at 224, 16 -> 14x14
    e_warmup: int
    e_steps: int
    f_maps: int
    g_steps: int
    d_images: int | None  # images per case (None: every image of the case)
    d_size: int | None  # image size of the eval cases (None: the case's own)


GPU_SHAPES = Shapes("resnet50", 224, 12, 5, 1000, (8, 16), 3, 10, 2000, 5, None, None)
DRY_SHAPES = Shapes("resnet18", 32, 2, 2, 4, (8, 16), 1, 1, 20, 3, 6, 64)


# -- a stage's report (written by the stage's process, read by the driver) ----------------------------

class SkipStage(Exception):
    """The whole stage does not apply here (the reason is the message)."""


class Report:
    """Checks and metrics of one stage, saved to a JSON file after every change (so that what a stage
    found before it hung or crashed is kept)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"checks": [], "metrics": {}, "summary": ""}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def check(self, name: str, ok: bool, detail: str = "", **values: Any) -> bool:
        self.data["checks"].append({"name": name, "status": "pass" if ok else "fail", "detail": detail,
                                    **values})
        self.save()
        return ok

    def skip(self, name: str, reason: str) -> None:
        self.data["checks"].append({"name": name, "status": "skip", "detail": reason})
        self.save()

    def metric(self, key: str, value: Any) -> None:
        self.data["metrics"][key] = value
        self.save()

    def summary(self, text: str) -> None:
        self.data["summary"] = text
        self.save()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(dry_run: bool):
    import torch

    return torch.device("cpu") if dry_run else torch.device("cuda", 0)


def _import_from(folder: Path, name: str):
    """A module of the project's tests (tests/, tests/interpret) imported as a library."""
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return __import__(name)


# -- a: environment ------------------------------------------------------------------------------------

def _cpu_info() -> dict[str, Any]:
    from mmcam_fast.machine import cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"model": model, "cores": os.cpu_count(), **{f: f in flags for f in wanted}}


def _version(module: str) -> str | None:
    try:
        return __import__(module, fromlist=["__version__"]).__version__
    except Exception:  # not installed, or broken: reported as missing
        return None


def _driver_version() -> str | None:
    """The NVIDIA driver's version: nvidia-smi's answer, else NVML's (libnvidia-ml, through ctypes)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0].strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        import ctypes

        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        buffer = ctypes.create_string_buffer(96)
        if nvml.nvmlInit_v2() == 0 and nvml.nvmlSystemGetDriverVersion(buffer, 96) == 0:
            return buffer.value.decode()
    except (OSError, AttributeError):
        pass
    return None


def _driver_cuda_version() -> str | None:
    """The CUDA version the driver supports (cuDriverGetVersion, e.g. 13.0)."""
    try:
        import ctypes

        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return None


def stage_a(report: Report, dry_run: bool, shapes: Shapes, budget: float) -> None:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_info(),
        "torch": torch.__version__, "torchvision": _version("torchvision"), "triton": _version("triton"),
        "dali": _version("nvidia.dali"), "numba": _version("numba"), "numpy": _version("numpy"),
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(), "gpus": [],
    }
    try:
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # a build without NCCL
        env["nccl"] = None
    if torch.cuda.is_available():
        env["driver"] = _driver_version()
        env["driver_cuda"] = _driver_cuda_version()
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            env["gpus"].append({"index": index, "name": props.name,
                                "capability": f"sm_{props.major}{props.minor}",
                                "memory_gib": round(props.total_memory / 2**30, 1),
                                "multiprocessors": props.multi_processor_count})
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    report.metric("environment", env)
    missing = [name for name in ("triton", "numba") if env[name] is None]
    report.check("versions read", not missing, "missing: " + ", ".join(missing) if missing else "")
    if env["dali"] is None:
        report.skip("DALI installed", "nvidia-dali is not installed (pip install -e '.[dali]'): "
                    "stage d skips")
    if not torch.cuda.is_available():
        if dry_run:
            report.skip("CUDA works", "needs CUDA (dry run on the CPU)")
        else:
            report.check("CUDA works", False, "torch.cuda.is_available() is False")
        report.summary(f"CPU {env['cpu']['model']}; torch {env['torch']}, triton {env['triton']}, "
                       f"DALI {env['dali']}; no CUDA")
        return
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=gen), torch.randn(512, 512, generator=gen)
    on_gpu = (a.cuda() @ b.cuda()).cpu()
    # loose enough for TF32 matmuls, tight enough to catch garbage
    error = float((on_gpu - a @ b).abs().max() / (a @ b).abs().max())
    report.check("CUDA works", error < 1e-2, f"512x512 matmul, max error {error:.2g} of the largest entry")
    gpu = env["gpus"][0]
    report.summary(f"{gpu['name']} x{len(env['gpus'])} ({gpu['capability']}, {gpu['memory_gib']} GiB), "
                   f"driver {env.get('driver')} (CUDA {env['driver_cuda']}), CUDA {env['cuda_runtime']}, "
                   f"torch {env['torch']}, triton {env['triton']}, DALI {env['dali']}")


# -- b: gpu-marked tests, kernel tests on the device -------------------------------------------------

KERNEL_DEVICE_ENV = "MMCAM_GPU_CHECK_KERNEL_DEVICE"
KERNEL_CALLS_ENV = "MMCAM_GPU_CHECK_KERNEL_CALLS"
KERNEL_TEST_FILES = ("tests/interpret/test_cam_mask.py", "tests/interpret/test_set_regularizers.py")
# the dry run (Triton's interpreter on 2 cores) takes one shape of each op in every dtype and layout
DRY_KERNEL_TESTS = "B1-K64-7x7-to-64 or B2-K64-S2"


def _junit(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = collections.Counter()
    problems, skips = [], []
    for suite in suites:
        for case in suite.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            kinds = {child.tag: child for child in case}
            if "failure" in kinds or "error" in kinds:
                counts["failed"] += 1
                node = kinds.get("failure", kinds.get("error"))
                problems.append(f"{name}: {(node.get('message') or '').strip()[:300]}")
            elif "skipped" in kinds:
                counts["skipped"] += 1
                skips.append(f"{name}: {(kinds['skipped'].get('message') or '').strip()[:200]}")
            else:
                counts["passed"] += 1
    return {**{k: counts[k] for k in ("passed", "failed", "skipped")}, "problems": problems[:10],
            "skip_reasons": skips[:10]}


class _Pytest:
    """One pytest run in a subprocess (results from its junit XML); several run side by side."""

    def __init__(self, args: list[str], env: dict[str, str], tmp: Path, label: str):
        self.junit, self.log = tmp / f"{label}.xml", tmp / f"{label}.log"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={self.junit}",
                   *args]
        self.start = time.perf_counter()
        with self.log.open("w") as handle:
            self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)

    def result(self, deadline: float) -> dict[str, Any]:
        try:
            self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            out: dict[str, Any] = {"returncode": self.proc.returncode}
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            out = {"timeout": True}
        out["seconds"] = round(time.perf_counter() - self.start, 1)
        out["tail"] = self.log.read_text(errors="replace")[-2000:]
        if not out.get("timeout") and self.junit.exists():
            out.update(_junit(self.junit))
        return out


def _report_pytest(report: Report, name: str, run: dict[str, Any], *, must_run: bool) -> None:
    detail = {k: run.get(k) for k in ("passed", "failed", "skipped", "seconds")}
    if run.get("timeout"):
        report.check(name, False, f"pytest ran out of time after {run['seconds']} s", tail=run["tail"])
        return
    if "passed" not in run:  # no junit file: pytest did not get to run the tests
        report.check(name, False, f"pytest exited {run['returncode']} without results", tail=run["tail"])
        return
    text = f"{run['passed']} passed, {run['failed']} failed, {run['skipped']} skipped in {run['seconds']} s"
    if run["failed"] or run["returncode"] not in (0, 5):
        report.check(name, False, text + "; " + "; ".join(run["problems"][:3]), problems=run["problems"],
                     tail=run["tail"], **detail)
    elif run["passed"] == 0 and not must_run:
        report.skip(name, text + ("; " + run["skip_reasons"][0] if run["skip_reasons"] else ""))
    else:
        ok = run["passed"] > 0 and (not must_run or run["skipped"] == 0)
        report.check(name, ok, text + ("" if ok else "; on a CUDA machine every test must run: "
                                       + "; ".join(run["skip_reasons"][:3])), **detail)


def stage_b(report: Report, dry_run: bool, shapes: Shapes, budget: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-b-"))
    deadline = time.monotonic() + budget - 5
    files = sorted(str(p.relative_to(ROOT)) for p in TESTS.glob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text())
    report.metric("gpu_test_files", files)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    runs = {"gpu": _Pytest(["-m", "gpu", *files], env, tmp, "gpu")}
    # the kernel tests, one process per file, side by side with the gpu tests: Triton compiles each
    # kernel variant in the process that launches it, so on a many-core machine they overlap
    plugin = os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, KERNEL_DEVICE_ENV: "cpu" if dry_run else "cuda", "PYTHONPATH": plugin}
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # the interpreter: the same tests, on the CPU
        selection = ["-k", DRY_KERNEL_TESTS]
    else:
        env.pop("TRITON_INTERPRET", None)  # kernels compiled for the GPU by Triton and the driver
        selection = []
    for path in KERNEL_TEST_FILES:
        label = Path(path).stem
        runs[label] = _Pytest(["--noconftest", "-p", "gpu_check", *selection, path],
                              {**env, KERNEL_CALLS_ENV: str(tmp / f"{label}.calls.json")}, tmp, label)
    results = {label: run.result(deadline) for label, run in runs.items()}

    gpu = results.pop("gpu")
    report.metric("gpu_tests", {k: v for k, v in gpu.items() if k != "tail"})
    _report_pytest(report, "pytest -m gpu", gpu, must_run=not dry_run)
    where = "Triton interpreter on the CPU (dry run)" if dry_run else "CUDA, compiled by the driver"
    calls: collections.Counter = collections.Counter()
    for label, run in results.items():
        calls_file = tmp / f"{label}.calls.json"
        run["kernel_calls"] = json.loads(calls_file.read_text()) if calls_file.exists() else {}
        calls.update(run["kernel_calls"])
        report.metric(label, {k: v for k, v in run.items() if k != "tail"})
        _report_pytest(report, f"tests/interpret/{label}.py ({where})", run, must_run=True)
    report.check("the kernels were called", sum(calls.values()) > 0, json.dumps(dict(calls)))
    gpu_total = sum(gpu.get(k, 0) for k in ("passed", "failed", "skipped"))
    passed = sum(r.get("passed", 0) for r in results.values())
    failed_tests = sum(r.get("failed", 0) for r in results.values())
    report.summary(f"{gpu.get('passed', 0)}/{gpu_total} gpu tests passed; kernel tests {passed} passed, "
                   f"{failed_tests} failed ({where}; {sum(calls.values())} kernel calls)")
    shutil.rmtree(tmp, ignore_errors=True)


# pytest plugin (loaded by stage b as ``-p gpu_check``) ------------------------------------------------

_KERNEL_CALLS: collections.Counter = collections.Counter()


def _to(value: Any, device: str) -> Any:
    import torch

    return value.to(device) if isinstance(value, torch.Tensor) else value


def _kernel_on(fn: Any, device: str) -> Any:
    """``fn`` with its tensor arguments moved to ``device`` and its results moved back to the CPU.

    The moves are differentiable, so gradients reach the tests' CPU leaves; memory formats are kept
    (``Tensor.to`` preserves the strides of dense tensors: channels-last stays channels-last)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        _KERNEL_CALLS[fn.__name__] += 1
        out = fn(*(_to(a, device) for a in args), **kwargs)
        return tuple(_to(o, "cpu") for o in out) if isinstance(out, tuple) else _to(out, "cpu")
    call.__name__ = fn.__name__
    return call


class _FunctionOn:
    """An autograd Function's ``apply`` through :func:`_kernel_on`."""

    def __init__(self, function: Any, device: str):
        self.apply = _kernel_on(function.apply, device)
        self.apply.__name__ = function.__name__


def pytest_collection_modifyitems(session, config, items) -> None:
    device = os.environ.get(KERNEL_DEVICE_ENV)
    if not device:
        return
    import mmcam_kernels

    for module in {getattr(item, "module", None) for item in items} - {None}:
        for name in ("cam_mask", "set_regularizers"):
            if getattr(module, name, None) is getattr(mmcam_kernels, name):
                setattr(module, name, _kernel_on(getattr(mmcam_kernels, name), device))
        if getattr(module, "SetRegularizersFunction", None) is mmcam_kernels.SetRegularizersFunction:
            module.SetRegularizersFunction = _FunctionOn(mmcam_kernels.SetRegularizersFunction, device)


def pytest_sessionfinish(session, exitstatus) -> None:
    path = os.environ.get(KERNEL_CALLS_ENV)
    if path:
        Path(path).write_text(json.dumps(dict(_KERNEL_CALLS)))


# -- c: the fast engine on CUDA -----------------------------------------------------------------------

class CudaGraphCounter:
    """Counts CUDA-graph captures and replays (``torch.cuda.CUDAGraph``, which inductor's cudagraph
    trees use) and reads dynamo's and inductor's counters, so that a stretch of steps can be checked
    for replays, new captures, recompilations and skipped graphs."""

    def __init__(self):
        import torch

        self.replays = self.captures = 0
        self.available = torch.cuda.is_available()
        if self.available:
            graph = torch.cuda.CUDAGraph
            replay, capture = graph.replay, graph.capture_begin

            def counted_replay(this, *a, **k):
                self.replays += 1
                return replay(this, *a, **k)

            def counted_capture(this, *a, **k):
                self.captures += 1
                return capture(this, *a, **k)

            graph.replay, graph.capture_begin = counted_replay, counted_capture

    def snapshot(self) -> dict[str, int]:
        from torch._dynamo.utils import counters

        return {"replays": self.replays, "captures": self.captures,
                "frames_compiled": int(counters["frames"]["total"]),
                "graphs": int(counters["stats"]["unique_graphs"]),
                "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
                "graph_breaks": int(sum(counters["graph_break"].values()))}

    @staticmethod
    def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        return {k: after[k] - before[k] for k in after}


def _no_tf32() -> None:
    """fp32 comparisons at fp32 precision (cuDNN convolutions default to TF32 on Ampere and later)."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _engine_run(device, impl: str, counter: CudaGraphCounter | None, warmup: int, **options):
    """test_engine_fast's 20 steps (its tiny model and batches) on ``device``.

    Each step's metrics are read right after it, and also kept in a :class:`MetricLog` (5 steps
    between flushes) as a training run keeps them for ``--log-every`` steps: with CUDA graphs, a
    tensor that a replay returned is overwritten by the next replay unless it was copied.

    Returns: ``(losses [steps, 3], fc.weight, trainer, marks)``; ``marks`` holds the counters after
    warm-up and at the end, the warm-up time, and the MetricLog's error (None when it read every step).
    """
    import torch

    from mmcam_fast.config import TrainConfig
    from mmcam_fast.engine import Trainer
    from mmcam_fast.metric_log import MetricLog

    tests = _import_from(TESTS, "test_engine_fast")
    model = tests._tiny_model().to(device)
    trainer = Trainer(model, TrainConfig(set_size=3, sets_per_batch=2, lr=0.01, impl=impl, **options))
    log, history, marks = MetricLog(None, every=5), [], {"metric_log_error": None}
    start = time.perf_counter()
    for step, (x, y) in enumerate(tests._batches()):
        if step == warmup and counter is not None:
            _sync(device)
            marks["after_warmup"] = counter.snapshot()
            marks["warmup_s"] = time.perf_counter() - start
        metrics = trainer.train_step(x.to(device), y.to(device))
        history.append([float(metrics[k]) for k in ("ce", "crr", "frr")])
        if marks["metric_log_error"] is None:
            try:
                log.add({"step": step + 1}, metrics)
            except RuntimeError as error:  # e.g. "accessing tensor output of CUDAGraphs that has been ..."
                marks["metric_log_error"] = f"step {step + 1}: {str(error).splitlines()[0][:400]}"
    _sync(device)
    if counter is not None:
        marks["end"] = counter.snapshot()
    return torch.tensor(history), model.fc.weight.detach().cpu(), trainer, marks


def stage_c(report: Report, dry_run: bool, shapes: Shapes, budget: float) -> None:
    import torch

    device = _device(dry_run)
    cuda = device.type == "cuda"
    counter = CudaGraphCounter()
    if cuda:
        _no_tf32()
        report.metric("tf32", "off (cuDNN and matmul) for the fp32 comparison")
    # on a CPU torch.compile of even this tiny model takes about a minute on 2 cores: the dry run runs
    # the fast engine eagerly (tests/test_engine_fast.py compiles it on the CPU)
    compile_options = {} if cuda else {"compile": False}
    engine = "fast + compile + CUDA graphs" if cuda else "fast eager (dry run: no torch.compile on the CPU)"
    ref_losses, ref_fc, _, _ = _engine_run(device, "reference", None, 0)
    warmup = 3  # compile, then cudagraph trees' warm-up run and recording; replays from then on
    losses, fc, trainer, marks = _engine_run(device, "fast", counter, warmup, amp="off", **compile_options)
    steps = len(losses)
    report.metric("stage2_kernels", trainer.kernels)  # "triton" on CUDA: the fused kernels
    rel = float(((losses - ref_losses).abs() / ref_losses.abs().clamp_min(1e-12)).max())
    fc_error = float((fc - ref_fc).abs().max())
    fc_ok = bool(torch.allclose(fc, ref_fc, rtol=1e-4, atol=1e-5))
    report.check(f"fp32 {engine} == reference over {steps} steps", rel < 1e-4 and fc_ok,
                 f"largest relative loss difference {rel:.2g} (< 1e-4), fc.weight max abs difference "
                 f"{fc_error:.2g} (rtol 1e-4, atol 1e-5: tests/test_engine_fast.py)",
                 max_rel_loss=rel, fc_max_abs=fc_error)
    report.check("metrics readable for 5 steps (MetricLog, as --log-every keeps them)",
                 marks["metric_log_error"] is None, marks["metric_log_error"] or "")
    if cuda:
        timed = CudaGraphCounter.delta(marks["after_warmup"], marks["end"])
        total = marks["end"]
        report.metric("compile_and_warmup_s", round(marks["warmup_s"], 2))
        report.metric("counters_after_warmup", timed)
        report.metric("counters_total", total)
        per_step = timed["replays"] / (steps - warmup)
        report.check("Stage II replayed from CUDA graphs", per_step >= 1 and total["cudagraph_skips"] == 0,
                     f"{timed['replays']} graph replays in the {steps - warmup} steps after warm-up "
                     f"({per_step:.1f} per step), {total['captures']} captures in all, "
                     f"{total['cudagraph_skips']} graphs skipped by inductor", replays_per_step=per_step)
        report.check("no recompilation after warm-up",
                     timed["frames_compiled"] == 0 and timed["captures"] == 0 and total["graph_breaks"] == 0,
                     f"after warm-up: {timed['frames_compiled']} frames compiled, {timed['captures']} new "
                     f"captures; {total['frames_compiled']} frames, {total['graphs']} graphs and "
                     f"{total['graph_breaks']} graph breaks in all")
    else:
        report.skip("Stage II replayed from CUDA graphs", "needs CUDA")
        report.skip("no recompilation after warm-up", "dry run: nothing compiled (torch.compile skipped)")
    del trainer

    half = "bf16" if not cuda or torch.cuda.is_bf16_supported() else "fp16"
    torch._dynamo.reset()
    half_losses, _, _, _ = _engine_run(device, "fast", None, 0, amp=half, **compile_options)
    dev = (half_losses - ref_losses).abs() / ref_losses.abs().clamp_min(1e-6)
    ce_dev, reg_dev = float(dev[:, 0].max()), float(dev[:, 1:].max())
    crr_dev, frr_dev = float(dev[:, 1].max()), float(dev[:, 2].max())
    finite = bool(torch.isfinite(half_losses).all())
    # the band: docs/gpu-check.md's (stage c: CE 5 %, CRR/FRR 25 %); per column in the detail too
    report.check(f"{half} {engine.split(' (')[0]} within the documented band",
                 finite and ce_dev < 0.05 and reg_dev < 0.25,
                 f"largest relative deviation from the fp32 reference over {steps} steps: CE {ce_dev:.3f} "
                 f"(< 0.05), CRR/FRR {reg_dev:.3f} (< 0.25; CRR {crr_dev:.2g}, FRR {frr_dev:.2g}); finite: "
                 f"{finite}", ce=ce_dev, crr=crr_dev, frr=frr_dev, crr_frr=reg_dev)
    parts = [f"fp32 rel. diff {rel:.1e}", f"{half} CE {ce_dev:.3f} CRR/FRR {reg_dev:.3f}"]
    if cuda:
        parts.append(f"{per_step:.1f} graph replays/step, {timed['frames_compiled']} recompiles after "
                     "warm-up")
    report.summary(f"{engine}: " + ", ".join(parts))


# -- d: DALI mixed decoding against the torchvision path -------------------------------------------

def _subset(dataset, count: int | None, transform=None):
    from mmcam_fast.data.datasets import WSOLDataset
    from mmcam_fast.data.metadata import WSOLMetadata

    ids = dataset.image_ids if count is None else dataset.image_ids[:count]
    labels = {i: dataset.metadata.labels[i] for i in ids}
    return WSOLDataset(dataset.image_root, WSOLMetadata(dataset.image_root, ids, labels),
                       transform or dataset.transform)


def _d_cases(shapes: Shapes, eq) -> tuple[str, list[tuple[str, Any, str, float, float]]]:
    """(where the JPEGs come from, [(case, data set, kind, interior bound, border bound)])."""
    from mmcam_fast.data.transforms import eval_transform, train_transform

    data = eq.DATA
    interior, border = eq.INTERIOR_LEVELS, eq.BORDER_LEVELS
    if (data / "fruit-voc" / "test").is_dir() and (data / "tiny-imagenet-5" / "val").is_dir():
        size = shapes.d_size or 224
        fruit = _subset(eq._dataset("fruit-voc", "test/*.jpg", eval_transform(size)), shapes.d_images)
        tiny = _subset(eq._dataset("tiny-imagenet-5", "val/images/*.JPEG", eval_transform(size)),
                       shapes.d_images)
        train = _subset(fruit, None, train_transform(size, vertical_flip=True))
        return str(data), [
            (f"eval, fruit-voc test at {size} (downscaling)", fruit, "eval", interior, border),
            (f"eval, tiny-imagenet-5 val at {size} ({'upscaling' if size > 64 else 'same size'})", tiny,
             "eval", interior if size > 64 else eq.EPS, interior if size > 64 else eq.EPS),
            (f"train, fruit-voc test at {size} (R = {round(size * 8 / 7)}), flips", train, "train", interior,
             border)]
    # no shared data here: the synthetic set's JPEGs (64 px), upscaled for eval, as train crops at 64
    from mmcam_fast.data.datasets import WSOLDataset
    from mmcam_fast.data.metadata import WSOLMetadata
    from mmcam_fast.data.synthetic import make_synthetic

    root = make_synthetic(Path(tempfile.mkdtemp(prefix="gpu-check-d-")) / "synthetic", train_per_class=10,
                          val_per_class=5, test_per_class=5)
    ids = sorted(str(p.relative_to(root)) for p in root.glob("images/test/*/*.jpg"))[:shapes.d_images or None]
    labels = {i: 0 for i in ids}
    meta = WSOLMetadata(root, ids, labels)
    return f"synthetic JPEGs (no shared data at {data})", [
        ("eval, synthetic test at 224 (upscaling)", WSOLDataset(root, meta, eval_transform(224)), "eval",
         interior, interior),
        ("train, synthetic test at 64 (R = 73), flips",
         WSOLDataset(root, meta, train_transform(64, vertical_flip=True)), "train", interior, interior)]


def _eval_levels(eq, dataset, decode_device: str):
    """Per image, DALI's output against the torch path's, in 8-bit levels; and the border masks."""
    import torch

    from mmcam_fast.data.dali import DaliLoader
    from mmcam_fast.data.loaders import build_loader

    dali = DaliLoader(dataset, batch_size=16, workers=2, parallel=False, return_sizes=True,
                      decode_device=decode_device)
    torch_loader, _ = build_loader(dataset, batch_size=16, return_sizes=True)
    diffs, borders, ids, outputs = [], [], [], []
    try:
        for (a, la, ia, sa), (b, lb, ib, sb) in zip(dali, torch_loader, strict=True):
            a = a.cpu()
            same = a.shape == b.shape and torch.equal(ia, ib) and torch.equal(la, lb) and torch.equal(sa, sb)
            if not same:
                raise AssertionError(f"geometry differs: shapes {tuple(a.shape)} / {tuple(b.shape)}, "
                                     "or indices, labels or original sizes")
            for k, index in enumerate(ia.tolist()):
                diffs.append(eq._levels(a[k], b[k]))
                borders.append(eq._border(a.shape[-1]))
                ids.append(dataset.image_ids[index])
                outputs.append(a[k])
    finally:
        dali.close()
    return diffs, borders, ids, outputs


def _train_levels(eq, dataset, decode_device: str):
    from mmcam_fast.data.dali import DaliLoader, plan_augmentation

    loader = DaliLoader(dataset, batch_size=16, workers=2, parallel=False, seed=7,
                        decode_device=decode_device)
    diffs, borders, ids, outputs = [], [], [], []
    try:
        loader.set_epoch(3)
        for position, (images, _, indices) in enumerate(loader):
            images = images.cpu()
            side = images.shape[-1]  # the crop C; the train resize R = round(C * 8 / 7)
            resize = round(side * 8 / 7)
            # planned for a whole batch (a short last batch is padded), as the loader plans it
            params = plan_augmentation(loader.spec, loader.batch_size, seed=7, rank=0, epoch=3,
                                       position=position)
            for k, index in enumerate(indices.tolist()):
                reference = eq._reference_train(dataset.image_path(index), params[k], side, resize)
                diffs.append(eq._levels(images[k], reference))
                borders.append(eq._train_border(params[k], side, resize))
                ids.append(dataset.image_ids[index])
                outputs.append(images[k])
    finally:
        loader.close()
    return diffs, borders, ids, outputs


def _level_stats(diffs, borders) -> dict[str, float]:
    import torch

    interior = max(float(d[:, ~b].max()) for d, b in zip(diffs, borders, strict=True))
    border = max((float(d[:, b].max()) for d, b in zip(diffs, borders, strict=True) if b.any()), default=0.0)
    return {"interior_max": round(interior, 4), "border_max": round(border, 4),
            "mean": round(float(torch.cat([d.flatten() for d in diffs]).mean()), 4)}


def stage_d(report: Report, dry_run: bool, shapes: Shapes, budget: float) -> None:
    import torch

    from mmcam_fast.data.dali import dali_available

    if not dali_available():
        raise SkipStage("nvidia-dali is not installed (pip install -e '.[dali]')")
    torch.set_num_threads(1)  # as tests/test_dali_equivalence.py: the torch path in this process
    eq = _import_from(TESTS, "test_dali_equivalence")
    source, cases = _d_cases(shapes, eq)
    report.metric("jpegs", source)
    decode = "cpu" if dry_run else "mixed"
    if dry_run:
        report.skip("DALI 'mixed' (nvJPEG) decoding",
                    "needs CUDA; the dry run checks the CPU pipeline instead")
    failures, mixed_vs_cpu = 0, {}
    for case, dataset, kind, interior, border in cases:
        levels = _eval_levels if kind == "eval" else _train_levels
        try:
            diffs, borders, ids, outputs = levels(eq, dataset, decode)
        except Exception as error:  # a loader that fails is this case's failure, not the stage's
            failures += 1
            report.check(f"{decode}: {case}", False, f"{type(error).__name__}: {error}"[:1000])
            continue
        stats = _level_stats(diffs, borders)
        try:
            eq._compare(diffs, borders, ids, interior=interior, border=border)
            ok, detail = True, ""
        except AssertionError as error:
            ok, detail = False, str(error)[:600]
        failures += not ok
        text = (f"{len(diffs)} images; levels: interior max {stats['interior_max']} (<= {interior}), border "
                f"max {stats['border_max']} (<= {border}), mean {stats['mean']} (<= {eq.MEAN_LEVELS}) "
                f"{detail}")
        report.check(f"{decode}: {case}", ok, text.strip(), images=len(diffs), **stats)
        if not dry_run:  # nvJPEG + GPU operators against DALI's own CPU pipeline, for the record
            cpu = (_eval_levels if kind == "eval" else _train_levels)(eq, dataset, "cpu")[3]
            diff = [((g - c).abs() * eq.LEVEL) for g, c in zip(outputs, cpu, strict=True)]
            mixed_vs_cpu[case] = {"max": round(max(float(d.max()) for d in diff), 4),
                                  "mean": round(float(torch.cat([d.flatten() for d in diff]).mean()), 4)}
            report.metric("mixed_vs_dali_cpu_levels", mixed_vs_cpu)
    report.summary(f"DALI '{decode}' vs torchvision on {source}: {len(cases) - failures}/{len(cases)} cases "
                   "within the CPU equivalence's bound")


# -- e: the step benchmark -------------------------------------------------------------------------

def _model_at(backbone: str, classes: int, stride: int | None):
    """A CAM model at feature stride ``stride`` (None: the project's default), through whichever flag
    ``create_model`` has (``feature_stride``, or the older ``large_feature_map``)."""
    import inspect

    from mmcam_fast.models import create_model

    if stride is None:
        return create_model(backbone, classes)
    params = inspect.signature(create_model).parameters
    if "feature_stride" in params:
        return create_model(backbone, classes, feature_stride=stride)
    if "large_feature_map" in params and stride in (8, 16):
        return create_model(backbone, classes, large_feature_map=stride == 8)
    raise RuntimeError(f"create_model has no flag for feature stride {stride}")


def _map_size(model, image: int, device) -> int:
    import torch

    with torch.no_grad():
        model.eval()
        side = model.backbone(torch.zeros(1, 3, image, image, device=device)).shape[-1]
        model.train()
    return int(side)


ENGINES = {  # label: (TrainConfig options, needs CUDA, compiles)
    "reference": ({"impl": "reference"}, False, False),
    "fast eager": ({"impl": "fast", "compile": False}, False, False),
    "fast + compile": ({"impl": "fast", "compile": True, "cuda_graphs": False}, False, True),
    "fast + compile + CUDA graphs": ({"impl": "fast", "compile": True, "cuda_graphs": True}, True, True),
}
# the CE step of each engine: Stage I only, so CUDA graphs (Stage II only) make no difference
CE_TWIN = {"reference": "reference", "fast eager": "fast eager", "fast + compile": "fast + compile",
           "fast + compile + CUDA graphs": "fast + compile"}
# in order of importance, so that a stage cut short by its time limit keeps the most useful rows
E_ORDER = (("reference", False), ("reference", True), ("fast eager", False), ("fast eager", True),
           ("fast + compile + CUDA graphs", False), ("fast + compile", True), ("fast + compile", False))


def _measure(shapes: Shapes, stride: int, engine: str, ce: bool, device, counter: CudaGraphCounter):
    import torch

    from mmcam_fast.config import TrainConfig
    from mmcam_fast.engine import Trainer

    options = dict(ENGINES[engine][0])
    if ce:
        options.update(lambda_crr=0.0, lambda_frr=0.0)
    torch.manual_seed(0)
    model = _model_at(shapes.e_backbone, shapes.e_classes, stride).to(device)
    trainer = Trainer(model, TrainConfig(set_size=shapes.e_set_size, sets_per_batch=shapes.e_sets, lr=1e-3,
                                         **options))
    batch = shapes.e_sets * shapes.e_set_size
    images = torch.randn(batch, 3, shapes.e_image, shapes.e_image, device=device)
    labels = torch.arange(shapes.e_sets, device=device).repeat_interleave(shapes.e_set_size)
    start = time.perf_counter()
    for _ in range(shapes.e_warmup + (1 if ENGINES[engine][2] else 0)):
        trainer.train_step(images, labels)
    _sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = counter.snapshot()
    start = time.perf_counter()
    for _ in range(shapes.e_steps):
        metrics = trainer.train_step(images, labels)
    _sync(device)
    seconds = (time.perf_counter() - start) / shapes.e_steps
    after = counter.snapshot()
    finite = all(bool(torch.isfinite(v).all()) for v in metrics.values())
    delta = CudaGraphCounter.delta(before, after)
    row = {"s_per_step": round(seconds, 5), "images_per_s": round(batch / seconds, 1),
           "warmup_s": round(warmup_s, 2),
           "amp": "fp32" if trainer.amp_dtype is None else str(trainer.amp_dtype).replace("torch.", ""),
           "finite": finite, "recompiles": delta["frames_compiled"],
           "graph_replays_per_step": (round(delta["replays"] / shapes.e_steps, 2) if counter.available
                                      else None)}
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del trainer, model, images
    return row


def _cleanup(device) -> None:
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def stage_e(report: Report, dry_run: bool, shapes: Shapes, budget: float) -> None:
    import torch

    device = _device(dry_run)
    counter = CudaGraphCounter()
    default_model = _model_at(shapes.e_backbone, shapes.e_classes, None).to(device)
    default_map = _map_size(default_model, shapes.e_image, device)
    del default_model
    # the default geometry first, then the others
    strides = sorted(shapes.e_strides, key=lambda s: shapes.e_image // s != default_map)
    report.metric("setup", {"backbone": f"{shapes.e_backbone}_cam", "image": shapes.e_image,
                            "N": shapes.e_sets, "S": shapes.e_set_size, "classes": shapes.e_classes,
                            "warmup_steps": shapes.e_warmup, "timed_steps": shapes.e_steps,
                            "default_map": f"{default_map}x{default_map}", "device": str(device)})
    rows: list[dict[str, Any]] = []
    report.metric("rows", rows)
    for stride in strides:
        model = _model_at(shapes.e_backbone, shapes.e_classes, stride).to(device)
        side = _map_size(model, shapes.e_image, device)
        del model
        geometry = {"map": f"{side}x{side}", "feature_stride": stride, "default": side == default_map}
        if side != shapes.e_image // stride:
            report.skip(f"map {shapes.e_image // stride}",
                        f"create_model gives {side}x{side} at stride {stride}")
            continue
        for engine, ce in E_ORDER:
            row = {**geometry, "engine": engine, "step": "CE" if ce else "MinMaxCAM"}
            needs_cuda, compiles = ENGINES[engine][1], ENGINES[engine][2]
            if needs_cuda and device.type != "cuda":
                row.update(status="skip", reason="needs CUDA")
            elif compiles and dry_run:
                row.update(status="skip", reason="dry run: torch.compile takes minutes on a 2-core CPU")
            else:
                try:
                    row.update(status="ok", **_measure(shapes, stride, engine, ce, device, counter))
                except torch.cuda.OutOfMemoryError as error:
                    row.update(status="skip", reason=f"out of GPU memory: {str(error).splitlines()[0][:200]}")
                except Exception as error:
                    row.update(status="fail", reason=f"{type(error).__name__}: {error}"[:800])
                _cleanup(device)
            rows.append(row)
            _derive(rows)
            report.metric("rows", rows)
    failed = [f"{r['map']} {r['engine']} {r['step']}" for r in rows if r["status"] == "fail"]
    report.check("every measured step ran", not failed, "; ".join(failed))
    nonfinite = [f"{r['map']} {r['engine']} {r['step']}" for r in rows
                 if r["status"] == "ok" and not r["finite"]]
    report.check("losses finite", not nonfinite, "; ".join(nonfinite))
    parts = []
    for side in dict.fromkeys(r["map"] for r in rows):
        best = [r for r in rows if r["map"] == side and r["step"] == "MinMaxCAM" and r["status"] == "ok"]
        if best:
            top = max(best, key=lambda r: r["images_per_s"])
            parts.append(f"{side}: {top['engine']} {top['images_per_s']:.0f} img/s "
                         f"({top.get('vs_reference', 0):.2f}x reference), "
                         f"{top.get('in_ce_steps', float('nan')):.2f} CE steps")
    report.summary("; ".join(parts) or "nothing measured")


def _derive(rows: list[dict[str, Any]]) -> None:
    """vs reference (the reference step of the same kind and geometry) and the cost in CE steps."""
    def find(side, engine, step):
        return next((r for r in rows if r["map"] == side and r["engine"] == engine and r["step"] == step
                     and r["status"] == "ok"), None)

    for row in rows:
        if row["status"] != "ok":
            continue
        reference = find(row["map"], "reference", row["step"])
        if reference:
            row["vs_reference"] = round(reference["s_per_step"] / row["s_per_step"], 2)
        if row["step"] == "MinMaxCAM":
            twin = find(row["map"], CE_TWIN[row["engine"]], "CE")
            if twin:
                row["ce_twin"] = f"{twin['engine']} CE"
                row["in_ce_steps"] = round(row["s_per_step"] / twin["s_per_step"], 2)


# -- f: the evaluator ------------------------------------------------------------------------------

def stage_f(report: Report, dry_run: bool, shapes: Shapes, budget: float) -> None:
    import numpy as np

    from mmcam_fast.evaluation import BoxEvaluator, accumulate_boxes
    realistic_scoremaps = _import_from(TESTS, "scoremap_samples").realistic_scoremaps

    rng = np.random.default_rng(0)
    ids = [f"map{i:04d}" for i in range(shapes.f_maps)]
    gt = {}
    for image_id in ids:
        boxes = []
        for _ in range(1 + (rng.random() < 0.2)):  # a fifth of the images with two objects
            x0, y0 = rng.integers(0, 160, 2)
            w, h = rng.integers(24, 224 - max(x0, y0), 2)
            boxes.append((int(x0), int(y0), int(min(223, x0 + w)), int(min(223, y0 + h))))
        gt[image_id] = boxes
    start = time.perf_counter()
    maps = realistic_scoremaps(len(ids), seed=1, gt_boxes=[gt[i] for i in ids])
    items = [(i, m.astype(np.float64)) for i, m in zip(ids, maps, strict=True)]
    report.metric("maps", {"count": len(items), "generated_s": round(time.perf_counter() - start, 2)})

    def evaluate(impl: str, threads: int | None, subset=items):
        single = BoxEvaluator(gt, impl=impl, iou_thresholds=[50], multi_contour=False)
        multi = BoxEvaluator(gt, impl=impl, iou_thresholds=[30, 50, 70], multi_contour=True)
        begin = time.perf_counter()
        accumulate_boxes([single, multi], subset, check=False, threads=threads)
        return single, multi, time.perf_counter() - begin

    _, _, load_s = evaluate("fast", 1, items[:3])  # numba: compiled on first use, then cached on disk
    fast_single, fast_multi, fast_s = evaluate("fast", None)
    ref_single, ref_multi, ref_s = evaluate("reference", 1)
    same = (np.array_equal(fast_single.num_correct, ref_single.num_correct)
            and np.array_equal(fast_multi.num_correct, ref_multi.num_correct))
    maxboxacc, v2 = fast_single.compute().per_iou[50], fast_multi.compute().per_iou
    report.metric("times", {"reference_s": round(ref_s, 2), "fast_s": round(fast_s, 3),
                            "ratio": round(ref_s / fast_s, 1), "numba_first_use_s": round(load_s, 2),
                            "reference_threads": 1, "fast_threads": "one per core, at most 8"})
    report.metric("scores", {"maxboxacc": maxboxacc, "maxboxacc_v2": round(sum(v2.values()) / len(v2), 3)})
    report.check("fast counts == reference counts", same,
                 f"{len(items)} maps, 100 CAM thresholds, MaxBoxAcc (IoU 50) and MaxBoxAccV2 (IoU 30/50/70)")
    report.summary(f"{len(items)} maps: reference {ref_s:.2f} s, fast {fast_s:.2f} s "
                   f"({ref_s / fast_s:.1f}x), counts {'identical' if same else 'DIFFER'}; numba first use "
                   f"{load_s:.1f} s")


# -- g: two ranks -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_worker(out: Path, steps: int) -> None:
    """One rank of stage g, started with torchrun's environment: a few fast-engine steps under DDP."""
    import torch

    from mmcam_fast import distributed
    from mmcam_fast.config import TrainConfig
    from mmcam_fast.engine import Trainer
    from mmcam_fast.models import unwrap

    tests = _import_from(TESTS, "test_engine_fast")
    cuda = os.environ.get("MMCAM_GPU_CHECK_BACKEND") == "nccl"
    world, device = distributed.init("cuda" if cuda else "cpu", timeout_min=2)
    try:
        model = tests._tiny_model().to(device)
        initial = distributed.parameter_fingerprint(model)
        # the fast engine as a CUDA run gets it (compile + CUDA graphs); eager on the CPU (dry run)
        trainer = Trainer(model, TrainConfig(set_size=3, sets_per_batch=2, lr=0.01, impl="fast",
                                             compile=None if cuda else False))
        losses = []
        for x, y in tests._batches()[world.rank::world.world_size][:steps]:  # each rank its own data
            metrics = trainer.train_step(x.to(device), y.to(device))
            losses.append([float(metrics[k]) for k in ("ce", "crr", "frr")])
        distributed.check_replicas_equal(unwrap(trainer.model))  # raises if the replicas differ
        result = {"rank": world.rank, "world_size": world.world_size, "backend": world.backend,
                  "device": str(device),
                  "ddp": isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel),
                  "initial": initial, "final": distributed.parameter_fingerprint(unwrap(trainer.model)),
                  "losses": losses, "skipped_steps": trainer.guard.state_dict()["skipped"]}
        (out / f"rank{world.rank}.json").write_text(json.dumps(result))
    finally:
        distributed.shutdown()


def stage_g(report: Report, dry_run: bool, shapes: Shapes, budget: float) -> None:
    import torch

    if not dry_run and torch.cuda.device_count() < 2:
        raise SkipStage(f"needs two or more CUDA GPUs ({torch.cuda.device_count()} visible)")
    backend = "gloo" if dry_run else "nccl"
    if dry_run:
        report.skip("NCCL", "needs two CUDA GPUs; the dry run runs the same two ranks with gloo on the CPU")
    out = Path(tempfile.mkdtemp(prefix="gpu-check-g-"))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "MMCAM_GPU_CHECK_BACKEND": backend}
        if dry_run:
            env["OMP_NUM_THREADS"] = "1"
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank-worker", str(out),
                                       "--rank-steps", str(shapes.g_steps)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + budget - 10
    tails = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            output, _ = proc.communicate()
        tails.append((proc.returncode, output[-1500:]))
    ok = all(code == 0 for code, _ in tails)
    report.check("both ranks finished", ok, "; ".join(f"rank {r}: exit {c}" + ("" if c == 0 else f": {t}")
                                                      for r, (c, t) in enumerate(tails)))
    files = [out / f"rank{r}.json" for r in range(2)]
    results = [json.loads(f.read_text()) for f in files if f.exists()]
    shutil.rmtree(out, ignore_errors=True)
    if len(results) < 2:
        report.summary("a rank did not finish")
        return
    report.metric("ranks", results)
    same = results[0]["final"] == results[1]["final"]
    moved = results[0]["final"] != results[0]["initial"]
    report.check(f"{backend}: identical weights on both ranks", same and moved,
                 f"parameter SHA-1 {results[0]['final'][:12]} / {results[1]['final'][:12]}; changed from the "
                 f"initial weights: {moved}; backend {results[0]['backend']}, DDP {results[0]['ddp']}")
    finite = all(v == v and abs(v) != float("inf") for r in results for step in r["losses"] for v in step)
    report.check("losses finite, no step skipped", finite and all(r["skipped_steps"] == 0 for r in results))
    report.summary(f"2 ranks ({backend}, {results[0]['device']} / {results[1]['device']}), "
                   f"{shapes.g_steps} steps: weights {'identical' if same else 'DIFFER'}")


STAGE_FUNCTIONS = {"a": stage_a, "b": stage_b, "c": stage_c, "d": stage_d, "e": stage_e, "f": stage_f,
                   "g": stage_g}


def child_main(key: str, result: Path, dry_run: bool, inject: str | None, budget: float) -> int:
    """Run one stage in this process; its report goes to ``result``."""
    report = Report(result)
    try:
        if inject == "hang":
            time.sleep(10**6)
        elif inject == "crash":
            os.abort()  # as a CUDA error or a segfault ends a process: no report, a signal
        elif inject == "fail":
            report.check("injected failure", False, "--inject")
        elif inject == "error":
            raise RuntimeError("injected error")
        STAGE_FUNCTIONS[key](report, dry_run, DRY_SHAPES if dry_run else GPU_SHAPES, budget)
    except SkipStage as reason:
        report.data["skipped"] = str(reason)
    except Exception as error:
        report.data["error"] = f"{type(error).__name__}: {error}"[:2000]
        report.data["traceback"] = traceback.format_exc()[-6000:]
        report.save()
        return 1
    report.data["finished"] = True
    report.save()
    return 0


# -- the driver ----------------------------------------------------------------------------------------

def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def _git() -> dict[str, Any] | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "modified_files": len(dirty.stdout.splitlines())}


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def run_stage(stage: Stage, budget: float, dry_run: bool, inject: str | None, work: Path) -> dict[str, Any]:
    """Run one stage in its own process and session; kill its process group at the time limit."""
    result, log = work / f"{stage.key}.json", work / f"{stage.key}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", stage.key, "--result", str(result),
               "--stage-budget", str(budget)]
    if dry_run:
        command.append("--dry-run")
    if inject:
        command += ["--inject", f"{stage.key}={inject}"]
    start = time.perf_counter()
    timed_out = False
    with log.open("w") as handle:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            timed_out = True
        except BaseException:  # Ctrl-C: take the stage's processes down with us
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            try:  # whatever the stage left running (pytest, ranks, compile workers) goes too
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    seconds = time.perf_counter() - start
    report: dict[str, Any] = {}
    if result.exists():
        try:
            report = json.loads(result.read_text())
        except json.JSONDecodeError:
            report = {}
    record = {"key": stage.key, "title": stage.title, "proves": stage.proves, "kind": stage.kind,
              "status": "pass", "seconds": round(seconds, 1), "budget_s": budget,
              "returncode": proc.returncode,
              "summary": report.get("summary", ""), "checks": report.get("checks", []),
              "metrics": report.get("metrics", {}), "error": None}
    if timed_out:
        record["status"] = "timeout"
        record["error"] = f"no result within the stage's time limit of {budget:.0f} s (process group killed)"
    elif "skipped" in report:
        record["status"], record["summary"] = "skip", report["skipped"]
    elif "error" in report:
        record["status"], record["error"] = "error", report["error"]
        record["traceback"] = report.get("traceback")
    elif proc.returncode != 0 or not report.get("finished"):
        record["status"] = "error"
        how = _signal_name(proc.returncode) if proc.returncode < 0 else f"exit status {proc.returncode}"
        record["error"] = f"the stage's process ended with {how} before it reported a result"
    elif any(c["status"] == "fail" for c in record["checks"]):
        record["status"] = "fail"
        record["error"] = "; ".join(f"{c['name']}: {c['detail']}" for c in record["checks"]
                                    if c["status"] == "fail")[:2000]
    if record["status"] in ("fail", "error", "timeout"):
        record["log_tail"] = log.read_text(errors="replace")[-3000:]
    return record


def failed(record: dict[str, Any]) -> bool:
    """Whether a stage counts against the exit status: a failure or crash, or a correctness stage out of
    time (the timing stage's partial results are kept, and slowness is not a failure)."""
    if record["status"] == "timeout":
        return record["kind"] == "correctness"
    return record["status"] in ("fail", "error")


def verdict_line(record: dict[str, Any]) -> str:
    text = record["error"] if record["status"] in ("error", "timeout") else record["summary"]
    if record["status"] == "fail":
        text = f"{record['summary']} | {record['error']}"
    return (f"{record['key']}  {record['status'].upper():<7} {record['seconds']:6.1f} s / "
            f"{record['budget_s']:3.0f} s  {record['title']}: {text}")


def markdown(doc: dict[str, Any]) -> str:
    env = doc.get("environment") or {}
    gpus = env.get("gpus") or []
    title = f"{gpus[0]['name']} x{len(gpus)}" if gpus else "dry run on the CPU (tiny shapes)"
    lines = [f"# GPU check: {title}", ""]
    facts = [doc["started"]]
    if doc.get("git"):
        facts.append(f"commit {doc['git']['commit'][:12]} ({doc['git']['modified_files']} files modified)")
    if env:
        facts.append(f"torch {env.get('torch')}, CUDA {env.get('cuda_runtime')}, triton {env.get('triton')}, "
                     f"DALI {env.get('dali')}")
        if gpus:
            facts.append(f"{gpus[0]['capability']}, driver {env.get('driver')}")
        facts.append(f"CPU {env.get('cpu', {}).get('model')}")
    if doc["dry_run"]:
        facts.append("a dry run: tiny shapes on the CPU, so its times show that the code runs and measure "
                     "nothing")
    lines += ["; ".join(facts) + ".", "",
              f"**{doc['verdict'].upper()}** (exit status {doc['exit_status']}), {doc['seconds']:.0f} s of a "
              f"{doc['budget_s']:.0f} s budget.", "",
              "| stage | what it proves | status | time | budget | result |",
              "| --- | --- | --- | ---: | ---: | --- |"]
    for s in doc["stages"]:
        result = (s["error"] if s["status"] in ("error", "timeout") else s["summary"]) or ""
        result = result.replace("|", "/").replace("\n", " ")
        lines.append(f"| {s['key']} {s['title']} | {s['proves']} | **{s['status']}** | {s['seconds']:.1f} s "
                     f"| {s['budget_s']:.0f} s | {result} |")
    for s in doc["stages"]:
        checks = s.get("checks") or []
        if checks:
            lines += ["", f"## {s['key']}. {s['title']}", "", "| check | status | detail |",
                      "| --- | --- | --- |"]
            lines += [f"| {c['name']} | {c['status']} | {str(c.get('detail', '')).replace('|', '/')[:400]} |"
                      for c in checks]
        if s["key"] == "e" and s["metrics"].get("rows"):
            setup = s["metrics"].get("setup", {})
            lines += ["", f"{setup.get('backbone')} at {setup.get('image')}, N x S = {setup.get('N')} x "
                      f"{setup.get('S')}, {setup.get('classes')} classes; timed steps: "
                      f"{setup.get('timed_steps')}, after warm-up steps: {setup.get('warmup_steps')} "
                      "(one more for the compiled engines); "
                      f"the default geometry is {setup.get('default_map')}. CE: the same engine with "
                      "lambda_crr = lambda_frr = 0 (Stage I only).", "",
                      "| map | engine | step | s / step | images / s | peak GiB | vs reference "
                      "| MinMaxCAM / CE | warm-up s | graph replays / step | recompiles |",
                      "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for r in s["metrics"]["rows"]:
                if r["status"] != "ok":
                    lines.append(f"| {r['map']} | {r['engine']} | {r['step']} | {r['status']}: "
                                 f"{r.get('reason', '')[:120]} | | | | | | | |")
                    continue
                default = " (default)" if r["default"] else ""
                lines.append(f"| {r['map']}{default} | {r['engine']} | {r['step']} | {r['s_per_step']:.4f} "
                             f"| {r['images_per_s']:.1f} | {r.get('peak_gib', '-')} "
                             f"| {r.get('vs_reference', '-')} | {r.get('in_ce_steps', '-')} "
                             f"| {r['warmup_s']} | {_dash(r['graph_replays_per_step'])} "
                             f"| {r['recompiles']} |")
    return "\n".join(lines) + "\n"


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def cuda_name() -> tuple[bool, str | None, int]:
    import torch

    if not torch.cuda.is_available():
        return False, None, 0
    return True, torch.cuda.get_device_name(0), torch.cuda.device_count()


def parse_pairs(values: list[str], what: str, convert) -> dict[str, Any]:
    pairs = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or key not in STAGE_KEYS:
            raise ValueError(f"{what} {value!r}: expected STAGE=VALUE, STAGE one of {','.join(STAGE_KEYS)}")
        try:
            pairs[key] = convert(item)
        except ValueError:
            raise ValueError(f"{what} {value!r}: {item!r} is not a number") from None
        if convert is float and not (math.isfinite(pairs[key]) and pairs[key] > 0):
            raise ValueError(f"{what} {value!r}: a time limit is a number of seconds > 0")
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prove the GPU paths on this machine's GPU in under 8 "
                                     "minutes (docs/gpu-check.md).")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the same stages on the CPU with tiny shapes; CUDA-only parts are skipped")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS})")
    parser.add_argument("--stages", default=",".join(STAGE_KEYS),
                        help="stages to run, e.g. a,c,e (default: all)")
    parser.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS",
                        help="another time limit for a stage, e.g. e=600 (repeatable)")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiply every stage's time limit (slower GPUs, busy machines)")
    # tests: STAGE=hang|crash|fail|error makes that stage misbehave at its start
    parser.add_argument("--inject", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=STAGE_KEYS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stage-budget", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--rank-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rank-steps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        injections = parse_pairs(args.inject, "--inject", str)
        budgets = parse_pairs(args.budget, "--budget", float)
        if not (math.isfinite(args.time_scale) and args.time_scale > 0):
            raise ValueError(f"--time-scale must be a finite number > 0, got {args.time_scale}")
        selected = [k.strip() for k in args.stages.split(",") if k.strip()]
        unknown = [k for k in selected if k not in STAGE_KEYS]
        if unknown or not selected:
            raise ValueError(f"--stages {args.stages!r}: stages are {','.join(STAGE_KEYS)}")
    except ValueError as error:
        print(f"gpu-check: {error}", file=sys.stderr)
        return 2
    if args.rank_worker:
        rank_worker(args.rank_worker, args.rank_steps)
        return 0
    if args.child:
        return child_main(args.child, args.result, args.dry_run, injections.get(args.child),
                          args.stage_budget)

    has_cuda, gpu, count = cuda_name()
    if not has_cuda and not args.dry_run:
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or pass --dry-run (make gpu-check ARGS=--dry-run) for the CPU dry run", file=sys.stderr)
        return 2
    name = "dry-run" if args.dry_run else _slug(gpu)
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stages = [s for s in STAGES if s.key in selected]
    limits = {s.key: budgets.get(s.key, (s.dry_budget_s if args.dry_run else s.budget_s) * args.time_scale)
              for s in stages}
    doc: dict[str, Any] = {
        "schema": SCHEMA, "name": name, "dry_run": args.dry_run, "gpu": {"name": gpu, "count": count},
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])], "git": _git(),
        "budget_s": sum(limits.values()), "seconds": 0.0, "verdict": "pass", "exit_status": 0,
        "environment": None, "stages": []}
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    start = time.perf_counter()
    try:
        for stage in stages:
            record = run_stage(stage, limits[stage.key], args.dry_run, injections.get(stage.key), work)
            if stage.key == "a":
                doc["environment"] = record["metrics"].get("environment")
            doc["stages"].append(record)
            doc["seconds"] = round(time.perf_counter() - start, 1)
            bad = [s for s in doc["stages"] if failed(s)]
            doc["verdict"], doc["exit_status"] = ("fail", 1) if bad else ("pass", 0)
            if record["status"] in ("fail", "error", "timeout"):
                shutil.copy(work / f"{stage.key}.log", out / f"{name}.{stage.key}.log")
                record["log"] = str(out / f"{name}.{stage.key}.log")
            json_path.write_text(json.dumps(doc, indent=2) + "\n")
            md_path.write_text(markdown(doc))
            print(verdict_line(record), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"gpu-check: {doc['verdict']} in {doc['seconds']:.0f} s; {json_path}, {md_path}", file=sys.stderr)
    return doc["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
