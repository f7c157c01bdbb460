"""The study's results: per-run table, mean and std per variant, plots, side-by-side overlays.

Written to the report folder: ``results.csv`` (one row per run), ``summary.csv`` and ``summary.md``
(mean and std over seeds per variant), ``curves.png`` (training curves), ``sweeps.png`` (lambda
and set-size studies), ``overlays.png`` (CAM and MinMaxCAM on the same test images).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from mmcam_fast.analysis import feature_dispersion
from mmcam_fast.data.datasets import WSOLDataset
from mmcam_fast.data.metadata import WSOLMetadata
from mmcam_fast.evaluation import BoxEvaluator, accumulate_boxes, gt_boxes_224, overlay_image
from mmcam_fast.experiments.plan import VARIANTS, Run, Variant
from mmcam_fast.localization import image_224, load_trained_model, predict_scoremaps

METRICS = (("maxboxacc", "MaxBoxAcc"), ("maxboxacc_v2", "MaxBoxAccV2"), ("gt_known_loc", "GT-known Loc"),
           ("top1_loc", "Top-1 Loc"), ("top1_cls", "Top-1 Cls"), ("val_maxboxacc_v2", "val MaxBoxAccV2"))
DISPERSION = (("dist_f", "d(f)"), ("dist_f_o", "d(f_o)"))
_BY_NAME = {v.name: v for v in VARIANTS}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dispersion_of(run: Run, test: WSOLDataset, device: str = "cpu") -> dict[str, Any]:
    """The Sec. 4.3 analysis of a finished run's selected model on the test split (cached in the run)."""
    cache = run.folder / "dispersion.json"
    if cache.is_file():
        return json.loads(cache.read_text())

    model, _, _ = load_trained_model(run.folder / "checkpoints" / "best.pt", device)
    result = feature_dispersion(model, test, device=device)
    cache.write_text(json.dumps(result, indent=2))
    return result


