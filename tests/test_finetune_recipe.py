"""The fine-tuning recipe (issue 22): --pretrained weights switch the defaults to recipes/finetune.yaml, every
value of which a flag overrides; the pictures are normalised by the weights' input contract; the new head
starts as --head-init says; --bn-stats frozen keeps BatchNorm's statistics."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_DATA

from imgclf.cli import build_parser, main, train_config
from imgclf.config import TrainConfig
from imgclf.engine import train_mode
from imgclf.errors import UserError
from imgclf.models import adapter_for, build_model
from imgclf.pipeline import describe_finetune, normalization, run_network
from imgclf.resolve import chosen_recipe, resolve

pytestmark = pytest.mark.usefixtures("one_thread")
LITE0 = SHARED_DATA / "pretrained" / "tf_efficientnet_lite0_imagenet.pth"

# every value recipes/finetune.yaml sets, as the resolved configuration holds it
RECIPE = {("optim", "optimizer"): "adamw", ("optim", "lr"): 1e-3, ("optim", "weight_decay"): 0.01,
          ("optim", "schedule"): "cosine", ("optim", "warmup_epochs"): 0.2, ("optim", "label_smoothing"): 0.1,
          ("data", "batch_size"): 32, ("model", "freeze_epochs"): 1, ("model", "backbone_lr_scale"): 0.1,
          ("model", "head_init"): "zero", ("model", "bn_stats"): "update", ("data", "normalize"): "auto"}


def resolved(*argv) -> TrainConfig:
    return train_config(build_parser().parse_args(["train", *map(str, argv)]))


def value(cfg: TrainConfig, key: tuple[str, str]):
    return getattr(getattr(cfg, key[0]), key[1])


def test_pretrained_weights_resolve_the_finetune_recipe(tmp_path):
    cfg = resolved("--model", "timm/tf_efficientnet_lite0", "--pretrained", tmp_path / "w.pth")
    for key, expected in RECIPE.items():
        assert value(cfg, key) == expected, key
    scratch = resolved("--model", "timm/tf_efficientnet_lite0")  # from scratch: the default recipe, unchanged
    assert scratch == resolved("--model", "timm/tf_efficientnet_lite0", "--recipe", "default")
    assert (scratch.optim.optimizer, scratch.optim.lr, scratch.data.batch_size, scratch.model.head_init) == \
        ("sgd", 0.05, 128, "default")


def test_every_recipe_value_is_overridden_by_its_flag(tmp_path):
    flags = {("optim", "optimizer"): "sgd", ("optim", "lr"): 0.02, ("optim", "weight_decay"): 0.001,
             ("optim", "schedule"): "onecycle", ("optim", "warmup_epochs"): 1.0, ("optim", "label_smoothing"): 0.0,
             ("data", "batch_size"): 64, ("model", "freeze_epochs"): 2, ("model", "backbone_lr_scale"): 1.0,
             ("model", "head_init"): "small", ("model", "bn_stats"): "frozen", ("data", "normalize"): "data"}
    assert flags.keys() == RECIPE.keys()
    argv = [x for (_, name), v in flags.items() for x in (f"--{name.replace('_', '-')}", v)]
    cfg = resolved("--pretrained", tmp_path / "w.pth", *argv)
    for key, expected in flags.items():
        assert value(cfg, key) == expected, key
    explicit = resolved("--pretrained", tmp_path / "w.pth", "--recipe", "default")  # a recipe named wins
    assert (explicit.optim.optimizer, explicit.data.batch_size) == ("sgd", 128)


def test_the_recipe_is_chosen_by_any_layer_and_shown_by_print_config(tmp_path, capsys):
    assert chosen_recipe("auto", {("model", "pretrained"): None}) == "default"
    assert chosen_recipe("auto", {}, {("model", "pretrained"): "w.pth"}) == "finetune"
    assert chosen_recipe("notes", {("model", "pretrained"): "w.pth"}) == "notes"
    assert resolve({("model", "pretrained"): "w.pth"}).optim.optimizer == "adamw"  # fit and tune resolve so too
    assert main(["train", "--pretrained", str(tmp_path / "w.pth"), "--print-config"]) == 0
    shown = capsys.readouterr().out
    for line in ("optimizer: adamw", "lr: 0.001", "batch_size: 32", "freeze_epochs: 1", "head_init: zero",
                 "bn_stats: update", "normalize: auto"):
        assert f"\n{line}\n" in shown, line


def test_the_input_contract_comes_from_the_weights_metadata(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")  # a file: taken to hold the architecture's default weights
    lite0 = resolved("--model", "timm/tf_efficientnet_lite0", "--pretrained", weights)
    contract = normalization(lite0, 3)
    assert (contract.mean, contract.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # timm's pretrained_cfg
    assert (contract.interpolation, contract.crop_pct, contract.input_size) == ("bicubic", 0.875, 224)
    assert contract == adapter_for("timm/tf_efficientnet_lite0").input_contract(str(weights))
    resnet = normalization(resolved("--model", "resnet18", "--pretrained", weights), 3)
    assert (resnet.mean, resnet.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's meta
    assert normalization(resolved("--model", "resnet18", "--pretrained", weights), 1).mean == \
        (pytest.approx(sum(resnet.mean) / 3),)  # grey pictures: the channels' average
    assert normalization(resolved("--model", "resnet18", "--pretrained", weights, "--normalize", "data"), 3) is None
    assert normalization(resolved("--model", "resnet18"), 3) is None  # from scratch: the data's statistics
    assert normalization(resolved("--model", "tutorial_cnn", "--pretrained", weights), 3) is None  # no contract
    with pytest.raises(UserError, match="--normalize weights needs --pretrained weights"):
        normalization(resolved("--model", "resnet18", "--normalize", "weights"), 3)
    with pytest.raises(UserError, match="knows no input contract"):
        normalization(resolved("--model", "tutorial_cnn", "--pretrained", weights, "--normalize", "weights"), 3)


def test_the_new_head_starts_as_head_init_says(tmp_path):
    class Data:
        classes, channels, img_size = ["a", "b", "c"], 3, 32

    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(build_model("resnet18", num_classes=1000).state_dict(), weights)
    for init, check in (("zero", lambda w: not w.any()), ("small", lambda w: 0 < w.std() < 0.02),
                        ("default", lambda w: w.std() > 0.02)):
        cfg = resolved("--model", "resnet18", "--pretrained", weights, "--head-init", init, "--img-size", 32)
        model = run_network(cfg, Data(), fresh=True)
        assert check(model.fc.weight), init
        assert model.fc.weight.shape == (3, 512)
    resumed = run_network(resolved("--model", "resnet18", "--head-init", "zero"), Data(), fresh=False)
    assert resumed.fc.weight.any()  # a resumed run's head comes from its checkpoint, not from --head-init


def test_bn_stats_frozen_keeps_every_batchnorm_in_eval_mode():
    model = build_model("resnet18", num_classes=2, img_size=32)
    train_mode(model, bn_frozen=True)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and model.fc.training
    before = norms[0].running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(norms[0].running_mean, before)
    train_mode(model)
    assert all(m.training for m in norms)


def test_the_run_says_how_it_fine_tunes(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    cfg = resolved("--model", "timm/tf_efficientnet_lite0", "--pretrained", weights)
    line = describe_finetune(cfg, normalization(cfg, 3))
    assert line == (f"fine-tuning from {weights}: the new head alone for 1 epoch, then the whole network (backbone "
                    f"at 0.1x the rate); adamw lr 0.001, cosine, batch 32; head init zero; BatchNorm statistics "
                    f"update; pictures normalised by mean (0.5, 0.5, 0.5) std (0.5, 0.5, 0.5) (timm pretrained_cfg "
                    f"of tf_efficientnet_lite0.in1k); evaluated with the shorter side resized (bicubic) to "
                    f"floor(side / crop_pct) then the centre side (crop_pct 0.875)")


@pytest.mark.slow
@pytest.mark.skipif(not LITE0.is_file(), reason="../shared/data is absent (ImageNet weights)")
def test_a_fine_tuning_run_records_the_contract_in_its_checkpoint(tmp_path, capsys):
    from conftest import write_class_folder

    from imgclf.checkpoint import load_checkpoint

    write_class_folder(tmp_path / "d" / "train", ["a", "b"], 4, size=40, seed=1)
    write_class_folder(tmp_path / "d" / "val", ["a", "b"], 2, size=40, seed=2)
    assert main(["train", "--data", str(tmp_path / "d"), "--model", "timm/tf_efficientnet_lite0", "--pretrained",
                 str(LITE0), "--img-size", "32", "--epochs", "1", "--device", "cpu", "--precision", "fp32",
                 "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "replaced the 1000-class head by a 2-class one" in err and "fine-tuning from" in err
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert (tuple(ckpt["input"]["mean"]), tuple(ckpt["input"]["std"])) == ((0.5,) * 3, (0.5,) * 3)
