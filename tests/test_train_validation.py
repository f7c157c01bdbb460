"""Everything a run reads is validated before its first step: a bad split, image or flag costs no
training time, and the error names the file and says what applies to it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmcam_fast.cli import run_main
from mmcam_fast.cli.evaluate import main as evaluate_main
from mmcam_fast.cli.train import main as train_main
from mmcam_fast.data.synthetic import make_synthetic

SMALL = {"num_classes": 3, "train_per_class": 6, "val_per_class": 2, "test_per_class": 2, "size": 32}
FLAGS = ["--data", "synthetic", "--backbone", "resnet18", "--image-size", "32", "--epochs", "1",
         "--max-steps-per-epoch", "1", "--sets-per-batch", "2", "--set-size", "2", "--workers", "0",
         "--impl", "reference", "--loader", "torch"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn") / "set", **SMALL, seed=1)


@pytest.fixture
def data_copy(pristine, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(pristine, copy)
    return copy


def _train(data_root: Path, out: Path, capsys) -> tuple[int, str]:
    status = run_main(train_main, [*FLAGS, "--data-root", str(data_root), "--out", str(out)])
    return status, capsys.readouterr().err


def _nothing_trained(out: Path) -> None:
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoints/*.pt"))


def test_a_missing_test_localization_file_stops_before_the_first_step(data_copy, tmp_path, capsys):
    (data_copy / "metadata" / "test" / "localization.txt").unlink()
    status, err = _train(data_copy, tmp_path / "out", capsys)
    assert status == 2 and "test/localization.txt: missing" in err
    _nothing_trained(tmp_path / "out")


def test_an_unreadable_val_image_stops_before_the_first_step_with_advice_that_applies(
        data_copy, tmp_path, capsys):
    victim = sorted((data_copy / "images" / "val").rglob("*.jpg"))[1]
    victim.write_bytes(b"\xff\xd8 not a jpeg")
    status, err = _train(data_copy, tmp_path / "out", capsys)
    assert status == 2 and victim.name in err and "every val image" in err
    assert "pass --bad-images skip" not in err  # that advice applies to the train split only
    _nothing_trained(tmp_path / "out")


def test_a_missing_test_image_stops_before_the_first_step(data_copy, tmp_path, capsys):
    victim = sorted((data_copy / "images" / "test").rglob("*.jpg"))[0]
    victim.unlink()
    status, err = _train(data_copy, tmp_path / "out", capsys)
    assert status == 2 and victim.name in err
    _nothing_trained(tmp_path / "out")


def test_a_missing_pretrained_file_stops_before_any_data_work(tmp_path, capsys):
    status = run_main(train_main, [*FLAGS, "--data-root", str(tmp_path / "never-made"), "--out",
                                   str(tmp_path / "out"), "--pretrained", str(tmp_path / "w.pth")])
    assert status == 2 and "--pretrained" in capsys.readouterr().err
    assert not (tmp_path / "never-made").exists()


def test_the_checkpoint_holds_absolute_roots_so_evaluate_works_from_anywhere(pristine, tmp_path, monkeypatch,
                                                                            capsys):
    work = tmp_path / "work"
    shutil.copytree(pristine, work / "data")
    monkeypatch.chdir(work)
    assert run_main(train_main, [*FLAGS, "--data-root", "data", "--out", "run"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert run_main(evaluate_main, ["--checkpoint", str(work / "run" / "checkpoints" / "last.pt"),
                                    "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == SMALL["num_classes"] * SMALL["test_per_class"]


def test_the_readme_voc_example_runs_on_fruit_voc_with_the_preset(tmp_path, monkeypatch, capsys):
    """The voc preset's N = 12 on fruit-voc's 3 classes failed in the sampler; a preset's N above the
    number of classes now uses every class (logged), while an N given on the command line is kept."""
    from shared_data import shared_data_dir

    monkeypatch.chdir(tmp_path)  # the raw folder is converted into runs/data/ of the working folder
    voc = str(shared_data_dir() / "fruit-voc")
    argv = ["--backbone", "resnet18", "--data", "voc", "--data-root", voc, "--image-size", "32",
            "--epochs", "1", "--max-steps-per-epoch", "1", "--workers", "0", "--impl", "reference",
            "--loader", "torch"]
    assert run_main(train_main, [*argv, "--out", "run"]) == 0
    assert "using all 3" in capsys.readouterr().err
    import yaml

    assert yaml.safe_load(Path("run/config.yaml").read_text())["sets_per_batch"] == 3
    assert run_main(train_main, [*argv, "--out", "run2", "--sets-per-batch", "4"]) == 2
    assert "--sets-per-batch" in capsys.readouterr().err


def test_an_unknown_backbone_is_reported_before_any_data_work(tmp_path, capsys):
    """It used to be reported only after the synthetic set was generated (or a source converted)."""
    status = run_main(train_main, ["--data", "synthetic", "--data-root", str(tmp_path / "never-made"),
                                   "--backbone", "alexnet", "--out", str(tmp_path / "out")])
    assert status == 2 and "--backbone 'alexnet'" in capsys.readouterr().err
    assert not (tmp_path / "never-made").exists() and not (tmp_path / "out").exists()