def collect(runs: list[Run], test: WSOLDataset | None) -> list[dict[str, Any]]:
    """One row per finished variant run: settings, test metrics, wall time, and the dispersion
    analysis on ``test`` (the test split, shared by every run; None skips the analysis)."""
    rows = []
    for run in runs:
        if not run.done:
            continue
        final = json.loads((run.folder / "final_metrics.json").read_text())
        variant = _BY_NAME.get(run.name, Variant(run.name, ()))
        row: dict[str, Any] = {
            "variant": run.name, "seed": run.seed, "lambda_crr": variant.value("lambda_crr"),
            "lambda_frr": variant.value("lambda_frr"), "set_size": variant.value("set_size"),
            "stage2_mask": run.flags.get("stage2_mask", "image"),
        }
        row.update({key: final["test"].get(key) for key, _ in METRICS if key in final["test"]})
        # the selection score: the best validation MaxBoxAccV2 (the checkpoint the test numbers are of)
        row["val_maxboxacc_v2"] = max((h["maxboxacc_v2"] for h in final["val_history"]), default=None)
        row["maxboxacc_threshold"] = final["test"].get("maxboxacc_threshold")
        if test is not None:
            dispersion = dispersion_of(run, test)
            row.update(dist_f=dispersion["f"]["mean"], dist_f_std=dispersion["f"]["std"],
                       dist_f_o=dispersion["f_o"]["mean"], dist_f_o_std=dispersion["f_o"]["std"])
        wall = run.folder / "wall_time.txt"
        row["wall_s"] = float(wall.read_text()) if wall.is_file() else None
        rows.append(row)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per variant, in the plan's order."""
    names = [v.name for v in VARIANTS if any(r["variant"] == v.name for r in rows)]
    summary = []
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        entry = {k: mine[0][k] for k in ("variant", "lambda_crr", "lambda_frr", "set_size", "stage2_mask")}
        entry["runs"] = len(mine)
        for key, _ in (*METRICS, *DISPERSION, ("wall_s", "")):
            if key in mine[0]:
                entry[key], entry[f"{key}_std"] = _mean_std([r[key] for r in mine])
        summary.append(entry)
    return summary


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def _cell(mean: float, std: float, digits: int = 1) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """The results table: mean ± std over seeds (percentages; distances to the class centre)."""
    head = ["variant", "λ_crr", "λ_frr", "S", "mask", *[t for _, t in METRICS], *[t for _, t in DISPERSION],
            "seeds"]
    rule = ["---"] * 5 + ["---:"] * (len(head) - 5)
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(rule) + " |"]
    for s in summary:
        cells = [s["variant"], f"{s['lambda_crr']:g}", f"{s['lambda_frr']:g}", str(s["set_size"]),
                 s["stage2_mask"]]
        cells += [_cell(s[k], s[f"{k}_std"]) for k, _ in METRICS]
        cells += [_cell(s.get(k, math.nan), s.get(f"{k}_std", math.nan), 3) for k, _ in DISPERSION]
        cells.append(str(s["runs"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def centre_prior(metadata: WSOLMetadata) -> dict[str, Any]:
    """What localization without a model scores on the test split: the same centred map for every image.

    Thresholding a centred isotropic Gaussian at the protocol's CAM thresholds gives centred square
    boxes of every size, so its MaxBoxAcc is that of the best single centred box for all images.
    Also the mean fraction of the image that the ground-truth boxes cover.
    """
    boxes = gt_boxes_224(metadata)
    ys, xs = np.mgrid[0:224, 0:224]
    gaussian = np.exp(-((xs - 111.5) ** 2 + (ys - 111.5) ** 2) / (2 * 56.0**2))
    prior = (gaussian - gaussian.min()) / (gaussian.max() - gaussian.min())
    single = BoxEvaluator(boxes, iou_thresholds=[50])
    multi = BoxEvaluator(boxes, multi_contour=True)
    accumulate_boxes([single, multi], ((i, prior) for i in metadata.image_ids))
    areas = [max(((x1 - x0 + 1) * (y1 - y0 + 1)) / 224**2 for x0, y0, x1, y1 in boxes[i])
             for i in metadata.image_ids]
    return {"maxboxacc": single.compute().per_iou[50], "maxboxacc_v2": multi.compute().mean,
            "mean_box_area_fraction": float(np.mean(areas)),
            "images_with_box_over_half": float(np.mean(np.array(areas) > 0.5) * 100), "images": len(areas)}


def _smooth(values: np.ndarray, window: int = 10) -> np.ndarray:
    """Moving average over ``window`` points (shorter at the start)."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.maximum(0, np.arange(1, len(values) + 1) - window)]) / counts


def _series(runs: list[Run], name: str, file: str, key: str, x: str) -> tuple[np.ndarray, np.ndarray,
                                                                              np.ndarray] | None:
    """Mean and std over the seeds of ``key`` against ``x`` in each run's JSONL file."""
    curves = []
    for run in runs:
        if run.name == name:
            rows = [r for r in _read_jsonl(run.folder / file) if key in r]
            if rows:
                curves.append({r[x]: r[key] for r in rows})
    if not curves:
        return None
    xs = sorted(set.intersection(*(set(c) for c in curves)))
    values = np.array([[c[v] for v in xs] for c in curves])
    return np.array(xs), values.mean(axis=0), values.std(axis=0)


def plot_curves(runs: list[Run], pretrain: list[Run], path: Path) -> None:
    """Pretraining loss; fine-tuning CE, CRR and FRR; validation MaxBoxAccV2 per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    series = _series(pretrain, "pretrain", "metrics.jsonl", "ce", "step")
    if series is not None:
        xs, mean, _ = series
        axes[0].plot(xs, _smooth(mean), color="gray")
    axes[0].set(title="Stage I pretraining (CAM), train CE", xlabel="step", ylabel="cross-entropy")
    for name, color in (("cam", "tab:blue"), ("minmaxcam", "tab:red"), ("feature_mask", "tab:green")):
        series = _series(runs, name, "metrics.jsonl", "ce", "step")
        if series is not None:
            axes[1].plot(series[0], _smooth(series[1]), color=color, label=name)
        series = _series(runs, name, "val_metrics.jsonl", "maxboxacc_v2", "epoch")
        if series is not None:
            axes[3].errorbar(series[0], series[1], yerr=series[2], color=color, label=name, capsize=3,
                             marker="o")
    for key, style in (("crr", "-"), ("frr", "--")):
        series = _series(runs, "minmaxcam", "metrics.jsonl", key, "step")
        if series is not None:
            axes[2].plot(series[0], _smooth(series[1]), style, color="tab:red", label=key.upper())
    axes[0].text(0.98, 0.95, "mean over seeds, moving average of 10 steps", transform=axes[0].transAxes,
                 ha="right", fontsize=8)
    axes[1].set(title="fine-tuning: Stage I train CE", xlabel="step")
    axes[2].set(title="fine-tuning: Stage II losses (minmaxcam)", xlabel="step")
    axes[3].set(title="val MaxBoxAccV2 (50 images)", xlabel="epoch", ylabel="%")
    for ax in axes[1:]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweeps(summary: list[dict[str, Any]], path: Path, prior: dict[str, Any] | None = None) -> None:
    """MaxBoxAcc and MaxBoxAccV2 against lambda_crr, lambda_frr and S (mean ± std over seeds).

    Plain CAM and, when given, the centre prior (:func:`centre_prior`) are drawn as lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {s["variant"]: s for s in summary}
    groups = (("lambda_crr", "λ_crr (λ_frr = 1)"), ("lambda_frr", "λ_frr (λ_crr = 1)"), ("set_size", "S"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (group, label) in zip(axes, groups, strict=True):
        members = sorted((s for s in summary if group in _BY_NAME[s["variant"]].groups),
                         key=lambda s: s[group])
        if not members:
            continue
        ticks = [f"{s[group]:g}" for s in members]
        for key, title, color in (("maxboxacc", "MaxBoxAcc", "tab:orange"), ("maxboxacc_v2", "MaxBoxAccV2",
                                                                             "tab:purple")):
            ax.errorbar(range(len(members)), [s[key] for s in members],
                        yerr=[0 if math.isnan(s[f"{key}_std"]) else s[f"{key}_std"] for s in members],
                        marker="o", capsize=3, color=color, label=title)
            if "cam" in by_name:
                ax.axhline(by_name["cam"][key], color=color, linestyle=":", label=f"{title}, plain CAM")
            if prior is not None:
                ax.axhline(prior[key], color=color, linestyle="--", alpha=0.5,
                           label=f"{title}, centre prior (no model)")
        ax.set_xticks(range(len(members)), ticks)
        ax.set(xlabel=label, ylabel="% (test)", title=f"effect of {label.split(' ')[0]}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_overlays(cam_run: Run, minmax_run: Run, test: WSOLDataset, path: Path, count: int = 8) -> list[str]:
    """Test images with the CAM and MinMaxCAM score maps side by side, each model's MaxBoxAcc box."""
    import matplotlib

    matplotlib.use("Agg")
    import cv2
    import matplotlib.pyplot as plt

    step = max(1, len(test) // count)  # spread over the split
    picked = range(0, step * count, step)[:count]
    ids = [test.image_id(k) for k in picked]
    boxes = gt_boxes_224(test.metadata)
    images = [image_224(test.image_path(k)) for k in picked]
    columns = []
    for run in (cam_run, minmax_run):
        model, _, _ = load_trained_model(run.folder / "checkpoints" / "best.pt")
        threshold = json.loads((run.folder / "final_metrics.json").read_text())["test"]["maxboxacc_threshold"]
        maps = {i: s for i, s, _, _ in predict_scoremaps(model, test) if i in set(ids)}
        pictures = [overlay_image(image, maps[i], boxes[i], threshold, image_id=i)
                    for image, i in zip(images, ids, strict=True)]
        columns.append((run.name, threshold, pictures))
    fig, axes = plt.subplots(len(columns), count, figsize=(2.2 * count, 2.5 * len(columns)))
    for row, (name, threshold, pictures) in enumerate(columns):
        for col, picture in enumerate(pictures):
            ax = axes[row, col]
            ax.imshow(cv2.cvtColor(picture, cv2.COLOR_BGR2RGB))
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"{name}\n(tau = {threshold:.2f})")
    fig.suptitle("test images: ground truth green, box at the model's MaxBoxAcc threshold red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return ids
