"""imgclf.models, unit by unit: imgclf's own networks and two torchvision ones built for any classes and
channels, their heads replaced and frozen backbones, weights loaded around a mismatched head, fastnet's
whitening layer, and the network rebuilt from a checkpoint alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imgclf.checkpoint import build_checkpoint
from imgclf.errors import UserError
from imgclf.models import FastNet, build_model, load_weights, model_from_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

OWN = ["tutorial_cnn", "fastnet", "fastnet_small", "fastnet_wide"]
TORCHVISION = ["resnet18", "mobilenet_v3_small"]
MODELS = OWN + TORCHVISION
SIZE = 32
# The layer that classifies: what `num_classes` sizes and what --freeze-backbone leaves trainable.
HEADS = {"tutorial_cnn": "classifier.2", "fastnet": "head", "fastnet_small": "head", "fastnet_wide": "head",
         "resnet18": "fc", "mobilenet_v3_small": "classifier.3"}


def built(name: str, *, classes: int = 3, channels: int = 3, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, num_classes=classes, in_channels=channels, img_size=SIZE, **kwargs)


def head_of(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(HEADS[name])


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """Every floating tensor (BatchNorm statistics too) set to other values, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("running_var"):  # variances stay positive
                value.mul_(torch.empty(value.shape).uniform_(0.5, 2.0, generator=gen))
            elif value.is_floating_point():
                value.add_(0.05 * torch.randn(value.shape, generator=gen))
    return model


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", MODELS)
def test_logits_have_one_column_per_class_for_one_and_three_channels(name, channels):
    model = built(name, classes=7, channels=channels).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, channels, SIZE, SIZE))
    assert logits.shape == (2, 7) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", MODELS)
def test_the_head_is_sized_for_the_classes(name):
    model = built(name, classes=5)
    head = head_of(model, name)
    assert isinstance(head, nn.Linear) and head.out_features == 5
    # that head is the network's last Linear layer: nothing after it changes the number of outputs
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1] is head


@pytest.mark.parametrize("name", MODELS)
def test_freeze_backbone_leaves_only_the_head_trainable(name):
    model = built(name, freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {f"{HEADS[name]}.{n}" for n, _ in head_of(model, name).named_parameters()}
    assert trainable == head and head
    # and training does change the head, nothing else
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.eval()  # BatchNorm statistics stay as they are: only the parameters are under test
    nn.functional.cross_entropy(model(torch.randn(4, 3, SIZE, SIZE)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= head


@pytest.mark.parametrize("name", MODELS)
def test_load_weights_keeps_the_backbone_and_skips_a_mismatched_head(name, tmp_path):
    source = perturbed(built(name, classes=10, seed=1), seed=2)
    path = tmp_path / "weights.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)  # as saved from DDP
    model = built(name, classes=4, seed=3)
    own_head = {k: v.clone() for k, v in head_of(model, name).state_dict().items()}
    load_weights(model, str(path), skip_mismatched=True)
    head_keys = {f"{HEADS[name]}.{k}" for k in own_head}
    for key, value in model.state_dict().items():
        if key in head_keys:  # other classes: left as initialised
            assert torch.equal(value, own_head[key.removeprefix(HEADS[name] + ".")]), key
        elif source.state_dict()[key].shape == value.shape:
            assert torch.equal(value, source.state_dict()[key]), key
    with pytest.raises((RuntimeError, UserError)):  # without skipping, the mismatched head is an error
        load_weights(built(name, classes=4), str(path), skip_mismatched=False)


def test_load_weights_refuses_what_does_not_fit(tmp_path):
    torch.save({"step": 3, "note": "no tensors"}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="holds no state dict of tensors"):
        load_weights(built("tutorial_cnn"), str(tmp_path / "plain.pt"), skip_mismatched=True)
    torch.save(built("resnet18").state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(UserError, match="no weights that fit this model"):
        load_weights(built("tutorial_cnn"), str(tmp_path / "resnet.pt"), skip_mismatched=True)
    with pytest.raises(UserError, match="no such file"):
        load_weights(built("tutorial_cnn"), str(tmp_path / "missing.pt"), skip_mismatched=True)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["fastnet", "fastnet_small", "fastnet_wide"])
def test_init_whitening_gives_near_identity_covariance_of_patches(name, channels):
    model = built(name, channels=channels)
    assert isinstance(model, FastNet)
    dims = channels * 2 * 2  # values in a 2x2 patch
    gen = torch.Generator().manual_seed(0)
    base = nn.functional.avg_pool2d(torch.randn(64, channels, SIZE + 2, SIZE + 2, generator=gen), 3, stride=1)
    x = 4 * (base + 0.5 * base.mean(1, keepdim=True)) + 0.3  # neighbours and channels correlated, mean not 0

    def patch_covariance(images: torch.Tensor) -> torch.Tensor:
        patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, dims)
        return torch.cov(patches.T)

    with torch.no_grad():
        assert (patch_covariance(x) - torch.eye(dims)).abs().max() > 0.5  # far from white before
        model.init_whitening(x)
        out = model.whiten(x)  # (N, 2 * dims, SIZE - 1, SIZE - 1): each direction and its negative
    w = model.whiten.weight
    assert w.shape == (2 * dims, channels, 2, 2) and out.shape == (64, 2 * dims, SIZE - 1, SIZE - 1)
    assert torch.equal(w[dims:], -w[:dims]) and torch.equal(model.whiten.bias, torch.zeros(2 * dims))
    flat = out[:, :dims].permute(0, 2, 3, 1).reshape(-1, dims)  # one row per 2x2 patch
    torch.testing.assert_close(torch.cov(flat.T), torch.eye(dims), atol=0.05, rtol=0)
    assert not w.requires_grad and not model.whiten.bias.requires_grad


@pytest.mark.parametrize("name", MODELS)
def test_model_from_checkpoint_computes_what_was_saved(name):
    model = perturbed(built(name, classes=4, seed=5), seed=6).eval()
    ckpt = build_checkpoint(model_name=name, classes=["a", "b", "c", "d"], channels=3, size=SIZE,
                            mean=(0.5,) * 3, std=(0.25,) * 3, config={}, state={"state_dict": model.state_dict()})
    torch.manual_seed(123)  # the rebuilt network starts from other random weights
    rebuilt = model_from_checkpoint(ckpt)
    assert type(rebuilt) is type(model) and not rebuilt.training
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_model_from_checkpoint_prefers_the_averaged_weights():
    trained, averaged = (perturbed(built("tutorial_cnn", seed=s), seed=s) for s in (7, 8))
    ckpt = build_checkpoint(model_name="tutorial_cnn", classes=["a", "b", "c"], channels=3, size=SIZE,
                            mean=(0.5,) * 3, std=(0.25,) * 3, config={},
                            state={"state_dict": trained.state_dict(), "ema_state_dict": averaged.state_dict()})
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(ckpt)(x), averaged.eval()(x))
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("classifier")}
    ckpt["ema_state_dict"] = None
    with pytest.raises(UserError, match="checkpoint weights do not fit tutorial_cnn"):
        model_from_checkpoint(ckpt)
