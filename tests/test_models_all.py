"""Issue 13, items 1 and 2: every classifier `imgclf models` lists trains a step and evaluates at its smallest
working size (or says in one line which sizes it takes); auxiliary logits; ViTs at other sizes; timm."""

from __future__ import annotations

import json
import sys
import time
from collections import namedtuple

import pytest
import torch
from conftest import run_cli, write_class_folder
from torch import nn

from imgclf import cli
from imgclf.checkpoint import load_checkpoint
from imgclf.errors import UserError
from imgclf.export import export_checkpoint
from imgclf.models import (
    MIN_SIZES,
    OWN_MODELS,
    available_models,
    build_model,
    model_from_checkpoint,
    training_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Over 0.5 s for a build, a forward and backward pass of 2 pictures and an eval pass, one thread of a 2-core
# machine (`pytest --durations=0 tests/test_models_all.py`; the largest take 3-6 s, vit_h_14 and
# regnet_y_128gf much more): so that the rest, about 30 models, take under 10 s together.
SLOW = {
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "densenet161", "densenet169",
    "densenet201", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "efficientnet_v2_l", "efficientnet_v2_m", "efficientnet_v2_s", "inception_v3", "maxvit_t",
    "regnet_x_16gf", "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_8gf", "regnet_y_128gf", "regnet_y_16gf",
    "regnet_y_32gf", "regnet_y_3_2gf", "regnet_y_8gf", "resnet101", "resnet152", "resnet34", "resnet50",
    "resnext101_32x8d", "resnext101_64x4d", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s",
    "swin_v2_t", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet101_2", "wide_resnet50_2",
    # 0.2-0.8 s each (measured 2026-12-04): the fast tier keeps one of each family's small members
    "convnext_tiny", "shufflenet_v2_x0_5", "regnet_x_800mf", "regnet_y_1_6gf", "resnext50_32x4d", "googlenet",
    "efficientnet_b3", "densenet121", "efficientnet_b2", "regnet_x_1_6gf", "regnet_x_400mf",
}
LISTED = [n for n in available_models() if not n.startswith("timm/")]


def smallest_size(name: str) -> int:
    if name.startswith("vit_"):
        return int(name.rsplit("_", 1)[1])  # one patch
    return {"fastnet": 16, "fastnet_small": 16, "fastnet_wide": 16}.get(name, MIN_SIZES.get(name, 8))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in LISTED])
def test_every_listed_model_trains_a_step_and_evaluates_at_its_smallest_size(name):
    size = smallest_size(name)
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, img_size=size).train()
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 2])
    logits, loss = training_loss(model(x), y, nn.CrossEntropyLoss())
    loss.backward()
    assert logits.shape == (2, 3) and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.ndim > 1)
    with torch.no_grad():
        out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)  # eval: plain logits, also with aux heads


def test_the_parametrized_list_is_every_listed_model_and_the_slow_set_names_real_ones():
    assert set(OWN_MODELS) < set(LISTED) and {"googlenet", "inception_v3", "vit_b_16"} < set(LISTED)
    assert SLOW.issubset(LISTED)


@pytest.mark.parametrize(("name", "size", "message"), [
    ("alexnet", 32, "alexnet needs pictures of at least 63x63, got 32x32; pass --img-size 63 or more"),
    ("inception_v3", 64, "inception_v3 needs pictures of at least 75x75"),
    ("squeezenet1_0", 16, "at least 21x21"),
    ("vit_b_16", 70, "vit_b_16 takes sides that are multiples of its patch size 16 (such as 64), got 70"),
    ("vit_h_14", 30, "multiples of its patch size 14 (such as 28)"),
    ("maxvit_t", 64, "maxvit_t takes only sides from 221 to 224, 445 to 448"),
    ("fastnet", 8, "fastnet needs pictures of at least 16x16"),
    ("resnet9000", 32, "unknown model 'resnet9000'"),
])
def test_sizes_a_model_cannot_take_are_one_line(name, size, message):
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        build_model(name, num_classes=3, img_size=size)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - start < 2  # said before anything is built


