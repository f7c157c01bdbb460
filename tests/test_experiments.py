"""The experiment study: its plan, and a cut-down study end to end on the real Tiny-ImageNet-5."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mmcam_fast.cli.scratch_study import main
from mmcam_fast.experiments.plan import GROUPS, PAPER, VARIANTS, Schedule, build_plan, select_variants
from mmcam_fast.experiments.report import _smooth


def test_plan_changes_one_thing_at_a_time_from_the_papers_setting(tmp_path):
    names = [v.name for v in VARIANTS]
    assert len(names) == len(set(names)) == 12
    by_name = {v.name: v for v in VARIANTS}
    assert by_name["cam"].value("lambda_crr") == by_name["cam"].value("lambda_frr") == 0.0
    assert by_name["minmaxcam"].overrides == PAPER and set(by_name["minmaxcam"].groups) == set(GROUPS)
    for variant in VARIANTS:
        if variant.name in ("cam", "minmaxcam"):
            continue
        changed = {k for k in {**PAPER, **variant.overrides}
                   if variant.overrides.get(k, PAPER.get(k)) != PAPER.get(k)}
        assert len(changed) == 1, (variant.name, changed)
    assert sorted(by_name[f"S{s}"].value("set_size") for s in (2, 3, 4)) == [2, 3, 4]
    assert by_name["feature_mask"].overrides["stage2_mask"] == "feature"

    pretrain, runs = build_plan(tmp_path, tmp_path / "data", [0, 1], Schedule(), VARIANTS)
    assert [r.seed for r in pretrain] == [0, 1] and len(runs) == 24
    assert pretrain[0].flags["lambda_crr"] == pretrain[0].flags["lambda_frr"] == 0.0
    for run in runs:  # every variant starts from its own seed's pretraining
        assert run.after == tmp_path / "pretrain" / f"seed{run.seed}" / "checkpoints" / "last.pt"
        assert run.flags["init"] == str(run.after) and run.flags["seed"] == run.seed
        epochs = Schedule().epochs
        assert run.flags["epochs"] == epochs and run.flags["lr_milestones"] == [epochs - 1]


def test_moving_average_of_the_curves():
    np.testing.assert_allclose(_smooth(np.array([1.0, 2.0, 3.0, 4.0]), 2), [1.0, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(_smooth(np.array([4.0, 0.0, 2.0]), 10), [4.0, 2.0, 2.0])


def test_selecting_variants_by_name_or_group():
    assert [v.name for v in select_variants(["main"])] == ["cam", "minmaxcam"]
    assert {v.name for v in select_variants(["set_size", "cam"])} == {"cam", "minmaxcam", "S2", "S3", "S4"}
    assert select_variants([]) == VARIANTS
    with pytest.raises(ValueError, match="unknown variant or group S9"):
        select_variants(["S9"])


def test_a_cut_down_study_end_to_end(shared_data, tmp_path, capsys):
    src = shared_data / "tiny-imagenet-5"
    args = ["--src", str(src), "--out", str(tmp_path / "runs"), "--report-dir", str(tmp_path / "report"),
            "--seeds", "0", "--only", "main", "--pretrain-epochs", "1", "--epochs", "2",
            "--max-steps-per-epoch", "2", "--overlay-images", "2"]
    main(args)
    report = tmp_path / "report"
    for name in ("results.csv", "summary.csv", "summary.md", "curves.png", "sweeps.png", "overlays.png",
                 "study.json"):
        assert (report / name).is_file(), name
    rows = list(csv.DictReader((report / "results.csv").open()))
    assert [r["variant"] for r in rows] == ["cam", "minmaxcam"]
    for row in rows:
        assert 0.0 <= float(row["maxboxacc_v2"]) <= 100.0 and 0.0 < float(row["dist_f"]) < 2.0
    # the fine-tuned runs start from the pretraining's weights, with their own lambdas
    final = json.loads((tmp_path / "runs" / "minmaxcam" / "seed0" / "final_metrics.json").read_text())
    assert len(final["val_history"]) == 2
    study = json.loads((report / "study.json").read_text())
    prior = study["centre_prior"]  # the same centred map for all 250 test images
    assert prior["images"] == 250 and 0.0 < prior["mean_box_area_fraction"] <= 1.0
    assert 0.0 <= prior["maxboxacc"] <= 100.0
    table = (report / "summary.md").read_text()
    assert table.startswith("| variant |") and "| minmaxcam | 1 | 1 | 5 | image |" in table
    # finished runs are not trained again
    capsys.readouterr()
    main(args)
    err = capsys.readouterr().err
    assert "1 run(s) already done, 0 to go" in err and "2 run(s) already done, 0 to go" in err
    assert "start" not in err
    assert len(list(Path(tmp_path / "runs").glob("*/seed0/wall_time.txt"))) == 3
