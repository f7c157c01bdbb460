"""What works without DALI: the transform reader, the backend names, and the whole data layer in an
interpreter where ``import nvidia.dali`` fails (``--loader auto`` falls back to torch)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torchvision.transforms import v2

from mmcam_fast.data.dali_spec import transform_spec
from mmcam_fast.data.loaders import BACKENDS, build_loader
from mmcam_fast.data.transforms import eval_transform, train_transform
from mmcam_fast.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = {"num_classes": 4, "train_per_class": 20, "val_per_class": 2, "test_per_class": 2, "size": 32}


def test_transform_spec_reads_the_protocol_transforms():
    train = transform_spec(train_transform(64, vertical_flip=True))
    assert (train.kind, train.crop_size, train.resize_size, train.max_crop_offset) == ("train", 64, 73, 9)
    assert train.horizontal_flip and train.vertical_flip and train.std == (0.229, 0.224, 0.225)
    evaluation = transform_spec(eval_transform(224))
    assert (evaluation.kind, evaluation.crop_size, evaluation.horizontal_flip) == ("eval", 224, False)
    with pytest.raises(ConfigError, match="does not implement the transform step ColorJitter"):
        transform_spec(v2.Compose([v2.Resize((32, 32)), v2.ColorJitter(0.4), v2.ToImage()]))
    with pytest.raises(ConfigError, match="does not implement the transform step Resize"):
        transform_spec(v2.Compose([v2.Resize((32, 32), interpolation=v2.InterpolationMode.NEAREST)]))
    with pytest.raises(ConfigError, match="square resize"):
        transform_spec(v2.Compose([v2.Resize((32, 48)), v2.ToImage()]))


def test_unknown_backend_lists_the_valid_ones():
    assert BACKENDS == ("auto", "dali", "torch")
    with pytest.raises(ConfigError, match=r"backend 'tf' \(--loader\); valid: auto, dali, torch"):
        build_loader(None, batch_size=2, backend="tf")


def test_everything_works_without_dali(tmp_path):
    """A fresh interpreter where ``import nvidia.dali`` fails: the data layer imports, ``auto`` is torch,
    ``dali`` is one clear error."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["nvidia.dali"] = None  # as if DALI were not installed
        from mmcam_fast.data.dali import dali_available
        from mmcam_fast.data.loaders import build_loader, resolve_backend
        from mmcam_fast.data.splits import build_datasets
        from mmcam_fast.errors import ConfigError
        assert not dali_available()
        data = build_datasets("synthetic", {str(tmp_path / 'set')!r}, image_size=32,
                              synthetic={SYNTHETIC!r})
        assert resolve_backend("auto", data.test) == "torch"
        loader, steps = build_loader(data.test, batch_size=4, backend="auto")
        assert sum(len(b[2]) for b in loader) == len(data.test) == 8 and steps == 2
        try:
            build_loader(data.test, batch_size=4, backend="dali")
        except ConfigError as error:
            print(error)
        """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("--loader dali needs NVIDIA DALI: pip install -e '.[dali]' (or use "
                                   "--loader torch)")


