"""Classification pretraining: resumable, exported as a torchvision state dict that ``--pretrained``
loads into the CAM backbones at every feature-map geometry."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from shared_data import shared_data_dir

from mmcam_fast.cli import run_main
from mmcam_fast.cli.pretrain import main
from mmcam_fast.models import FEATURE_STRIDES, create_model


def test_pretrain_resumes_exports_and_loads_into_every_geometry(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = str(shared_data_dir() / "tiny-imagenet-5")
    export = tmp_path / "weights" / "r18.pth"
    argv = ["--data-root", tiny, "--arch", "resnet18", "--image-size", "32", "--batch-size", "8",
            "--max-steps-per-epoch", "2", "--workers", "0", "--out", "pre", "--amp", "off"]
    assert run_main(main, [*argv, "--epochs", "1"]) == 0
    first = json.loads((tmp_path / "pre" / "pretrain.json").read_text())
    assert (first["precision"], first["channels_last"]) == ("fp32", False)  # fp32 on a CPU: contiguous
    assert run_main(main, [*argv, "--epochs", "2", "--resume", "auto", "--export", str(export),
                           "--channels-last"]) == 0
    out, err = capsys.readouterr()
    assert "resuming after epoch 1" in err
    result = json.loads(out.strip().splitlines()[-1])
    assert [h["epoch"] for h in result["history"]] == [1, 2] and result["channels_last"] is True
    digest = (export.parent / "r18.pth.sha256").read_text().split()[0]
    assert digest == hashlib.sha256(export.read_bytes()).hexdigest() == result["sha256"]
    state = torch.load(export, weights_only=True)
    assert state["conv1.weight"].dtype == torch.float16 and "fc.weight" in state
    for stride in FEATURE_STRIDES["resnet18"]:
        model = create_model("resnet18", 20, feature_stride=stride, pretrained=export)
        assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"].float())


def test_an_unknown_arch_is_one_clear_error(tmp_path, capsys):
    assert run_main(main, ["--data-root", str(tmp_path), "--arch", "vgg", "--out", str(tmp_path / "o")]) == 2
    assert "--arch 'vgg'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--batch-size", "1"], "--batch-size must be at least 2, got 1"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--max-steps-per-epoch", "0"], "--max-steps-per-epoch must be at least 1"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
])
def test_a_number_out_of_bounds_is_one_error_naming_the_flag(argv, message, tmp_path, capsys):
    assert run_main(main, ["--data-root", str(tmp_path), "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
