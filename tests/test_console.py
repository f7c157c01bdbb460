"""What a user sees: --help with the preset defaults, curves.png, the validation line, eval progress bars."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from mmcam_fast.cli.train import _HELP, _NONE_MEANS, _help_pair, _value_text, help_defaults, parse_args
from mmcam_fast.config import _BACKBONE_PRESETS, _DATA_PRESETS, TrainConfig, build_config
from mmcam_fast.console import format_validation
from mmcam_fast.curves import CURVES_FILE, read_jsonl, write_curves
from mmcam_fast.errors import ConfigError

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def _help(argv, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # one line per flag
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _flag_line(text: str, name: str) -> str:
    """The help entry of a flag (its option line and the text under it), on one line."""
    flag = "--" + name.replace("_", "-")
    options = text[text.index("\noptions:"):]
    entries = ["  --" + entry for entry in options.split("\n  --")[1:]]
    entry = next(e for e in entries if e.strip().split()[0].rstrip(",") == flag)
    return " ".join(entry.split())


# -- --help ----------------------------------------------------------------------------------------

def test_help_shows_the_per_preset_defaults(capsys, monkeypatch):
    text = _help([], capsys, monkeypatch)
    assert "(default: 224; 64 for synthetic, tiny-imagenet)" in _flag_line(text, "image_size")
    assert "(default: 1.0; 10.0 for vgg16)" in _flag_line(text, "lambda_frr")
    assert "(default: 1.0; 10.0 for mobilenet_v2)" in _flag_line(text, "lambda_crr")
    assert "10 for resnet50" in _flag_line(text, "sets_per_batch")
    assert "(default: 8; 16 for vgg16)" in _flag_line(text, "feature_stride")
    assert "[50, 100] for cub" in _flag_line(text, "lr_milestones")
    assert "(default: 0.9)" in _flag_line(text, "momentum")  # no preset: its one default
    assert "(default: on CUDA only)" in _flag_line(text, "compile")


def test_help_for_a_pair_shows_the_resolved_values(capsys, monkeypatch):
    text = _help(["--data", "cub", "--backbone", "vgg16"], capsys, monkeypatch)
    assert "(default: 10.0 with --data cub --backbone vgg16)" in _flag_line(text, "lambda_frr")
    assert "(default: 200 with --data cub --backbone vgg16)" in _flag_line(text, "epochs")
    assert "(default: 224 with" in _flag_line(text, "image_size")
    assert "(default: 16 with" in _flag_line(text, "feature_stride")
    text = _help(["--data=tiny-imagenet", "--backbone", "resnet50_cam"], capsys, monkeypatch)
    assert "(default: 5 with" in _flag_line(text, "sets_per_batch")
    assert "(default: 8)" in _flag_line(text, "feature_stride")  # no preset for the pair: the default
    text = _help(["--backbone", "vgg16"], capsys, monkeypatch)  # one of the two: the rest still varies
    assert "(default: 10.0 with --backbone vgg16)" in _flag_line(text, "lambda_frr")
    assert "(default: 224; 64 for synthetic, tiny-imagenet)" in _flag_line(text, "image_size")


def test_help_pair_from_a_config_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("data: synthetic\nbackbone: mobilenet_v2\n")
    text = _help(["--config", str(path)], capsys, monkeypatch)
    assert "(default: 10.0 with --data synthetic --backbone mobilenet_v2)" in _flag_line(text, "lambda_crr")
    assert _help_pair(["--config", str(path), "--backbone", "vgg16"]) == ("synthetic", "vgg16")
    assert _help_pair(["--config", str(tmp_path / "missing.yaml")]) == (None, None)


def test_a_malformed_line_is_reported_by_the_full_parse(capsys):
    assert _help_pair(["--data"]) == (None, None)
    with pytest.raises(ConfigError, match="--data"):
        parse_args(["--data"])
    assert capsys.readouterr().err == ""  # the pre-parse printed nothing


def test_every_field_has_help(capsys, monkeypatch):
    assert set(_HELP) == set(FIELDS)
    assert all(_HELP[name].strip() for name in FIELDS)
    text = _help([], capsys, monkeypatch)
    for name in FIELDS:
        line = _flag_line(text, name)
        assert line.split("(default:")[0].split(None, 1)[1].strip(), name


@pytest.mark.parametrize("data", sorted(_DATA_PRESETS))
@pytest.mark.parametrize("backbone", sorted(_BACKBONE_PRESETS))
def test_help_defaults_of_a_pair_are_the_values_the_run_gets(data, backbone):
    config = build_config({"data": data, "backbone": backbone})
    texts = help_defaults(data, backbone)
    for name in FIELDS:
        value = getattr(config, name)
        # data and backbone default to synthetic, resnet18; out is a new folder per run
        if value is None or name in ("data", "backbone", "out"):
            continue
        assert texts[name].split(" with ")[0] == _value_text(value), name


def test_help_defaults_name_every_preset_that_changes_a_value():
    texts = help_defaults()
    defaults = TrainConfig()
    for table in (_DATA_PRESETS, _BACKBONE_PRESETS):
        for preset_name, values in table.items():
            for name, value in values.items():
                if value != getattr(defaults, name):
                    assert preset_name in texts[name], (preset_name, name)
    for name in FIELDS:  # first the dataclass default
        assert texts[name].split(";")[0] == _value_text(getattr(defaults, name),
                                                        _NONE_MEANS.get(name, "none")), name


# -- curves.png ------------------------------------------------------------------------------------

def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _train_rows(steps: int, per_epoch: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"step": s, "epoch": (s - 1) // per_epoch + 1, "lr": 0.01 if s < steps // 2 else 0.001,
             "ce": 2.0 * math.exp(-s / 50) + 0.1 * rng.random(), "acc": min(1.0, s / steps),
             "crr": 0.05 + 0.01 * rng.random(), "frr": 0.5 - 0.2 * s / steps, "loss2": 0.3, "skipped": 0.0}
            for s in range(1, steps + 1)]


def _read_png(path):
    image = cv2.imread(str(path))
    assert image is not None, path
    return image


def test_curves_png_from_jsonl_rows(tmp_path):
    _write_jsonl(tmp_path / "metrics.jsonl", _train_rows(200, 20))
    _write_jsonl(tmp_path / "val_metrics.jsonl",
                 [{"epoch": e, "maxboxacc_v2": 30.0 + e, "maxboxacc": 50.0 + e, "top1_cls": 20.0 + 3 * e,
                   "per_iou": {"30": 1.0}, "images": 40} for e in range(1, 11)])
    path = write_curves(tmp_path)
    assert path == tmp_path / CURVES_FILE
    image = _read_png(path)
    height, width = image.shape[:2]
    assert 500 <= height <= 2000 and 800 <= width <= 3000
    assert image.std() > 10  # something is drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURVES_FILE, "metrics.jsonl", "val_metrics.jsonl"]
    # drawn again over the old one (the run redraws it every epoch)
    assert write_curves(tmp_path) == path and _read_png(path).shape == image.shape


def test_curves_robust_to_missing_files_keys_and_single_points(tmp_path):
    assert write_curves(tmp_path) is None and not (tmp_path / CURVES_FILE).exists()  # nothing to draw
    assert write_curves(tmp_path / "absent") is None

    only_val = tmp_path / "only_val"
    only_val.mkdir()
    _write_jsonl(only_val / "val_metrics.jsonl", [{"epoch": 1, "maxboxacc_v2": 12.5}])
    assert _read_png(write_curves(only_val)).size

    odd = tmp_path / "odd"
    odd.mkdir()
    rows = [{"step": 1, "epoch": 1, "ce": 2.3}, {"epoch": 1, "acc": 0.5, "crr": float("inf")},
            {"step": 3, "ce": "x", "frr": None, "lr": 0.1}]
    (odd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "ce"')
    (odd / "val_metrics.jsonl").write_text("\n[1, 2]\n" + json.dumps({"epoch": 1, "pxap": 40.0}) + "\n")
    assert len(read_jsonl(odd / "metrics.jsonl")) == 3  # the cut-off last line is skipped
    assert _read_png(write_curves(odd)).size

    no_numbers = tmp_path / "no_numbers"
    no_numbers.mkdir()
    _write_jsonl(no_numbers / "metrics.jsonl", [{"step": 1, "epoch": 1}])
    assert write_curves(no_numbers) is None


def test_curves_never_use_pyplot(tmp_path):
    _write_jsonl(tmp_path / "metrics.jsonl", _train_rows(5, 5))
    code = ("import sys; from mmcam_fast.curves import write_curves; "
            f"assert write_curves({str(tmp_path)!r}); assert 'matplotlib.pyplot' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MPLBACKEND": "TkAgg", "DISPLAY": ""})
    assert result.returncode == 0, result.stderr


def test_curves_of_a_real_run(finished_run, tmp_path):
    for name in ("metrics.jsonl", "val_metrics.jsonl", "final_metrics.json"):
        (tmp_path / name).write_bytes((finished_run / name).read_bytes())
    image = _read_png(write_curves(tmp_path))
    assert image.shape[0] > 500


def test_curves_write_is_atomic(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    _write_jsonl(tmp_path / "metrics.jsonl", _train_rows(10, 5))
    write_curves(tmp_path)
    before = (tmp_path / CURVES_FILE).read_bytes()

    def broken(self, out, **kwargs):
        out.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        write_curves(tmp_path)
    assert (tmp_path / CURVES_FILE).read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURVES_FILE, "metrics.jsonl"]  # no temp file


# -- the validation line ---------------------------------------------------------------------------

def test_format_validation():
    val = {"epoch": 3, "maxboxacc_v2": 41.23, "maxboxacc": 55.0, "top1_cls": 37.5, "per_iou": {}}
    assert format_validation(val, epochs=10, best=41.23, best_epoch=3, saved=["best.pt", "last.pt"]) == (
        "epoch 3/10  val MaxBoxAccV2 41.2  MaxBoxAcc 55.0  top-1 37.5  best 41.2 (this epoch)  "
        "saved best.pt, last.pt")
    assert format_validation(val, epochs=10, best=43.0, best_epoch=2, saved="last.pt") == (
        "epoch 3/10  val MaxBoxAccV2 41.2  MaxBoxAcc 55.0  top-1 37.5  best 43.0 (epoch 2)  saved last.pt")
    assert format_validation({"epoch": 1, "pxap": 61.04, "top1_cls": float("nan")}) == (
        "epoch 1  val PxAP 61.0  top-1 nan")
    assert format_validation({}, best=1.0) == "val (no metrics)  best 1.0"


# -- progress bars of validation and test ----------------------------------------------------------

@pytest.fixture(scope="module")
def small_eval(tmp_path_factory):
    import torch

    from mmcam_fast.data.splits import build_datasets
    from mmcam_fast.models import create_model

    root = tmp_path_factory.mktemp("data") / "synthetic"
    data = build_datasets("synthetic", root, image_size=64,
                          synthetic={"num_classes": 2, "train_per_class": 2, "val_per_class": 3,
                                     "test_per_class": 2})
    torch.manual_seed(0)
    model = create_model("resnet18", data.num_classes, feature_stride=8).eval()
    return model, data


def test_evaluation_shows_a_progress_bar(small_eval, capsys):
    from mmcam_fast.localization import evaluate_localization

    model, data = small_eval
    quiet = evaluate_localization(model, data.val, batch_size=4, progress=False)
    assert capsys.readouterr().err == ""
    shown = evaluate_localization(model, data.val, batch_size=4, progress=True, desc="val")
    err = capsys.readouterr().err
    assert err.startswith("\rval:") and "/6 [" in err and "img/s" in err
    assert err.endswith("\r") and not err.rsplit("\r", 2)[1].strip()  # its line cleared at the end
    assert shown == quiet


def test_progress_bar_is_closed_before_an_error_propagates(small_eval, monkeypatch):
    import mmcam_fast.localization as localization

    bars = []

    class Recording(localization.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.closed = False
            bars.append(self)

        def close(self):
            self.closed = True
            super().close()

    def failing(evaluators, scoremaps, **kwargs):
        next(iter(scoremaps))
        assert not bars[0].closed  # open while the images go by
        raise RuntimeError("evaluator failed")

    monkeypatch.setattr(localization, "tqdm", Recording)
    monkeypatch.setattr(localization, "accumulate_boxes", failing)
    model, data = small_eval
    with pytest.raises(RuntimeError, match="evaluator failed"):
        localization.evaluate_localization(model, data.val, batch_size=4, progress=True, desc="test")
    assert len(bars) == 1 and bars[0].closed and bars[0].n == 1
