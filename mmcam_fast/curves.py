"""Training curves of a run folder: ``curves.png`` from ``metrics.jsonl`` and ``val_metrics.jsonl``.

Six panels: the Stage I loss (CE), the Stage II losses (CRR, FRR), the train accuracy and the
learning rate per step, and the validation scores (MaxBoxAccV2, MaxBoxAcc or PxAP, top-1
classification) per epoch. Drawn with matplotlib's Agg canvas (no display, no pyplot state) and
written atomically, so a reader never sees half a PNG; it can be redrawn at every epoch while the
run goes on.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CURVES_FILE = "curves.png"
_MAX_POINTS = 4000  # per line; longer series are thinned (the smoothed line is computed on all)

# (key in val_metrics.jsonl, label, line style); the first key present is the selection score
_VAL_SERIES = (("maxboxacc_v2", "MaxBoxAccV2", "-"), ("pxap", "PxAP", "-"),
               ("maxboxacc", "MaxBoxAcc", "-"), ("top1_cls", "top-1 cls", ":"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one a line; a missing file is empty, and lines that are
    not JSON objects (e.g. a line cut short by a crash) are skipped."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _number(value: Any) -> float | None:
    if type(value) is not float and type(value) is not int:  # not bool, str, None, ...
        return None
    return float(value) if math.isfinite(value) else None


Series = tuple[np.ndarray, np.ndarray]


def _columns(rows: Sequence[dict[str, Any]], x_key: str, keys: Sequence[str]) -> dict[str, Series]:
    """Per key, (x, y) of the rows with a finite value of it; a row without ``x_key`` takes its
    position. One pass over the rows (a long run has hundreds of thousands)."""
    xs: dict[str, list[float]] = {k: [] for k in keys}
    ys: dict[str, list[float]] = {k: [] for k in keys}
    for i, row in enumerate(rows):
        x = _number(row.get(x_key))
        for key in keys:
            y = _number(row.get(key))
            if y is not None:
                xs[key].append(float(i + 1) if x is None else x)
                ys[key].append(y)
    return {k: (np.asarray(xs[k], dtype=np.float64), np.asarray(ys[k], dtype=np.float64)) for k in keys}


def _smooth(y: np.ndarray) -> np.ndarray:
    """A trailing moving average over about 2% of the points (at least 5)."""
    window = max(5, len(y) // 50)
    cumsum = np.cumsum(np.insert(y, 0, 0.0))
    out = np.empty_like(y)
    head = min(window, len(y))
    out[:head] = cumsum[1:head + 1] / np.arange(1, head + 1)
    out[head:] = (cumsum[head + 1:] - cumsum[1:len(y) - head + 1]) / window
    return out


def _thin(x: np.ndarray, y: np.ndarray) -> Series:
    if len(x) <= _MAX_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, _MAX_POINTS).round().astype(int))
    return x[keep], y[keep]


def _plot_steps(ax: Any, x: np.ndarray, y: np.ndarray, label: str, color: str, smooth: bool = True) -> None:
    """A per-step line: with many points, the raw values faint and a moving average over them."""
    if len(x) > 20 and not smooth:
        ax.plot(*_thin(x, y), color=color, linewidth=1.4, label=label)
    elif len(x) > 20:
        ax.plot(*_thin(x, y), color=color, alpha=0.25, linewidth=0.8)
        ax.plot(*_thin(x, _smooth(y)), color=color, linewidth=1.6, label=label)
    else:
        ax.plot(x, y, color=color, marker="o", markersize=4, linewidth=1.4, label=label)


def _epoch_starts(steps: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """The steps at which a new epoch begins (after the first)."""
    return steps[1:][np.diff(epochs) != 0] - 0.5


def _integer_x(ax: Any, xs: np.ndarray) -> None:
    """A few whole-number ticks (steps, epochs), thousands as k, and room around a single point."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    if len(xs) and xs.max() >= 10_000:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x else "0"))
    if len(xs) and xs.max() - xs.min() < 2:
        ax.set_xlim(xs.min() - 1, xs.max() + 1)


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} yet", ha="center", va="center", transform=ax.transAxes, color="0.5")
    ax.set_xticks([])
    ax.set_yticks([])


