"""The train entry point end to end on generated data, and its errors on bad flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mmcam_fast.cli import run_main
from mmcam_fast.cli.train import main, parse_args
from mmcam_fast.config import build_config
from mmcam_fast.errors import ConfigError


def test_run_folder_holds_config_metrics_checkpoints_and_final_metrics(finished_run):
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert config["backbone"] == "resnet18" and config["set_size"] == 3 and config["sets_per_batch"] == 2
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"ce", "acc", "crr", "frr", "lr", "epoch"} <= set(rows[0])
    final = json.loads((finished_run / "final_metrics.json").read_text())
    for key in ("maxboxacc", "maxboxacc_v2", "gt_known_loc", "top1_loc", "top5_loc", "top1_cls"):
        assert 0.0 <= final["test"][key] <= 100.0
    assert len(final["val_history"]) == 2
    assert final["precision"] == "fp32"  # the reference step
    last = torch.load(finished_run / "checkpoints" / "last.pt", weights_only=False)
    assert last["epoch"] == 2 and last["step"] == 4 and "optimizer" in last and "loader" in last
    assert (finished_run / "checkpoints" / "best.pt").exists()


def test_presets_apply_below_command_line_values():
    config = build_config({"data": "cub", "backbone": "vgg16"})
    assert (config.lambda_frr, config.sets_per_batch, config.epochs) == (10.0, 12, 200)
    config = build_config({"data": "imagenet", "backbone": "resnet50", "lambda_frr": 2.0})
    assert (config.lambda_frr, config.sets_per_batch) == (2.0, 10)


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lambda_crr: 0.0\nlambda_frr: 0.0\nepochs: 3\n")
    config = parse_args(["--config", str(path), "--epochs", "5"])
    assert (config.lambda_crr, config.lambda_frr, config.epochs) == (0.0, 0.0, 5)
    path.write_text("lambda_cr: 1.0\n")
    with pytest.raises(ConfigError, match="unknown key.*lambda_cr"):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize("text,message", [
    ("lr: abc\n", "lr must be a number, got 'abc'"),
    ("epochs: 2.5\n", "epochs must be an integer, got 2.5"),
    ("nesterov: maybe\n", "nesterov must be true or false"),
    ("lr_milestones: [3, x]\n", "lr_milestones must be a list of integers"),
    ("out: 7\n", "out must be a string"),
])
def test_a_config_value_of_the_wrong_type_is_one_error_naming_file_and_key(text, message, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    status = run_main(main, ["--config", str(path)])
    err = capsys.readouterr().err
    assert status == 2 and f"{path}: {message}" in err and "Traceback" not in err


def test_config_file_numbers_yaml_reads_as_text_or_int_become_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nlambda_frr: 2\n")  # YAML 1.1 reads 1e-3 as a string, 2 as an int
    config = parse_args(["--config", str(path)])
    assert config.lr == 0.001 and isinstance(config.lambda_frr, float) and config.lambda_frr == 2.0
    from mmcam_fast.config import TrainConfig

    assert TrainConfig.from_dict({"out": tmp_path}).out == str(tmp_path)  # a Path from Python code


@pytest.mark.parametrize("argv,message", [
    (["--backbone", "alexnet"], "--backbone 'alexnet'"),
    (["--data", "mnist"], "--data 'mnist'"),
    (["--set-size", "1"], "--set-size must be at least 2"),
    (["--data", "cub"], "--data-root"),
    (["--data", "cub", "--data-root", "/nonexistent/cub"], "/nonexistent/cub"),
    (["--data", "tiny-imagenet", "--data-root", __file__],
     f"{__file__}: a file, not a folder (--data-root is the folder holding the images; an archive is "
     f"converted once by `python -m mmcam_fast.prepare tiny-imagenet --src {__file__}"),
    (["--config", str(Path(__file__).parent)], f"--config {Path(__file__).parent}: a folder, expected"),
    # numbers out of their bounds: each named, before any data is read or a step is taken
    (["--lambda-crr", "inf"], "--lambda-crr must be a finite number >= 0, got inf"),
    (["--lambda-frr", "nan"], "--lambda-frr must be a finite number >= 0, got nan"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
    (["--classifier-lr-mult", "0"], "--classifier-lr-mult must be a finite number > 0"),
    (["--lr-gamma", "2"], "--lr-gamma must be in (0, 1], got 2.0"),
    (["--lr-milestones", "0"], "--lr-milestones are epochs, each at least 1"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--momentum", "0"], "--nesterov needs --momentum > 0"),
    (["--seed", "-5"], "--seed must be in [0, 2**32), got -5"),
    (["--max-steps-per-epoch", "0"], "--max-steps-per-epoch must be at least 1 (leave it out"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--eval-every", "-2"], "--eval-every must be >= 0"),
])
def test_bad_flags_give_one_clear_error(argv, message, tmp_path, capsys):
    status = run_main(main, argv + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and "Traceback" not in err


def test_init_starts_from_another_runs_weights_only(finished_run, tmp_path):
    from mmcam_fast.models import create_model
    from mmcam_fast.training import _init_weights

    checkpoint = finished_run / "checkpoints" / "last.pt"
    saved = torch.load(checkpoint, weights_only=False)["model"]
    model = create_model("resnet18", saved["fc.weight"].shape[0], feature_stride=8)
    _init_weights(model, str(checkpoint))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key], msg=key)
    wrong = create_model("resnet18", saved["fc.weight"].shape[0] + 1, feature_stride=8)
    with pytest.raises(ConfigError, match=r"--init .*last.pt: does not fit this model"):
        _init_weights(wrong, str(checkpoint))
    with pytest.raises(ConfigError, match="--init .*missing.pt: file not found"):
        _init_weights(model, str(tmp_path / "missing.pt"))
    # end to end: a fresh schedule (epoch 1, step 1) from the other run's weights
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    out = tmp_path / "init_run"
    main(["--data", "synthetic", "--data-root", config["data_root"], "--backbone", "resnet18",
          "--epochs", "1", "--max-steps-per-epoch", "1", "--workers", "0", "--sets-per-batch", "2",
          "--set-size", "3",
          "--eval-every", "0", "--init", str(checkpoint), "--lambda-crr", "0", "--lambda-frr", "0",
          "--out", str(out)])
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert last["step"] == 1 and last["config"]["init"] == str(checkpoint)


@pytest.mark.parametrize("spelling,name,lambdas", [
    ("vgg16", "vgg16", (1.0, 10.0)), ("VGG16", "vgg16", (1.0, 10.0)), ("vgg-16", "vgg16", (1.0, 10.0)),
    ("vgg16_cam", "vgg16", (1.0, 10.0)), ("Vgg16-CAM", "vgg16", (1.0, 10.0)),
    ("mobilenet-v2", "mobilenet_v2", (10.0, 1.0)), ("MobileNetV2", "mobilenet_v2", (10.0, 1.0)),
    ("mobilenet_v2_cam", "mobilenet_v2", (10.0, 1.0)), ("ResNet-50", "resnet50", (1.0, 1.0)),
])
def test_every_spelling_of_a_backbone_is_one_backbone_with_its_preset(spelling, name, lambdas):
    """``VGG16`` and ``mobilenet-v2`` were accepted by the model factory but skipped their presets."""
    config = build_config({"data": "cub", "backbone": spelling})
    assert config.backbone == name
    assert (config.lambda_crr, config.lambda_frr) == lambdas


def test_config_sections_partition_the_fields_and_config_yaml_round_trips(tmp_path):
    """Every field sits in exactly one section; config.yaml is headed per section, in flat keys that
    read back as the same config (and as a --config file)."""
    import dataclasses

    from mmcam_fast.config import SECTIONS, TrainConfig

    config = build_config({"data": "synthetic", "backbone": "resnet18", "lambda_crr": 0.5})
    names = [name for section in SECTIONS for name in config.section(section)]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert len(names) == len(set(names))
    config.save(tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert [line[5:] for line in text.splitlines() if line.startswith("# -- ")] == list(SECTIONS)
    assert yaml.safe_load(text) == config.to_dict()
    assert TrainConfig.from_dict(yaml.safe_load(text)) == config
    with pytest.raises(ConfigError, match="no config section"):
        config.section("optimization")
