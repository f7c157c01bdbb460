"""The two recipes (``--recipe paper`` / ``authors``) and the feature-map geometry.

The Stage II step of each recipe is held against a plain loop written here from the description of
the released code (not from the engine): ``torch.optim.SGD(..., nesterov=True, weight_decay=5e-4)``
with ``zero_grad(set_to_none=False)`` before Stage II's backward moves every parameter (weight decay
and momentum act on the zero gradients); the paper recipe moves fc.weight alone.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml
from torchvision import models as tvm
from torchvision.transforms import v2

from mmcam_fast.config import build_config
from mmcam_fast.data.dali_spec import transform_spec
from mmcam_fast.data.transforms import train_transform
from mmcam_fast.engine import Trainer
from mmcam_fast.errors import ConfigError
from mmcam_fast.evaluation.scoremaps import cams_to_scoremaps, nonfinite_maps
from mmcam_fast.models import FEATURE_STRIDES, create_model

N, S, CLASSES = 2, 3, 3


def _config(recipe: str, impl: str, **extra):
    return build_config({"data": "synthetic", "backbone": "resnet18", "recipe": recipe, "impl": impl,
                         "sets_per_batch": N, "set_size": S, "feature_stride": 16, "amp": "off",
                         "image_size": 32, **extra})


def _batch():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(N * S, 3, 32, 32, generator=generator)
    labels = torch.arange(N).repeat_interleave(S)
    return images, labels


def _expected_stage2(trainer: Trainer, after_stage1: dict, fc_grad: torch.Tensor, *, zero_fill: bool):
    """Stage II's update by a plain SGD of the same settings and kernel, from Stage I's result."""
    model = copy.deepcopy(trainer.model)
    model.load_state_dict(after_stage1["model"])
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("fc.")],
               "lr": trainer.config.lr},
              {"params": list(model.fc.parameters()),
               "lr": trainer.config.lr * trainer.config.classifier_lr_mult}]
    fused = bool(trainer.optimizer.defaults.get("fused"))
    optimizer = torch.optim.SGD(groups, lr=trainer.config.lr, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                fused=True if fused else None, foreach=None if fused else True)
    optimizer.load_state_dict(after_stage1["optimizer"])
    for param in model.parameters():  # Stage I's gradients exist; the released code zeroes them
        param.grad = torch.ones_like(param)
    optimizer.zero_grad(set_to_none=not zero_fill)
    model.fc.weight.grad = fc_grad.clone()
    optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("recipe", ["authors", "paper"])
def test_stage2_step_of_each_recipe_equals_a_plain_sgd_loop(recipe, impl):
    torch.manual_seed(0)
    config = _config(recipe, impl)
    trainer = Trainer(create_model("resnet18", CLASSES, feature_stride=16), config)
    images, labels = _batch()
    trainer.stage1_step(images, labels)
    after_stage1 = copy.deepcopy({"model": trainer.model.state_dict(),
                                  "optimizer": trainer.optimizer.state_dict()})
    trainer.stage2_step(images.contiguous(memory_format=trainer.memory_format), labels)
    fc_grad = trainer.model.fc.weight.grad
    assert fc_grad is not None and fc_grad.abs().sum() > 0
    expected = _expected_stage2(trainer, after_stage1, fc_grad, zero_fill=recipe == "authors")
    got = trainer.model.state_dict()
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []  # bit for bit
    moved = sorted(k for k in got if not torch.equal(got[k], after_stage1["model"][k]))
    if recipe == "authors":  # weight decay and momentum on every parameter, BatchNorm affine included
        params = {n for n, _ in trainer.model.named_parameters()}
        assert set(moved) == params, sorted(params - set(moved))[:5]
    else:
        assert moved == ["fc.weight"]


def test_the_recipes_set_what_the_readme_table_says_and_config_yaml_says_where_from(tmp_path):
    paper = build_config({"data": "cub", "backbone": "vgg16"})
    authors = build_config({"data": "cub", "backbone": "vgg16", "recipe": "authors"})
    assert (paper.stage2_step, paper.vertical_flip, paper.flip_before_crop, paper.conv6_init) == \
        ("fc_weight", False, False, "kaiming")
    assert (paper.lambda_crr, paper.lambda_frr, paper.sets_per_batch, paper.feature_stride) == \
        (1.0, 10.0, 12, 16)
    assert (authors.stage2_step, authors.vertical_flip, authors.flip_before_crop, authors.conv6_init) == \
        ("all", True, True, "default")
    assert (authors.lambda_crr, authors.lambda_frr, authors.sets_per_batch) == (1.0, 1.0, 5)
    flagged = build_config({"data": "cub", "backbone": "vgg16", "recipe": "authors", "lambda_frr": 3.0})
    assert flagged.lambda_frr == 3.0  # flags win over the recipe
    path = tmp_path / "config.yaml"
    authors.save(path)
    text = path.read_text()
    assert yaml.safe_load(text)["recipe"] == "authors"
    [line] = [row for row in text.splitlines() if row.startswith("#   recipe authors:")]
    for key in ("stage2_step", "vertical_flip", "flip_before_crop", "conv6_init", "lambda_crr",
                "sets_per_batch"):
        assert key in line
    assert build_config({"data": "cub", "backbone": "resnet50"}).feature_stride == 8
    with pytest.raises(ConfigError, match="--recipe"):
        build_config({"recipe": "mine"})


@pytest.mark.parametrize("backbone,stride", [("vgg16", 8), ("vgg16", 32), ("resnet50", 4),
                                            ("mobilenet_v2", 12)])
def test_an_unsupported_stride_names_the_backbone_and_what_it_supports(backbone, stride):
    supported = ", ".join(map(str, FEATURE_STRIDES[backbone]))
    with pytest.raises(ConfigError, match=f"--feature-stride {stride}: {backbone} supports {supported}"):
        build_config({"backbone": backbone, "feature_stride": stride})


@pytest.mark.parametrize("name,factory", [("resnet50", tvm.resnet50), ("mobilenet_v2", tvm.mobilenet_v2),
                                          ("resnet18", tvm.resnet18)])
def test_torchvision_weights_load_into_every_geometry(tmp_path, name, factory):
    """Strides change, keys do not: a torchvision state dict loads strictly into each geometry."""
    source = factory(weights=None).state_dict()
    path = tmp_path / "w.pth"
    torch.save(source, path)
    for stride in FEATURE_STRIDES[name]:
        model = create_model(name, 4, feature_stride=stride, pretrained=path)
        loaded = model.backbone.state_dict()
        assert all(torch.equal(loaded[k], source[k]) for k in loaded), stride


def test_conv6_initialisation_of_each_recipe():
    torch.manual_seed(0)
    kaiming = create_model("vgg16", 3, conv6_init="kaiming").backbone.conv6
    default = create_model("vgg16", 3, conv6_init="default").backbone.conv6
    assert torch.count_nonzero(kaiming.bias) == 0
    assert torch.count_nonzero(default.bias) == default.bias.numel()
    # PyTorch's default: kaiming_uniform(a=sqrt(5)), |w| <= 1/sqrt(fan_in); He normal has std sqrt(2/fan_out)
    fan_in, fan_out = 512 * 9, 1024 * 9
    assert default.weight.abs().max() <= 1 / math.sqrt(fan_in)
    assert abs(kaiming.weight.std().item() - math.sqrt(2 / fan_out)) < 0.05 * math.sqrt(2 / fan_out)


def test_the_authors_transform_flips_before_the_crop_and_dali_reads_it():
    steps = [type(t) for t in train_transform(224, vertical_flip=True, flip_before_crop=True).transforms[:4]]
    assert steps == [v2.Resize, v2.RandomHorizontalFlip, v2.RandomVerticalFlip, v2.RandomCrop]
    steps = [type(t) for t in train_transform(224).transforms[:3]]
    assert steps == [v2.Resize, v2.RandomCrop, v2.RandomHorizontalFlip]
    spec = transform_spec(train_transform(224, vertical_flip=True, flip_before_crop=True))
    assert (spec.kind, spec.crop_size, spec.resize_size, spec.horizontal_flip, spec.vertical_flip) == \
        ("train", 224, 256, True, True)


def test_a_nan_or_inf_cam_gives_an_all_zero_score_map():
    cams = torch.rand(4, 7, 7)
    cams[1, 3, 3] = float("nan")
    cams[2, 0, 0] = float("inf")
    cams[3, 6, 6] = -float("inf")
    maps = cams_to_scoremaps(cams)
    assert maps.isfinite().all()
    assert maps[0].max() == 1 and all(maps[i].abs().max() == 0 for i in (1, 2, 3))
    assert nonfinite_maps(cams).tolist() == [False, True, True, True]