def test_auxiliary_losses_are_weighted_as_their_authors_did():
    loss_fn = nn.CrossEntropyLoss()
    y = torch.tensor([0, 1])
    main, aux1, aux2 = (torch.randn(2, 3) for _ in range(3))
    GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", "logits aux_logits2 aux_logits1")  # matched by name
    InceptionOutputs = namedtuple("InceptionOutputs", "logits aux_logits")
    logits, loss = training_loss(GoogLeNetOutputs(main, aux2, aux1), y, loss_fn)
    assert logits is main
    assert loss == pytest.approx(float(loss_fn(main, y) + 0.3 * loss_fn(aux1, y) + 0.3 * loss_fn(aux2, y)))
    assert training_loss(InceptionOutputs(main, aux1), y, loss_fn)[1] == pytest.approx(
        float(loss_fn(main, y) + 0.4 * loss_fn(aux1, y)))
    assert training_loss(InceptionOutputs(main, None), y, loss_fn)[1] == pytest.approx(float(loss_fn(main, y)))
    with pytest.raises(UserError, match="returned a tuple in training mode"):
        training_loss((main, aux1), y, loss_fn)


def test_googlenet_has_aux_heads_for_the_classes_and_no_input_rescaling():
    model = build_model("googlenet", num_classes=3, img_size=32).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert type(out).__name__ == "GoogLeNetOutputs" and [t.shape for t in out] == [(2, 3)] * 3
    assert not model.transform_input  # imgclf normalises by the data's own statistics
    inception = build_model("inception_v3", num_classes=3, img_size=75)
    assert inception.AuxLogits is None  # its auxiliary classifier needs 299x299; below, it is left out


@pytest.mark.slow
def test_inception_v3_at_299_trains_with_its_auxiliary_classifier():
    model = build_model("inception_v3", num_classes=3, img_size=299).train()
    out = model(torch.randn(2, 3, 299, 299))
    assert type(out).__name__ == "InceptionOutputs" and out.aux_logits.shape == (2, 3)
    training_loss(out, torch.tensor([0, 1]), nn.CrossEntropyLoss())[1].backward()


@pytest.mark.slow
def test_vit_pretrained_file_at_another_size_resizes_its_position_embeddings(tmp_path):
    source = build_model("vit_b_32", num_classes=3, img_size=96)  # a 3x3 grid of patches
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    model = build_model("vit_b_32", num_classes=5, img_size=64, pretrained=str(tmp_path / "vit.pth"))
    pos = model.encoder.pos_embedding
    assert pos.shape == (1, 1 + 2 * 2, 768)  # class token + 2x2 grid
    assert torch.equal(pos[:, 0], source.encoder.pos_embedding[:, 0])  # the class token's kept
    assert torch.equal(model.conv_proj.weight, source.conv_proj.weight)
    assert model.heads.head.out_features == 5


class _Batches:
    """The loader interface of `engine.train_one_epoch`: `steps` batches of 4 pictures, 3 classes."""

    def __init__(self, size: int, steps: int = 2):
        g = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(4, 3, size, size, generator=g), torch.tensor([0, 1, 2, 0]), 4)
                        for _ in range(steps)]

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, start_step: int = 0):
        return iter(self.batches[start_step:])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["googlenet", "vit_b_32"])
def test_googlenet_and_a_vit_train_through_the_loop_at_64(name):
    from contextlib import nullcontext

    from imgclf.engine import TrainState, train_one_epoch

    torch.manual_seed(0)
    model = build_model(name, num_classes=3, img_size=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, total_steps=2)
    before = model.fc.weight.clone() if name == "googlenet" else model.heads.head.weight.clone()
    stats = train_one_epoch(state, _Batches(64), epoch=0, loss_fn=nn.CrossEntropyLoss(), autocast=nullcontext)
    assert stats["images"] == 8 and stats["loss"] > 0 and 0 <= stats["acc"] <= 1
    after = model.fc.weight if name == "googlenet" else model.heads.head.weight
    assert not torch.equal(before, after)
    if name == "googlenet":  # the auxiliary classifiers learn too
        assert model.aux1.fc2.weight.grad is not None and model.aux2.fc2.weight.grad is not None