def _title(run_dir: Path) -> str:
    title = run_dir.resolve().name or str(run_dir)
    try:
        final = json.loads((run_dir / "final_metrics.json").read_text())
    except (OSError, ValueError):
        return title
    test = final.get("test") if isinstance(final, dict) else None
    if isinstance(test, dict):
        scores = [f"{label} {_number(test[key]):.1f}" for key, label, _ in _VAL_SERIES
                  if _number(test.get(key)) is not None]
        if scores:
            title += "  |  test: " + ", ".join(scores)
    return title


def write_curves(run_dir: str | Path) -> Path | None:
    """Draw ``run_dir/curves.png`` from the run's metric files; returns its path.

    Returns None (and writes nothing) when neither ``metrics.jsonl`` nor ``val_metrics.jsonl`` holds
    a value to plot. Missing files, rows without some keys, non-finite values and single points are
    all drawn as far as they go. The PNG is written to a temporary file in ``run_dir`` and moved
    into place (``os.replace``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    train_rows = read_jsonl(run_dir / "metrics.jsonl")
    val_rows = read_jsonl(run_dir / "val_metrics.jsonl")
    train = _columns(train_rows, "step", ["ce", "crr", "frr", "acc", "lr", "epoch"])
    val = _columns(val_rows, "epoch", [key for key, _, _ in _VAL_SERIES])
    if not any(len(train[k][0]) for k in ("ce", "crr", "frr", "acc")) and not any(
            len(x) for x, _ in val.values()):
        return None

    fig = Figure(figsize=(14, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    (ax_ce, ax_crr, ax_frr), (ax_acc, ax_lr, ax_val) = fig.subplots(2, 3)
    fig.suptitle(_title(run_dir), fontsize=11)
    starts = _epoch_starts(*train["epoch"])
    if len(starts) > 40:  # epoch lines only where they stay apart
        starts = []

    panels = [(ax_ce, "ce", "CE", 1.0, "Stage I: classification loss (CE)", "C0"),
              (ax_crr, "crr", "CRR", 1.0, "Stage II: common region loss (CRR)", "C1"),
              (ax_frr, "frr", "FRR", 1.0, "Stage II: full region loss (FRR)", "C2"),
              (ax_acc, "acc", "accuracy", 100.0, "train accuracy (%)", "C3"),
              (ax_lr, "lr", "lr", 1.0, "learning rate (backbone)", "C4")]
    for ax, key, label, scale, title, color in panels:
        ax.set_title(title, fontsize=10)
        x, y = train[key]
        if not len(x):
            _no_data(ax, label)
            continue
        _plot_steps(ax, x, y * scale, label, color, smooth=key != "lr")
        for step in starts:
            ax.axvline(step, color="0.85", linewidth=0.8, zorder=0)
        ax.set_xlabel("step")
        _integer_x(ax, x)
        ax.grid(alpha=0.3)
    lr = train["lr"][1]
    if len(lr) and (lr > 0).all() and lr.max() > 2 * lr.min():
        ax_lr.set_yscale("log")
    elif len(lr):
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    title, epochs = "validation (%)", np.zeros(0)
    for i, (key, label, style) in enumerate(_VAL_SERIES):
        x, y = val[key]
        if not len(x):
            continue
        ax_val.plot(x, y, linestyle=style, marker="o", markersize=4, color=f"C{i}", label=label)
        if not len(epochs):  # the first is the selection score: mark its best epoch (the first of ties)
            best = int(np.argmax(y))
            ax_val.plot(x[best], y[best], marker="*", markersize=13, color=f"C{i}", linestyle="none")
            title += f": best {label} {y[best]:.1f} at epoch {x[best]:g}"
        epochs = np.concatenate([epochs, x])
    ax_val.set_title(title, fontsize=10)
    if len(epochs):
        ax_val.set_xlabel("epoch")
        _integer_x(ax_val, epochs)
        ax_val.margins(y=0.15)
        ax_val.grid(alpha=0.3)
        ax_val.legend(fontsize=8, loc="best")
    else:
        _no_data(ax_val, "validation")

    target = run_dir / CURVES_FILE
    tmp = run_dir / f".{CURVES_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with tmp.open("xb") as out:
            fig.savefig(out, format="png")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
