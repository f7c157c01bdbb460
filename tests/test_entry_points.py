"""Every command fails the same way on bad input: one line on stderr naming the file, line or flag and
what was expected, exit status 2, through ``python -m`` and the console scripts alike; a bug is a
traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmcam_fast.cli import run_main
from mmcam_fast.errors import DataError

SCRIPTS = {"train": ("mmcam-train", "mmcam_fast.train"),
           "evaluate": ("mmcam-evaluate", "mmcam_fast.evaluate"),
           "localize": ("mmcam-localize", "mmcam_fast.localize"),
           "prepare": ("mmcam-prepare", "mmcam_fast.prepare"),
           "scratch-study": ("mmcam-scratch-study", "mmcam_fast.scratch_study"),
           "pretrain": ("mmcam-pretrain", "mmcam_fast.pretrain"),
           "tiny-wsol": ("mmcam-tiny-wsol", "mmcam_fast.tiny_wsol")}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Per command: (arguments, text the one error line must contain)."""
    root = tmp_path_factory.mktemp("bad")
    afile = root / "afile.txt"
    afile.write_text("not a folder")
    latin = root / "latin"
    for split in ("train", "val", "test"):
        (latin / "metadata" / split).mkdir(parents=True)
        (latin / "metadata" / split / "image_ids.txt").write_bytes(b"a.jpg\nb\xe9.jpg\n")
    (latin / "prepared.json").write_text('{"kind": "voc"}')
    notckpt = root / "notckpt.pt"
    notckpt.write_bytes(b"\x00garbage")
    return {
        "train": [(["--backbone", "foo"], "--backbone 'foo'"),
                  (["--out", str(afile)], "is a file"),
                  (["--data", "voc", "--data-root", str(latin), "--out", str(root / "o1")],
                   "image_ids.txt:2"),
                  (["--no-such-flag"], "--no-such-flag"),
                  (["--epochs", "many"], "--epochs")],
        "evaluate": [(["--dataset", "CUB"], "--scoremap-root"),
                     (["--checkpoint", str(root / "missing.pt")], "missing.pt")],
        "localize": [(["--checkpoint", str(notckpt), str(root / "nope.jpg")], "nope.jpg"),
                     (["--checkpoint", str(notckpt), str(afile)], "notckpt.pt")],
        "prepare": [(["voc", "--out", str(root / "p")], "--src"),
                    (["voc", "--src", str(root / "nowhere"), "--out", str(root / "p")], "nowhere"),
                    (["voc", "--src", str(root), "--out", str(afile)], "afile.txt: is a file")],
        "scratch-study": [(["--src", str(root), "--jobs", "0"], "--jobs")],
        "pretrain": [(["--data-root", str(root), "--arch", "vgg", "--out", str(root / "pt")],
                      "--arch 'vgg'"),
                     (["--data-root", str(root), "--seed", "-1", "--out", str(root / "pt")], "--seed")],
        "tiny-wsol": [(["study", "--shared", str(root), "--jobs", "0"], "--jobs"),
                      (["gate", "--shared", str(root), "--recipes", "nope"], "--recipes")],
    }


def _check(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "error:" in lines[0] and expected in lines[0], lines[0]


@pytest.mark.parametrize("command", sorted(SCRIPTS))
@pytest.mark.parametrize("form", ["module", "script"])
def test_bad_input_is_one_line_and_exit_2(command, form, bad_inputs, tmp_path):
    script, module = SCRIPTS[command]
    if form == "script":
        found = shutil.which(script, path=os.pathsep.join([str(Path(sys.executable).parent),
                                                          os.environ.get("PATH", "")]))
        if found is None:
            pytest.fail(f"console script {script} is not installed (pip install -e .)")
        prefix = [found]
    else:
        prefix = [sys.executable, "-m", module]
    for args, expected in bad_inputs[command]:
        extra = ["--out", str(tmp_path / "out")] if command == "train" and "--out" not in args else []
        result = subprocess.run([*prefix, *args, *extra], capture_output=True, text=True, timeout=300,
                                cwd=tmp_path, stdin=subprocess.DEVNULL)
        _check(result, expected)


def test_a_bug_keeps_its_traceback(capsys):
    def broken(argv):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_main(broken, [])

    def bad_input(argv):
        raise DataError("x.txt:3: expected an integer,\ngot 'a'")

    assert run_main(bad_input, [], prog="mmcam-x") == 2
    assert capsys.readouterr().err == "mmcam-x: error: x.txt:3: expected an integer, got 'a'\n"