@pytest.fixture(scope="module")
def tiny_64(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny64")
    write_class_folder(tmp / "data" / "train", ["a", "b", "c"], 4, size=64, seed=1)
    write_class_folder(tmp / "data" / "test", ["a", "b", "c"], 2, size=64, seed=2)
    return tmp


def _train_cli(tmp, name: str, *extra: str):
    run = tmp / name.replace("/", "_")
    rc = cli.main(["train", "--model", name, "--data", str(tmp / "data"), "--epochs", "1", "--img-size", "64",
                   "--batch-size", "4", "--precision", "fp32", "--device", "cpu", "--cache-dir", str(tmp / "cache"),
                   "--out", str(run), *extra])
    assert rc == 0
    return run / "checkpoints" / "last.pt"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", ["googlenet", "vit_b_32"])
def test_googlenet_and_a_vit_train_at_64_from_the_cli_then_evaluate_and_export(tiny_64, tmp_path, name):
    path = _train_cli(tiny_64, name)
    ckpt = load_checkpoint(path)
    assert ckpt["input"]["size"] == 64 and ckpt["metrics"]["train_loss"] > 0
    model = model_from_checkpoint(ckpt)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    done = export_checkpoint(path, "torchscript", tmp_path / "m.torchscript.pt")
    assert done.max_diff < 1e-4


# ---------------------------------------------------------------- timm

@pytest.fixture
def timm():
    return pytest.importorskip("timm")


def test_timm_models_are_listed_and_searchable(timm):
    found = available_models(search="ResNet18")
    assert "resnet18" in found and "timm/resnet18" in found and all("resnet18" in n for n in found)
    assert "timm/convnext_nano" in available_models(search="convnext_nano")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.slow  # over a second (a training or a real process): the fast tier stays under a minute
def test_timm_model_loads_a_local_pretrained_file_and_skips_the_old_head(timm, tmp_path, suffix):
    source = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    model = build_model("timm/resnet18", num_classes=3, img_size=32, pretrained=str(path), freeze_backbone=True)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.out_features == 3 and model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    grey = build_model("timm/resnet18", num_classes=3, in_channels=1, img_size=32, pretrained=str(path))
    assert torch.allclose(grey.conv1.weight, source.conv1.weight.sum(1, keepdim=True))  # RGB filters summed


@pytest.mark.slow
def test_timm_vit_is_built_for_the_requested_size_and_takes_a_224_file(timm, tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    model = build_model("timm/vit_tiny_patch16_224", num_classes=3, img_size=64, pretrained=str(tmp_path / "vit.pth"))
    assert model.pos_embed.shape == (1, 1 + 4 * 4, 192) and model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_timm_errors_are_one_line(timm, monkeypatch):
    cases = [("timm/resnet18x", None, "timm has no model 'resnet18x'; did you mean timm/resnet18"),
             ("timm/resnet18", "no_such_tag", "is neither a file nor weights timm has for resnet18 (DEFAULT, or a tag"),
             ("timm/resnet18", "nope/weights.pth", "neither a file nor weights"),
             ("timm/resnet18", "a1_in1k", "resnet18.a1_in1k"),  # a download: one line at once where unreachable
             ]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name, pretrained, message in cases:
        start = time.perf_counter()
        try:
            build_model(name, num_classes=3, img_size=32, pretrained=pretrained)
        except UserError as err:
            assert message in str(err) and "\n" not in str(err), str(err)
        else:
            assert pretrained == "a1_in1k"  # a network was reachable, and the weights came
        assert time.perf_counter() - start < 15
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(UserError, match=r"--model timm/resnet18 needs the package timm: pip install 'imgclf\[timm\]'"):
        build_model("timm/resnet18", num_classes=3)
    assert not any(n.startswith("timm/") for n in available_models())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_timm_model_trains_from_the_cli_with_a_pretrained_file_and_exports(timm, tiny_64, tmp_path):
    torch.save(timm.create_model("resnet18", num_classes=1000).state_dict(), tmp_path / "r18.pth")
    path = _train_cli(tiny_64, "timm/resnet18", "--pretrained", str(tmp_path / "r18.pth"))
    ckpt = load_checkpoint(path)
    assert ckpt["model"]["name"] == "timm/resnet18"
    assert model_from_checkpoint(ckpt)(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    assert export_checkpoint(path, "torchscript", tmp_path / "m.pt").max_diff < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "convnext_nano"])
def test_timm_models_train_on_ants_and_bees_with_a_local_pretrained_file(timm, hymenoptera_dir, tmp_path, arch):
    from safetensors.torch import save_file

    source = timm.create_model(arch, num_classes=1000)  # stands in for downloaded ImageNet weights
    save_file(source.state_dict(), str(tmp_path / f"{arch}.safetensors"))
    run = tmp_path / "run"
    r = run_cli("train", "--data", hymenoptera_dir, "--model", f"timm/{arch}", "--pretrained",
                tmp_path / f"{arch}.safetensors", "--img-size", "64", "--epochs", "1", "--batch-size", "32",
                "--out", run)
    assert r.returncode == 0, r.stderr
    ev = json.loads(run_cli("eval", run / "checkpoints" / "last.pt", "--data", hymenoptera_dir, "--json").stdout)
    assert ev["count"] == 153 and ev["classes"] == ["ants", "bees"]
    pred = run_cli("predict", run / "checkpoints" / "last.pt", hymenoptera_dir / "val" / "ants", "--topk", "1")
    assert pred.returncode == 0 and len(pred.stdout.splitlines()) == 70
