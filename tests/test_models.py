"""CAM backbones: feature-map shapes, CAMs, strict local pretrained-weight loading."""

from __future__ import annotations

import pytest
import torch
from torchvision import models as tvm

from mmcam_fast.errors import ConfigError
from mmcam_fast.models import backbone_name, backbone_spec, create_model


@pytest.mark.parametrize("name,stride,channels,side", [
    ("vgg16", None, 1024, 14),  # the default: the released code's geometry
    ("vgg16", 16, 1024, 14),
    ("resnet50", None, 2048, 28),
    ("resnet50", 8, 2048, 28),   # layer3 and layer4 at stride 1
    ("resnet50", 16, 2048, 14),  # layer4 at stride 1
    ("resnet50", 32, 2048, 7),   # torchvision's own
    ("mobilenet_v2", None, 1280, 28),
    ("mobilenet_v2", 8, 1280, 28),  # the 64- and 160-channel stages at stride 1
    ("mobilenet_v2", 16, 1280, 14),
    ("mobilenet_v2", 32, 1280, 7),
    ("resnet18", None, 512, 28),
    ("resnet18", 16, 512, 14),
])
def test_feature_map_shapes_at_224(name, stride, channels, side):
    model = create_model(name, 7, feature_stride=stride).eval()
    with torch.no_grad():
        logits, features = model(torch.randn(1, 3, 224, 224))
    assert tuple(features.shape) == (1, channels, side, side)
    assert tuple(logits.shape) == (1, 7)
    torch.testing.assert_close(logits, model.fc(features.mean(dim=(2, 3))))


def test_cams_are_the_weighted_sum_of_feature_maps():
    model = create_model("resnet18", 4)
    features = torch.randn(2, 512, 3, 3)
    classes = torch.tensor([3, 1])
    cams = model.cams(features, classes)
    expected = torch.stack([(model.fc.weight[c][:, None, None] * features[b]).sum(0)
                            for b, c in enumerate(classes)])
    # fp32 sums of 512 products in another order: error ~ sqrt(512) * 2^-24 of |terms| (~1e-6 here)
    torch.testing.assert_close(cams, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cli,key", [("resnet50", "resnet50"), ("VGG16", "vgg16"),
                                     ("mobilenet-v2", "mobilenet_v2"), ("resnet18_cam", "resnet18")])
def test_backbone_names(cli, key):
    assert backbone_name(cli) == key and backbone_spec(cli).name == key


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"--backbone 'alexnet'.*resnet50"):
        create_model("alexnet", 2)


@pytest.mark.parametrize("name,factory", [("resnet18", tvm.resnet18), ("vgg16", tvm.vgg16),
                                          ("mobilenet_v2", tvm.mobilenet_v2)])
def test_pretrained_torchvision_state_dict_loads(tmp_path, name, factory):
    torch.manual_seed(0)
    source = factory(weights=None).state_dict()
    path = tmp_path / "weights.pth"
    torch.save(source, path)
    model = create_model(name, 5, pretrained=path)
    loaded = model.backbone.state_dict()
    compared = [k for k in loaded if k in source]
    assert len(compared) > 10
    for key in compared:
        assert torch.equal(loaded[key], source[key]), key
    # The new head keeps its own shape (C=5), untouched by the 1000-class torchvision head.
    assert model.fc.weight.shape == (5, model.num_features)


def test_pretrained_with_wrapper_and_ddp_prefix(tmp_path):
    source = tvm.resnet18(weights=None).state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}}, path)
    model = create_model("resnet18", 3, pretrained=path)
    assert torch.equal(model.backbone.conv1.weight, source["conv1.weight"])


def test_pretrained_missing_key_is_an_error(tmp_path):
    source = tvm.resnet18(weights=None).state_dict()
    del source["layer2.0.conv1.weight"]
    path = tmp_path / "broken.pth"
    torch.save(source, path)
    with pytest.raises(ConfigError, match=r"--pretrained .*broken.pth.*missing: layer2.0.conv1.weight"):
        create_model("resnet18", 3, pretrained=path)


def test_pretrained_wrong_architecture_is_an_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(tvm.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ConfigError, match="shape mismatch|missing"):
        create_model("resnet50", 3, pretrained=path)


def test_pretrained_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="--pretrained .*not found"):
        create_model("resnet18", 3, pretrained=tmp_path / "nope.pth")


def test_a_file_that_is_not_a_state_dict_names_the_cause_in_one_line(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("# not weights\n")
    with pytest.raises(ConfigError) as info:
        create_model("resnet18", 3, pretrained=path)
    message = str(info.value)
    assert message.startswith(f"--pretrained {path}: not a readable torch state dict (")
    assert "\n" not in message and "weights_only" not in message  # torch's advice to unpickle is left out
