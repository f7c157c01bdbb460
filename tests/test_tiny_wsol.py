"""The Tiny-ImageNet WSOL study (pretrained backbones): its plan, its resumable result rows, its report."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torchvision import models as tvm

from mmcam_fast.cli import tiny_wsol
from mmcam_fast.engine import native_bf16
from mmcam_fast.experiments import tiny_wsol_study
from mmcam_fast.experiments.tiny_wsol_report import paired_difference
from mmcam_fast.experiments.tiny_wsol_study import (
    BATCH,
    GROUPS,
    RECIPE,
    SWEEP_RECIPE,
    build_plan,
    gate_runs,
    variants_for,
)
from mmcam_fast.pretraining import export_state_dict


def _weights(folder: Path, backbone: str = "resnet18") -> Path:
    net = tvm.resnet18(num_classes=172) if backbone == "resnet18" else tvm.mobilenet_v2(num_classes=172)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{backbone}-172.pth"
    export_state_dict(net.state_dict(), path)
    return path


def test_variants_change_one_thing_from_each_backbones_paper_setting():
    for backbone, paper in (("resnet18", (1.0, 1.0)), ("mobilenet_v2", (10.0, 1.0))):
        variants = {v.name: v for v in variants_for(backbone)}
        assert (variants["cam"].lambda_crr, variants["cam"].lambda_frr) == (0.0, 0.0)
        minmax = variants["minmaxcam"]
        groups = set(GROUPS) if backbone == "resnet18" else {"main", "lambda_crr", "lambda_frr"}
        assert (minmax.lambda_crr, minmax.lambda_frr) == paper and set(minmax.groups) == groups
        assert set(variants["cam"].groups) == groups  # each sweep's reference points
        points = [v for v in variants.values() if v.name != "cam"]
        crr = sorted(v.lambda_crr for v in points if "lambda_crr" in v.groups)
        frr = sorted(v.lambda_frr for v in points if "lambda_frr" in v.groups)
        assert crr == frr == [0.0, 0.1, 1.0, 10.0]  # the paper's point once, as minmaxcam
        assert {v.lambda_frr for v in points if "lambda_crr" in v.groups} == {paper[1]}
        assert {v.lambda_crr for v in points if "lambda_frr" in v.groups} == {paper[0]}
        sizes = {v.set_size: v.flags()["sets_per_batch"] for v in variants.values() if "set_size" in v.groups}
        if backbone != "resnet18":  # Tables 3 and 4 on ResNet18 only
            assert sizes == {} and "feature_mask" not in variants
            continue
        assert sizes == {2: 30, 3: 20, 4: 15, 5: 12} and all(s * n == BATCH for s, n in sizes.items())
        assert variants["feature_mask"].stage2_mask == "feature"


def test_the_plan_pairs_cam_and_minmaxcam_over_three_seeds_and_sweeps_once(tmp_path):
    _weights(tmp_path, "resnet18")
    _weights(tmp_path, "mobilenet_v2")
    runs = build_plan(["wsol20", "tiny5"], ["resnet18", "mobilenet_v2"], list(GROUPS),
                      pretrained_dir=tmp_path)
    keys = [r.key for r in runs]
    # main: 2 benchmarks x 2 backbones x 2 methods x 3 seeds; sweeps: CAM, the paper's lambdas and
    # 3 + 3 lambda points per backbone, 3 set sizes and feature masking for ResNet18
    assert len(keys) == len(set(keys)) == 24 + 12 + 8
    main = [r for r in runs if "main" in r.groups]
    sweeps = [r for r in runs if "main" not in r.groups]
    assert len(main) == 24 and {r.seed for r in main} == {0, 1, 2}
    assert all(r.benchmark == "wsol20" and r.seed == 0 and "-sweep-" in r.key for r in sweeps)
    assert {r.recipe for r in main} == {RECIPE} and {r.recipe for r in sweeps} == {SWEEP_RECIPE}
    assert SWEEP_RECIPE.epochs * SWEEP_RECIPE.max_steps_per_epoch == 160
    flags = {k: v for k, v in SWEEP_RECIPE.flags().items() if RECIPE.flags().get(k) != v}
    assert flags == {"epochs": 2, "lr_milestones": [1], "max_steps_per_epoch": 80}
    reference = next(r for r in sweeps if r.key == "wsol20-resnet18-minmaxcam-sweep-seed0")
    assert set(reference.groups) == set(GROUPS) - {"main"}  # one run, in every sweep
    for run in main:  # paired: the same weights and seed, the method the only difference
        cam, minmax = (next(r for r in main if (r.benchmark, r.backbone, r.seed, r.variant.name) ==
                            (run.benchmark, run.backbone, run.seed, v)) for v in ("cam", "minmaxcam"))
        a, b = cam.flags(), minmax.flags()
        assert {k for k in a if a[k] != b[k]} == {"lambda_crr", "lambda_frr"}
        assert a["pretrained"] == str(tmp_path / f"{run.backbone}-172.pth")
    flags = runs[0].flags(Path("/data"))
    assert flags["lr"] == RECIPE.lr and flags["classifier_lr_mult"] == 10.0 and flags["feature_stride"] == 8
    assert flags["sets_per_batch"] * flags["set_size"] == BATCH and flags["recipe"] == "paper"
    assert {r.flags()["sets_per_batch"] for r in runs if r.benchmark == "tiny5"} == {5}  # its 5 classes


def test_the_config_hash_follows_the_weights_and_recipe_not_the_machine(tmp_path):
    _weights(tmp_path)
    run = build_plan(["wsol20"], ["resnet18"], ["main"], pretrained_dir=tmp_path)[0]
    assert run.flags(Path("/a")) != run.flags(Path("/b"))
    before = run.config_hash()
    other = build_plan(["wsol20"], ["resnet18"], ["main"], RECIPE.__class__("x", lr=0.5, epochs=2,
                                                                           lr_milestones=(1,)),
                       pretrained_dir=tmp_path)[0]
    assert other.config_hash() != before
    _weights(tmp_path)  # new random weights: another sha256
    assert run.config_hash() != before
    gate = gate_runs(list(tiny_wsol_study.GATE), "resnet18", tmp_path)
    assert len({r.key for r in gate}) == len(tiny_wsol_study.GATE)
    assert all(r.variant.lambda_crr == r.variant.lambda_frr == 0.0 for r in gate)
    with pytest.raises(tiny_wsol_study.ConfigError, match="unknown nope"):
        gate_runs(["nope"], "resnet18")


@pytest.mark.parametrize("action", ["study", "report"])
def test_a_shared_folder_that_is_not_there_is_named_before_any_work(tmp_path, action):
    with pytest.raises(tiny_wsol_study.ConfigError, match=r"--shared .*nope: not a folder"):
        tiny_wsol.parse_args([action, "--shared", str(tmp_path / "nope")])


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "-1"], "argument --seeds: must be at least 0, got -1"),
    (["--sweep-seeds", str(2**32)], "argument --sweep-seeds: must be in [0, 2**32)"),
    (["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["--max-steps-per-epoch", "0"], "argument --max-steps-per-epoch: must be at least 1, got 0"),
    (["--report-dir", __file__], f"argument --report-dir: {__file__}: is a file, expected a folder"),
])
def test_a_study_number_out_of_bounds_is_named_before_any_work(tmp_path, argv, message):
    with pytest.raises(tiny_wsol_study.ConfigError) as error:
        tiny_wsol.parse_args(["study", "--shared", str(tmp_path), *argv])
    assert message in str(error.value)


def test_paired_difference_and_its_interval():
    mean, low, high, pairs = paired_difference({0: 10.0, 1: 20.0, 2: 30.0}, {0: 11.0, 1: 22.0, 2: 33.0})
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2 df) * std of (1, 2, 3) / sqrt(3)
    assert (mean, pairs) == (2.0, 3) and low == pytest.approx(2 - half) and high == pytest.approx(2 + half)
    assert paired_difference({0: 1.0, 5: 2.0}, {0: 3.0})[:1] == (2.0,)
    assert math.isnan(paired_difference({0: 1.0}, {0: 3.0})[1])


def test_a_cut_down_study_writes_rows_skips_them_and_reports(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the prepared data go to runs/data here
    weights = tmp_path / "weights"
    _weights(weights)
    args = ["study", "--shared", str(shared_data), "--benchmarks", "tiny5", "--backbones", "resnet18",
            "--only", "main", "--seeds", "0", "--epochs", "2", "--max-steps-per-epoch", "2",
            "--pretrained-dir", str(weights), "--out", "runs/study", "--report-dir", "report", "--jobs", "2"]
    tiny_wsol.main(args)
    rows = sorted((tmp_path / "report" / "rows").glob("*.json"))
    assert [p.name for p in rows] == ["tiny5-resnet18-cam-seed0.json", "tiny5-resnet18-minmaxcam-seed0.json"]
    row = json.loads(rows[1].read_text())
    assert row["flags"]["max_steps_per_epoch"] == 2 and row["recipe"]["name"].endswith("-cut")
    assert set(row["test"]) >= {"maxboxacc", "maxboxacc_v2", "per_iou", "top1_loc", "top1_cls"}
    assert row["dispersion"]["f"]["mean"] >= 0 and row["wall_s"] > 0 and row["seed"] == 0
    assert row["precision"] == ("bf16" if native_bf16("cpu") else "fp32")  # what --amp auto picks here
    assert [h["epoch"] for h in row["val_history"]] == [1, 2] and row["train_curve"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "MinMaxCAM - CAM" in report and "centred Gaussian" in report
    priors = json.loads((tmp_path / "report" / "centre_prior.json").read_text())
    assert priors["tiny5"]["test"]["images"] == 250
    # the pair's score-map agreement, computed from the two run folders and cached
    (pair,) = json.loads((tmp_path / "report" / "agreement.json").read_text()).values()
    assert pair["images"] == 250 and -1 <= pair["p10_corr"] <= pair["median_corr"] <= 1
    assert 0 <= pair["mean_abs_diff"] <= 1 and 0 <= pair["top1_agree"] <= 1
    assert "| tiny5 | resnet18 | 0 | 250 |" in report

    # a second invocation finds both rows and trains nothing; a stale row (other config) is rerun
    capsys.readouterr()
    monkeypatch.setattr(tiny_wsol_study, "run_all",
                        lambda runs, *a, **k: started.extend(r.name for r in runs))
    started: list[str] = []
    tiny_wsol.main(args)
    assert started == [] and "2 of 2 run(s) already have their rows" in capsys.readouterr().err
    stale = json.loads(rows[0].read_text())
    rows[0].write_text(json.dumps({**stale, "config_hash": "0" * 12}))
    partner = json.loads(rows[1].read_text())  # as if the MinMaxCAM run had been on another machine
    rows[1].write_text(json.dumps({**partner, "precision": "fp16"}))
    capsys.readouterr()
    tiny_wsol.main(args)
    assert started == ["tiny5-resnet18-cam-seed0"]
    assert "warning: tiny5-resnet18-cam-seed0 runs in" in capsys.readouterr().err


@pytest.mark.parametrize(("backbone", "channels"), [("resnet18", 512), ("mobilenet_v2", 1280)])
def test_the_committed_weights_load_into_the_cam_backbone_at_the_wsol_stride(backbone, channels):
    import hashlib

    from mmcam_fast.models import create_model

    folder = Path(__file__).resolve().parents[1] / "experiments" / "pretrained"
    path = folder / f"{backbone}-172.pth"
    if not path.is_file():
        pytest.skip(f"{path.name} is not built yet (make pretrain; the study's status is in docs/results.md)")
    digest = (folder / f"{path.name}.sha256").read_text().split()[0]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    model = create_model(backbone, 20, feature_stride=8, pretrained=path)  # strict: no backbone key missing
    state = torch.load(path, weights_only=True)
    for key, value in model.backbone.state_dict().items():  # every backbone tensor is the file's
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, state[key].float(), rtol=0, atol=0, msg=key)
    model.eval()
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 64, 64))
    assert features.shape == (1, channels, 8, 8)  # stride 8 at 64 px (torchvision's own: 32, 2x2)


def test_a_failed_run_is_one_error_naming_its_folder(tmp_path):
    from mmcam_fast.errors import RunFailed
    from mmcam_fast.experiments.execute import run_all
    from mmcam_fast.experiments.plan import Run

    bad = Run("bad", 0, tmp_path / "bad", {"backbone": "nope"})
    finished: list[str] = []
    with pytest.raises(RunFailed, match=r"failed runs .*bad"):
        run_all([bad], 1, note=lambda _: None, on_done=lambda run, wall: finished.append(run.name))
    assert finished == [] and "--backbone 'nope'" in (tmp_path / "bad" / "train.log").read_text()


def test_the_sweeps_use_their_own_recipe_and_reference_points(tmp_path):
    from mmcam_fast.experiments.tiny_wsol_report import plot_sweeps, sweep_table

    _weights(tmp_path)
    rows = []
    for run in build_plan(["wsol20"], ["resnet18"], list(GROUPS), pretrained_dir=tmp_path):
        if run.seed != 0:
            continue
        v = run.variant
        score = 20.0 + v.lambda_crr + v.lambda_frr / 10 + v.set_size / 100 + ("main" in run.groups) * 50
        rows.append({
            "key": run.key, "benchmark": run.benchmark, "backbone": run.backbone, "variant": v.name,
            "groups": list(run.groups), "seed": 0, "lambda_crr": v.lambda_crr, "lambda_frr": v.lambda_frr,
            "set_size": v.set_size, "stage2_mask": v.stage2_mask, "recipe": asdict(run.recipe),
            "flags": run.flags(), "precision": "fp32" if v.name.startswith("frr") else "bf16",
            "test": {"maxboxacc": score - 1, "maxboxacc_v2": score, "top1_cls": 50.0,
                     "per_iou": {"30": 0.0, "50": 0.0, "70": 0.0}},
        })
    table = sweep_table(rows)
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(lines) == 12  # the sweeps' runs only: no main-recipe row (its score would be >= 70)
    assert all(float(line.split("|")[8]) < 70 for line in lines)
    assert lines[0].startswith("| cam | 0 | 0 |") and lines[1].startswith("| minmaxcam | 1 | 1 |")
    assert f"`{SWEEP_RECIPE.name}` (160 steps" in table
    assert lines[0].endswith("| bf16 |") and sum(line.endswith("| fp32 |") for line in lines) == 3
    assert "**Mixed precision** in these sweeps (bf16, fp32)" in table
    assert "Mixed precision" not in sweep_table([r for r in rows if r["precision"] == "bf16"])
    assert plot_sweeps(rows, {}, tmp_path / "sweeps.png") and (tmp_path / "sweeps.png").stat().st_size > 0
    assert not plot_sweeps([r for r in rows if "main" in r["groups"]], {}, tmp_path / "none.png")


def test_the_report_flags_a_pair_run_at_two_precisions():
    from mmcam_fast.experiments.tiny_wsol_report import _mixed_precision_pairs

    rows = [{"seed": 0, "variant": "cam", "precision": "bf16"}, {"seed": 0, "variant": "minmaxcam",
                                                                  "precision": "bf16"},
            {"seed": 1, "variant": "cam", "precision": "bf16"}, {"seed": 1, "variant": "minmaxcam",
                                                                  "precision": "fp32"}]
    assert _mixed_precision_pairs(rows) == "seed 1 (cam bf16, minmaxcam fp32)"
    assert _mixed_precision_pairs(rows[:2]) == ""


def test_the_wall_table_keeps_machines_apart():
    from mmcam_fast.experiments.tiny_wsol_report import wall_table

    def row(machine, precision, wall, crr):
        return {"benchmark": "wsol20", "backbone": "resnet18", "groups": ["lambda_frr"], "machine": machine,
                "precision": precision, "wall_s": wall, "lambda_crr": crr, "lambda_frr": 1.0}

    table = wall_table([row("xeon", "bf16", 700.0, 1.0), row("epyc", "fp32", 3600.0, 1.0),
                        row("epyc", "fp32", 3500.0, 0.0)])
    lines = [line for line in table.splitlines() if line.startswith("| wsol20")]
    assert lines == ["| wsol20 | resnet18 | sweeps | epyc, fp32 | 2 | 1.97 | - | 3550 |",
                     "| wsol20 | resnet18 | sweeps | xeon, bf16 | 1 | 0.19 | - | 700 |"]


def test_a_study_stopped_by_sigterm_stops_its_training_processes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    (tmp_path / "slow").mkdir()
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    script = (
        "import sys\nfrom pathlib import Path\nfrom mmcam_fast.experiments import execute\n"
        "from mmcam_fast.experiments.plan import Run\n"
        f"execute._command = lambda run: [sys.executable, '-c', {child!r}]\n"
        f"execute.run_all([Run('slow', 0, Path({str(tmp_path / 'slow')!r}), {{}})], 1, "
        "note=lambda m: print(m, flush=True))\n"
    )
    study = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    pid = int(pid_file.read_text())
    study.send_signal(signal.SIGTERM)
    out, _ = study.communicate(timeout=90)
    assert study.returncode == 128 + signal.SIGTERM
    assert "stopped " in out and "continues from its last checkpoint" in out
    with pytest.raises(ProcessLookupError):  # the training process went with the study
        os.kill(pid, 0)
