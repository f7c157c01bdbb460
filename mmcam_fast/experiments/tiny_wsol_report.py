"""The Tiny-ImageNet WSOL study's report, built from the committed result rows alone.

Written to the report folder (``experiments/tiny-imagenet-wsol/``): ``report.md`` (the gate's recipes,
one main table per benchmark and backbone with the paired difference MinMaxCAM - CAM and its 95 %
interval over seeds, the sweeps, the dispersion analysis, the centred-Gaussian baseline, wall times),
``summary.csv``, ``sweeps.png``, ``curves.png`` and, where the run folders are at hand,
``overlays.png`` (the same test images under CAM and MinMaxCAM) and the score-map agreement of each
main pair (cached in ``agreement.json``, so the table stays when the folders are gone).
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mmcam_fast.data.metadata import load_metadata
from mmcam_fast.data.splits import build_datasets
from mmcam_fast.errors import MMCamError
from mmcam_fast.experiments.plan import Run
from mmcam_fast.experiments.report import centre_prior
from mmcam_fast.experiments.report import plot_overlays as draw
from mmcam_fast.experiments.tiny_wsol_study import SWEEP_GROUPS, run_folder
from mmcam_fast.localization import load_trained_model, predict_scoremaps

# t quantiles (0.975) for the 95 % interval of a mean over n paired seeds (n - 1 degrees of freedom)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
METRICS = (
    ("maxboxacc", "MaxBoxAcc"),
    ("maxboxacc_v2", "MaxBoxAccV2"),
    ("iou30", "IoU30"),
    ("iou50", "IoU50"),
    ("iou70", "IoU70"),
    ("gt_known_loc", "GT-known"),
    ("top1_loc", "Top-1 Loc"),
    ("top1_cls", "Top-1 Cls"),
)
PAPER_GAIN = "+2.5 to +6.9"  # MinMaxCAM - CAM in MaxBoxAccV2 on the paper's benchmarks
BENCHMARK_TITLES = {
    "wsol20": "Tiny-ImageNet-WSOL-20 (small objects)",
    "tiny5": "Tiny-ImageNet-5 (large objects)",
}


def load_rows(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(folder.glob("*.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except ValueError:
            continue
    return rows


def test_values(row: dict[str, Any]) -> dict[str, float]:
    test = row["test"]
    values = {key: test[key] for key, _ in METRICS if key in test}
    for iou in ("30", "50", "70"):
        values[f"iou{iou}"] = test["per_iou"][iou]
    return values


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def paired_difference(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float, int]:
    """Mean of b - a over the seeds both have, and its 95 % t interval: (mean, low, high, pairs)."""
    seeds = sorted(set(a) & set(b))
    diffs = np.array([b[s] - a[s] for s in seeds])
    if len(diffs) == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(diffs.mean())
    if len(diffs) < 2:
        return mean, math.nan, math.nan, 1
    half = _T975[len(diffs) - 1] * float(diffs.std(ddof=1)) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half, len(diffs)


def _cell(mean: float, std: float, digits: int = 1) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def centre_priors(
    prepare: Callable[[str], Path], report_dir: Path, names: set[str]
) -> dict[str, dict[str, Any]]:
    """The centred-Gaussian baseline on the val and test splits of the benchmarks ``names`` (cached in
    the report dir, so the report can be rebuilt without the data)."""
    cache = report_dir / "centre_prior.json"
    priors = json.loads(cache.read_text()) if cache.is_file() else {}

    changed = False
    for name in sorted(names):
        if name in priors:
            continue
        try:
            root = prepare(name)
        except MMCamError:
            continue  # no data here: the report keeps what it has
        priors[name] = {
            split: centre_prior(load_metadata(root / "metadata" / split)) for split in ("val", "test")
        }
        changed = True
    if changed:
        cache.write_text(json.dumps(priors, indent=1) + "\n")
    return priors


def main_tables(rows: list[dict[str, Any]], priors: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """One table per (benchmark, backbone): CAM, MinMaxCAM (mean ± std over seeds), the paired
    difference with its 95 % interval, the centred Gaussian."""
    lines, summary = [], []
    head = ["method", *[t for _, t in METRICS], "seeds"]
    for benchmark in ("wsol20", "tiny5"):
        for backbone in ("resnet18", "mobilenet_v2"):
            mine = [
                r
                for r in rows
                if r["benchmark"] == benchmark and r["backbone"] == backbone and "main" in r["groups"]
            ]
            if not mine:
                continue
            lines += [
                f"#### {BENCHMARK_TITLES[benchmark]}, {backbone}-CAM (test split)",
                "",
                "| " + " | ".join(head) + " |",
                "| --- | " + " | ".join(["---:"] * (len(head) - 1)) + " |",
            ]
            per_variant: dict[str, dict[int, dict[str, float]]] = {}
            for variant in ("cam", "minmaxcam"):
                runs = {r["seed"]: test_values(r) for r in mine if r["variant"] == variant}
                per_variant[variant] = runs
                if not runs:
                    continue
                entry = {"benchmark": benchmark, "backbone": backbone, "variant": variant, "seeds": len(runs)}
                cells = [variant if variant == "cam" else _minmax_label(mine)]
                for key, _ in METRICS:
                    mean, std = mean_std([v[key] for v in runs.values()])
                    entry[key], entry[f"{key}_std"] = mean, std
                    cells.append(_cell(mean, std))
                cells.append(str(len(runs)))
                summary.append(entry)
                lines.append("| " + " | ".join(cells) + " |")
            if per_variant.get("cam") and per_variant.get("minmaxcam"):
                cells = ["MinMaxCAM - CAM (95 % CI)"]
                pairs = 0
                for key, _ in METRICS:
                    mean, low, high, pairs = paired_difference(
                        {s: v[key] for s, v in per_variant["cam"].items()},
                        {s: v[key] for s, v in per_variant["minmaxcam"].items()},
                    )
                    cells.append(f"{mean:+.1f}" + ("" if math.isnan(low) else f" [{low:+.1f}, {high:+.1f}]"))
                cells.append(f"{pairs} pairs")
                lines.append("| " + " | ".join(cells) + " |")
            prior = priors.get(benchmark, {}).get("test")
            if prior:
                cells = [
                    "centred Gaussian (no model)",
                    f"{prior['maxboxacc']:.1f}",
                    f"{prior['maxboxacc_v2']:.1f}",
                ]
                cells += ["-"] * (len(head) - 3)
                lines.append("| " + " | ".join(cells) + " |")
            mixed = _mixed_precision_pairs(mine)
            if mixed:
                lines += ["", f"**Pairs of mixed precision** (not paired in the engine): {mixed}."]
            lines.append("")
    return "\n".join(lines), summary


def _precision(row: dict[str, Any]) -> str:
    """What ``--amp auto`` picked for a run (rows from before the field say so)."""
    return row.get("precision") or "not recorded"


def _mixed_precision_pairs(rows: list[dict[str, Any]]) -> str:
    """Seeds whose CAM and MinMaxCAM runs ran at different precisions (``--amp auto`` resolves per
    machine: a study continued on a CPU without native bf16 runs fp32 where it ran bf16 before)."""
    by_seed: dict[int, dict[str, str]] = {}
    for row in rows:
        by_seed.setdefault(row["seed"], {})[row["variant"]] = _precision(row)
    return ", ".join(
        f"seed {seed} ({', '.join(f'{v} {p}' for v, p in sorted(got.items()))})"
        for seed, got in sorted(by_seed.items())
        if len(set(got.values())) > 1
    )


def _minmax_label(rows: list[dict[str, Any]]) -> str:
    row = next(r for r in rows if r["variant"] == "minmaxcam")
    return f"minmaxcam (λ {row['lambda_crr']:g}/{row['lambda_frr']:g})"


def _is_sweep(row: dict[str, Any]) -> bool:
    """A sweep run (the sweeps' own recipe), its reference points included; main runs are not."""
    return "main" not in row["groups"] and bool(set(row["groups"]) & set(SWEEP_GROUPS))


def sweep_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for backbone in ("resnet18", "mobilenet_v2"):
        mine = [r for r in rows if r["benchmark"] == "wsol20" and r["backbone"] == backbone and _is_sweep(r)]
        if not mine:
            continue
        recipe = mine[0]["recipe"]
        steps = recipe["epochs"] * recipe["max_steps_per_epoch"] if recipe["max_steps_per_epoch"] else None
        lines += [
            f"#### Sweeps, {BENCHMARK_TITLES['wsol20']}, {backbone}-CAM (test split, seed 0)",
            "",
            f"Recipe `{recipe['name']}`" + (f" ({steps} steps; {recipe['note']})" if steps else "") + ".",
            "",
            "| variant | λ_crr | λ_frr | S | N | mask | MaxBoxAcc | MaxBoxAccV2 | Top-1 Cls | precision |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |",
        ]
        for row in sorted(
            mine,
            key=lambda r: (
                {"cam": "0", "minmaxcam": "1"}.get(r["variant"], r["groups"][0]),
                r["lambda_crr"],
                r["lambda_frr"],
                r["set_size"],
            ),
        ):
            if row["seed"] != 0:
                continue
            values = test_values(row)
            lines.append(
                f"| {row['variant']} | {row['lambda_crr']:g} | {row['lambda_frr']:g} | {row['set_size']} | "
                f"{row['flags']['sets_per_batch']} | {row['stage2_mask']} | {values['maxboxacc']:.1f} | "
                f"{values['maxboxacc_v2']:.1f} | {values['top1_cls']:.1f} | "
                f"{_precision(row)} |"
            )
        precisions = sorted({_precision(r) for r in mine if r["seed"] == 0})
        if len(precisions) > 1:  # --amp auto follows the machine: a sweep continued elsewhere mixes them
            mixed = ", ".join(precisions)
            lines += ["", f"**Mixed precision** in these sweeps ({mixed}): see the last column."]
        lines.append("")
    return "\n".join(lines)


def dispersion_table(rows: list[dict[str, Any]]) -> str:
    mine = [r for r in rows if "dispersion" in r]
    if not mine:
        return ""
    lines = [
        "| benchmark | backbone | variant | d(f) | d(f_o) | d(f) / d(f_o) | seeds |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for benchmark in ("wsol20", "tiny5"):
        for backbone in ("resnet18", "mobilenet_v2"):
            for variant in ("cam", "minmaxcam"):
                sel = [
                    r
                    for r in mine
                    if (r["benchmark"], r["backbone"], r["variant"]) == (benchmark, backbone, variant)
                ]
                if not sel:
                    continue
                f = mean_std([r["dispersion"]["f"]["mean"] for r in sel])
                fo = mean_std([r["dispersion"]["f_o"]["mean"] for r in sel])
                ratio = mean_std([r["dispersion"]["f"]["mean"] / r["dispersion"]["f_o"]["mean"] for r in sel])
                lines.append(
                    f"| {benchmark} | {backbone} | {variant} | {_cell(*f, 3)} | {_cell(*fo, 3)} | "
                    f"{_cell(*ratio, 3)} | {len(sel)} |"
                )
    return "\n".join(lines) + "\n"


def gate_table(rows: list[dict[str, Any]], priors: dict[str, Any]) -> str:
    if not rows:
        return "No gate run yet.\n"
    prior = priors.get("wsol20", {}).get("val")
    lines = [
        "| backbone | recipe | input (px) | stride | lr (fc x10) | epochs | decay at | steps | "
        "best val MaxBoxAccV2 | its MaxBoxAcc | its Top-1 Cls | at epoch | last-epoch val V2 / Cls | "
        "wall (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in sorted(rows, key=lambda r: (r["backbone"], r["recipe"]["name"])):
        best, last = row["val_best"], row["val_history"][-1]
        steps = row["train_curve"][-1]["step"] if row["train_curve"] else 0
        recipe = row["recipe"]
        lines.append(
            f"| {row['backbone']} | {recipe['name']} | {recipe['image_size']} | {recipe['feature_stride']} | "
            f"{recipe['lr']:g} | {recipe['epochs']} | "
            f"{','.join(map(str, recipe['lr_milestones']))} | ~{steps} | {best['maxboxacc_v2']:.1f} | "
            f"{best['maxboxacc']:.1f} | {best['top1_cls']:.1f} | {best['epoch']} | "
            f"{last['maxboxacc_v2']:.1f} / {last['top1_cls']:.1f} | {row['wall_s']} |"
        )
    if prior:
        lines.append(
            f"| - | centred Gaussian (no model) | | | | | | | {prior['maxboxacc_v2']:.1f} | "
            f"{prior['maxboxacc']:.1f} | | | | |"
        )
    return "\n".join(lines) + "\n"


def plot_sweeps(rows: list[dict[str, Any]], priors: dict[str, Any], path: Path) -> bool:
    """MaxBoxAccV2 against lambda_crr, lambda_frr and S per backbone, beside the paper's Fig. 6 trends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = [
        b
        for b in ("resnet18", "mobilenet_v2")
        if any(
            r["backbone"] == b and r["benchmark"] == "wsol20" and "lambda_crr" in r["groups"] and _is_sweep(r)
            for r in rows
        )
    ]
    if not backbones:
        return False
    prior = priors.get("wsol20", {}).get("test")
    fig, axes = plt.subplots(len(backbones), 3, figsize=(15, 3.8 * len(backbones)), squeeze=False)
    for line, backbone in zip(axes, backbones, strict=True):
        mine = [
            r
            for r in rows
            if r["backbone"] == backbone and r["benchmark"] == "wsol20" and r["seed"] == 0 and _is_sweep(r)
        ]
        cam = next((r for r in mine if r["variant"] == "cam"), None)  # at the sweeps' recipe
        mine = [r for r in mine if r["variant"] != "cam"]
        for ax, (group, key, label) in zip(
            line,
            (
                ("lambda_crr", "lambda_crr", "λ_crr"),
                ("lambda_frr", "lambda_frr", "λ_frr"),
                ("set_size", "set_size", "S (N = 60 / S)"),
            ),
            strict=True,
        ):
            points = sorted((r for r in mine if group in r["groups"]), key=lambda r: r[key])
            if not points:  # Table 4 (S) is run for ResNet18 only
                ax.axis("off")
                continue
            xs = range(len(points))
            for metric, color in (("maxboxacc", "tab:orange"), ("maxboxacc_v2", "tab:purple")):
                ax.plot(xs, [r["test"][metric] for r in points], marker="o", color=color, label=metric)
                if cam is not None:
                    ax.axhline(cam["test"][metric], color=color, linestyle=":", label=f"{metric}, plain CAM")
                if prior:
                    ax.axhline(
                        prior[metric],
                        color=color,
                        linestyle="--",
                        alpha=0.4,
                        label=f"{metric}, centred Gaussian",
                    )
            ax.set_xticks(list(xs), [f"{r[key]:g}" for r in points])
            fixed = {
                "lambda_crr": f"λ_frr = {points[0]['lambda_frr']:g}",
                "lambda_frr": f"λ_crr = {points[0]['lambda_crr']:g}",
                "set_size": "batch 60",
            }[group]
            ax.set(xlabel=label, ylabel="% (test, seed 0)", title=f"{backbone}: {label} ({fixed})")
            ax.legend(fontsize=7)
    fig.suptitle(
        "WSOL-20 sweeps. Paper (Fig. 6, Table 4): VGG16 best at λ_frr = 10 with small λ_crr, "
        "MobileNetV2 prefers larger λ_crr; S = 5 best of 2..5",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_curves(rows: list[dict[str, Any]], path: Path) -> bool:
    """Train CE (mean over seeds) and val MaxBoxAccV2 per epoch, CAM and MinMaxCAM, per benchmark/backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({(r["benchmark"], r["backbone"]) for r in rows if "main" in r["groups"]})
    if not pairs:
        return False
    fig, axes = plt.subplots(len(pairs), 2, figsize=(11, 3.3 * len(pairs)), squeeze=False)
    for (benchmark, backbone), (left, right) in zip(pairs, axes, strict=True):
        for variant, color in (("cam", "tab:blue"), ("minmaxcam", "tab:red")):
            sel = [
                r
                for r in rows
                if (r["benchmark"], r["backbone"], r["variant"]) == (benchmark, backbone, variant)
                and "main" in r["groups"]
            ]
            if not sel:
                continue
            steps = sorted(set.intersection(*({p["step"] for p in r["train_curve"]} for r in sel)))
            ce = np.array([[{p["step"]: p["ce"] for p in r["train_curve"]}[s] for s in steps] for r in sel])
            left.plot(steps, ce.mean(axis=0), color=color, label=variant)
            epochs = sorted(set.intersection(*({h["epoch"] for h in r["val_history"]} for r in sel)))
            v2 = np.array(
                [[{h["epoch"]: h["maxboxacc_v2"] for h in r["val_history"]}[e] for e in epochs] for r in sel]
            )
            right.errorbar(
                epochs,
                v2.mean(axis=0),
                yerr=v2.std(axis=0),
                color=color,
                marker="o",
                capsize=3,
                label=f"{variant} ({len(sel)} seeds)",
            )
        left.set(title=f"{benchmark}, {backbone}: train CE", xlabel="step")
        right.set(title=f"{benchmark}, {backbone}: val MaxBoxAccV2", xlabel="epoch", ylabel="%")
        left.legend(fontsize=8)
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_overlays(
    out: Path, rows: list[dict[str, Any]], prepare: Callable[[str], Path], path: Path, count: int = 8
) -> bool:
    """The same test images under CAM and MinMaxCAM (seed 0, WSOL-20, ResNet18), when both run folders
    are here (they are not committed; the figure is)."""
    pair = _main_pairs(rows).get(("wsol20", "resnet18", 0))
    if pair is None:
        return False
    found = {variant: Run(variant, 0, _row_folder(out, row), {}) for variant, row in pair.items()}
    if not all((run.folder / "checkpoints" / "best.pt").is_file() for run in found.values()):
        return False
    try:
        root = prepare("wsol20")
    except MMCamError:  # no data here: the committed figure stays
        return False
    size = pair["cam"]["flags"]["image_size"]
    test = build_datasets("tiny-imagenet", root, image_size=size).test  # the runs' input size
    draw(found["cam"], found["minmaxcam"], test, path, count)
    return True


AGREEMENT_IMAGES = 300  # the first test images of a pair's agreement


def _row_folder(out: Path, row: dict[str, Any]) -> Path:
    return run_folder(out, row["benchmark"], row["backbone"], row["key"], row["config_hash"])


def _main_pairs(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Main pairs (benchmark, backbone, seed) -> {variant: row}, for pairs with both rows."""
    pairs: dict[tuple[str, str, int], dict[str, Any]] = {}
    for row in rows:
        if "main" in row["groups"] and row["variant"] in ("cam", "minmaxcam"):
            pairs.setdefault((row["benchmark"], row["backbone"], row["seed"]), {})[row["variant"]] = row
    return {k: v for k, v in pairs.items() if len(v) == 2}


def map_agreement(
    out: Path, rows: list[dict[str, Any]], prepare: Callable[[str], Path], report_dir: Path
) -> str:
    """How alike the CAM and MinMaxCAM score maps of each main pair are on the same test images: the
    per-image Pearson correlation (median and 10th percentile), the mean absolute difference of the
    maps (in [0, 1]) and how often the top-1 classes agree. Computed where both run folders are here,
    cached in ``agreement.json`` under the two rows' config hashes."""
    cache = report_dir / "agreement.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    changed = False
    lines = []
    for (benchmark, backbone, seed), pair in sorted(_main_pairs(rows).items()):
        key = f"{pair['cam']['config_hash']}-{pair['minmaxcam']['config_hash']}"
        if key not in known:
            folders = [_row_folder(out, pair[v]) for v in ("cam", "minmaxcam")]
            if not all((f / "checkpoints" / "best.pt").is_file() for f in folders):
                continue
            try:
                root = prepare(benchmark)
            except MMCamError:
                continue
            test = build_datasets("tiny-imagenet", root, image_size=pair["cam"]["flags"]["image_size"]).test
            maps = []
            for folder in folders:
                model, _, _ = load_trained_model(folder / "checkpoints" / "best.pt")
                found = []
                for item in predict_scoremaps(model, test, batch_size=50):
                    found.append(item)
                    if len(found) == AGREEMENT_IMAGES:
                        break
                maps.append(found)
            pairs = list(zip(*maps, strict=True))  # ((id, map, top-5, probs) of CAM, of MinMaxCAM)
            corr = [float(np.corrcoef(c[1].ravel(), m[1].ravel())[0, 1]) for c, m in pairs]
            known[key] = {
                "images": len(corr),
                "median_corr": float(np.median(corr)),
                "p10_corr": float(np.percentile(corr, 10)),
                "mean_abs_diff": float(np.mean([np.abs(c[1] - m[1]).mean() for c, m in pairs])),
                "top1_agree": float(np.mean([c[2][0] == m[2][0] for c, m in pairs])),
            }
            changed = True
        got = known[key]
        lines.append(
            f"| {benchmark} | {backbone} | {seed} | {got['images']} | {got['median_corr']:.3f} "
            f"| {got['p10_corr']:.3f} | {got['mean_abs_diff']:.3f} "
            f"| {100 * got['top1_agree']:.1f} % |"
        )
    if changed:
        cache.write_text(json.dumps(known, indent=1) + "\n")
    if not lines:
        return ""
    return (
        "\n".join(
            [
                "| benchmark | backbone | seed | test images | median corr | 10th pct corr | mean abs diff "
                "| top-1 agree |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
                *lines,
            ]
        )
        + "\n"
    )


def wall_table(rows: list[dict[str, Any]]) -> str:
    """Run wall time per part of the study (one core per run) and per machine (a run's cost follows
    the CPU: fp32 on an AVX2-only one, bf16 where it is native), CAM and MinMaxCAM-like runs apart."""
    parts: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("wall_s"):
            part = "main" if "main" in row["groups"] else "sweeps"
            machine = f"{row.get('machine') or 'not recorded'}, {_precision(row)}"
            parts.setdefault((row["benchmark"], row["backbone"], part, machine), []).append(row)
    if not parts:
        return ""
    lines = [
        "| benchmark | backbone | part | machine, precision | runs | wall (h) | mean CAM run (s) "
        "| mean run with Stage II (s) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for (benchmark, backbone, part, machine), mine in sorted(parts.items()):
        cam = [r["wall_s"] for r in mine if r["lambda_crr"] == r["lambda_frr"] == 0]
        stage2 = [r["wall_s"] for r in mine if not r["lambda_crr"] == r["lambda_frr"] == 0]
        cells = [f"{sum(v) / len(v):.0f}" if v else "-" for v in (cam, stage2)]
        lines.append(
            f"| {benchmark} | {backbone} | {part} | {machine} | {len(mine)} | "
            f"{sum(r['wall_s'] for r in mine) / 3600:.2f} | {cells[0]} | {cells[1]} |"
        )
    return "\n".join(lines) + "\n"


def write_report(report_dir: Path, prepare: Callable[[str], Path], out: Path) -> Path:
    """The report from the rows; ``prepare(benchmark)`` gives a prepared benchmark's folder (or raises
    an MMCamError where the data are not at hand) for the centred-Gaussian baseline and the overlays."""
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = load_rows(report_dir / "rows")
    gate = load_rows(report_dir / "gate" / "rows")
    priors = centre_priors(prepare, report_dir, {r["benchmark"] for r in rows + gate})
    tables, summary = main_tables(rows, priors)
    figures = {
        "sweeps.png": plot_sweeps(rows, priors, report_dir / "sweeps.png"),
        "curves.png": plot_curves(rows, report_dir / "curves.png"),
        "overlays.png": plot_overlays(out, rows, prepare, report_dir / "overlays.png"),
    }
    if summary:
        with (report_dir / "summary.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(summary[0]))
            writer.writeheader()
            writer.writerows(summary)
    walls = [r["wall_s"] for r in rows if r.get("wall_s")]
    machines = sorted({r["machine"] for r in rows + gate})
    precisions = Counter(_precision(row) for row in rows + gate)
    parts = [
        "# Tiny-ImageNet WSOL study: generated tables",
        "",
        "Generated by `python -m mmcam_fast.tiny_wsol report` from `rows/` and `gate/rows/`"
        " (one JSON per finished run). Machines: " + ("; ".join(machines) or "-") + ". Precision (what "
        "`--amp auto` picked: bf16 where the CPU has it natively, else fp32): "
        + (", ".join(f"{name} {count} runs" for name, count in sorted(precisions.items())) or "-")
        + ".",
        "",
        "## Gate: fine-tuning recipes, plain CAM, WSOL-20 val split (200 images)",
        "",
        gate_table(gate, priors),
        "## Main comparison",
        "",
        tables or "No main run yet.\n",
        f"The paper's gain of MinMaxCAM over CAM in MaxBoxAccV2: {PAPER_GAIN} points.",
        "",
        "## Sweeps (Fig. 6, Table 4, Table 3)",
        "",
        sweep_table(rows) or "No sweep run yet.\n",
        "## Dispersion (Sec. 4.3): mean distance of f (masked) and f_o (unmasked) to their class "
        "centre, test",
        "",
        dispersion_table(rows) or "No dispersion yet.\n",
        "## Score-map agreement of each main pair (CAM and MinMaxCAM, same seed, same test images)",
        "",
        map_agreement(out, rows, prepare, report_dir) or "No pair with both run folders here yet.\n",
        "## Wall time",
        "",
        wall_table(rows),
        f"{len(rows)} study runs, {sum(walls) / 3600:.2f} h of run wall time in all, each run on one core, "
        f"two at a time: about {sum(walls) / 2 / 3600:.2f} h of the 2-core machine; gate: {len(gate)} "
        f"runs, {sum(r['wall_s'] or 0 for r in gate) / 3600:.2f} h.",
        "",
    ]
    for name, made in figures.items():
        if made or (report_dir / name).is_file():
            parts.append(f"![{name}]({name})")
    path = report_dir / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path
