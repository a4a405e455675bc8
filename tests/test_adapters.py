"""Issue 21.3: one adapter per family of networks knows its head (get, replace, freeze around, parameter
groups) and the input contract of its pretrained weights, instead of tests on the model's name."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_DATA
from torch import nn

from imgclf.checkpoint import FORMAT, FORMAT_VERSION
from imgclf.errors import UserError
from imgclf.models import InputContract, adapter_for, build_model, family_of

pytestmark = pytest.mark.usefixtures("one_thread")

LITE0 = SHARED_DATA / "pretrained" / "tf_efficientnet_lite0_imagenet.pth"  # its README says where it comes from
USER_NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.out(self.body(x))
"""


@pytest.mark.parametrize(("name", "family"), [
    ("tutorial_cnn", "own"), ("fastnet_small", "own"), ("resnet18", "torchvision"), ("no_such_net", "torchvision"),
    ("timm/resnet18", "timm"), ("nets/net.py:Net", "user"), ("python:Net", "user"),
])
def test_a_name_finds_its_family(name, family):
    assert family_of(name) == family and adapter_for(name).family == family


@pytest.mark.parametrize(("name", "head"), [
    ("tutorial_cnn", ["classifier.2"]), ("fastnet_small", ["head"]), ("resnet18", ["fc"]),
    ("squeezenet1_1", ["classifier.1"]), ("googlenet", ["fc", "aux1.fc2", "aux2.fc2"]),
    ("mobilenet_v3_small", ["classifier.3"]),
])
def test_head_param_groups_and_replacement(name, head):
    adapter = adapter_for(name)
    model = build_model(name, num_classes=3, img_size=32)
    names = {id(m): n for n, m in model.named_modules()}
    assert [names[id(m)] for m in adapter.head(model)] == head
    groups = adapter.param_groups(model)
    assert len(groups.backbone) + len(groups.head) == len(list(model.parameters()))
    assert {id(p) for p in groups.head} == {id(p) for m in adapter.head(model) for p in m.parameters()}
    new = adapter.replace_head(model, 5, init="zero")
    main = adapter.head(model)[0]
    assert main is new[0] and main.weight.shape[0] == 5 and not main.weight.any()
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


def test_freezing_leaves_only_the_head_trainable_and_inits_are_documented_values():
    adapter = adapter_for("resnet18")
    model = build_model("resnet18", num_classes=3, freeze_backbone=True)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    adapter.init_head(model, "small")
    assert 0.005 < model.fc.weight.std() < 0.02 and not model.fc.bias.any()
    with pytest.raises(UserError, match="head initialisation 'big' is none of default, zero, small"):
        adapter.init_head(model, "big")


def test_a_user_network_s_head_is_its_last_layer(tmp_path):
    (tmp_path / "net.py").write_text(USER_NET)
    name = f"{tmp_path}/net.py:Net"
    model = build_model(name, num_classes=4, freeze_backbone=True)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["out.weight", "out.bias"]
    assert adapter_for(name).head(model) == [model.out] and adapter_for(name).input_contract(True) is None
    assert adapter_for("python:Net").head(model) == [model.out]  # an object handed to imgclf.fit
    with pytest.raises(UserError, match="has no Linear or Conv2d layer"):
        adapter_for(name).head(nn.Sequential(nn.ReLU()))


def test_own_networks_and_training_from_scratch_have_no_contract():
    assert adapter_for("fastnet").input_contract(True) is None
    assert adapter_for("resnet18").input_contract(None) is None
    assert adapter_for("timm/resnet18").input_contract(False) is None


def test_torchvision_contract_comes_from_the_weights_transforms():
    contract = adapter_for("resnet18").input_contract("IMAGENET1K_V1")
    assert contract == InputContract((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 224 / 256, 224,
                                     "torchvision ResNet18_Weights.IMAGENET1K_V1")
    assert contract.resize_for(224) == 256 and contract.resize_for(128) == 146
    assert adapter_for("resnet50").input_contract(True).resize_for(224) == 232  # DEFAULT: IMAGENET1K_V2
    # imgclf turns googlenet's transform_input off: its weights then want Google's (x - 0.5) / 0.5
    assert adapter_for("googlenet").input_contract(True).mean == (0.5, 0.5, 0.5)
    grey = contract.for_channels(1)
    assert grey.mean == (pytest.approx(0.449),) and len(grey.std) == 1
    with pytest.raises(UserError, match="neither a file nor a weights name of resnet18"):
        adapter_for("resnet18").input_contract("IMAGENET9K")


def test_timm_contract_comes_from_its_pretrained_cfg():
    pytest.importorskip("timm")
    contract = adapter_for("timm/tf_efficientnet_lite0").input_contract(True)
    assert (contract.mean, contract.std, contract.interpolation, contract.crop_pct, contract.input_size) == (
        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875, 224)
    assert adapter_for("timm/resnet50").input_contract("a1_in1k").crop_pct == 0.95
    model = build_model("timm/resnet18", num_classes=3)
    new = adapter_for("timm/resnet18").replace_head(model, 7, init="zero")
    assert new == [model.fc] and model.fc.out_features == 7 and not model.fc.weight.any()


def test_a_pretrained_file_s_loading_is_told_in_one_line(tmp_path):
    torch.manual_seed(0)
    torch.save(build_model("resnet18", num_classes=1000).state_dict(), tmp_path / "r18.pth")
    lines = []
    build_model("resnet18", num_classes=3, pretrained=str(tmp_path / "r18.pth"), say=lines.append)
    assert lines == [f"loaded 120 tensors from {tmp_path / 'r18.pth'}; replaced the 1000-class head by a "
                     f"3-class one"]
    torch.save(build_model("tutorial_cnn", num_classes=3).state_dict(), tmp_path / "own.pth")
    build_model("tutorial_cnn", num_classes=3, pretrained=str(tmp_path / "own.pth"), say=lines.append)
    assert lines[-1] == f"loaded 8 tensors from {tmp_path / 'own.pth'}; kept its 3-class head"


@pytest.mark.skipif(not LITE0.is_file(), reason="../shared/data is absent (ImageNet weights)")
def test_real_imagenet_weights_load_drop_their_head_and_bring_their_contract():
    pytest.importorskip("timm")
    name, lines = "timm/tf_efficientnet_lite0", []
    model = build_model(name, num_classes=2, img_size=64, pretrained=str(LITE0), say=lines.append)
    state = torch.load(LITE0, weights_only=True)
    assert lines == [f"loaded {len(state) - 2} tensors from {LITE0}; replaced the 1000-class head by a 2-class one"]
    assert torch.equal(model.conv_stem.weight, state["conv_stem.weight"])
    assert model.classifier.out_features == 2 and model(torch.zeros(1, 3, 64, 64)).shape == (1, 2)
    contract = adapter_for(name).input_contract(str(LITE0))
    assert contract.mean == contract.std == (0.5, 0.5, 0.5) and contract.interpolation == "bicubic"


def test_predict_imports_a_torchvision_network_once(monkeypatch):
    from imgclf import predict

    calls = []
    real = predict._torchvision_builder_alone
    monkeypatch.setattr(predict, "_torchvision_builder_alone", lambda name: calls.append(name) or real(name))
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=2)
    ckpt = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": {"name": "resnet18"}, "classes": ["a", "b"],
            "state_dict": model.state_dict(), "input": {"size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.2] * 3}}
    predict.Predictor(ckpt, device="cpu")
    assert calls == ["resnet18"]
