"""The GPU race's levers behind `--recipe fast` (issue 26): each acts as it says, and leaves everything else as
it was when off. Correctness only, on the CPU; their speed is measured by benchmarks/gpu_levers.sh on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import write_class_folder
from torch import nn

from imgclf.cache import Split
from imgclf.config import OptimConfig, RunConfig, TrainConfig
from imgclf.distributed import DistInfo
from imgclf.engine import TrainState, train_step
from imgclf.errors import UserError
from imgclf.loader import BatchLoader
from imgclf.models import FastNet, build_model
from imgclf.models.own import GlobalMaxPool
from imgclf.optim import Lookahead, build_optimizer, lr_factor, param_groups
from imgclf.pipeline import refuse_unsupported, set_stage, whitening_bias
from imgclf.runtime import cast_weights, weights_dtype
from imgclf.transforms import BatchTransform

pytestmark = pytest.mark.usefixtures("one_thread")
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _split(n: int, size: int = 32) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % 10)


# ---------------------------------------------------------------- (b) --drop-last

@pytest.mark.parametrize(("n", "batch"), [(50, 16), (48, 16), (1000, 128)])
def test_drop_last_gives_floor_n_over_b_full_steps(n, batch):
    common = dict(batch_size=batch, transform=BatchTransform(MEAN, STD, "flip-crop"), train=True,
                  device=torch.device("cpu"))
    dropped, kept = BatchLoader(_split(n), drop_last=True, **common), BatchLoader(_split(n), **common)
    assert len(dropped) == n // batch and len(kept) == -(-n // batch)
    sizes = [len(y) for _, y, _ in dropped.epoch(3)]
    assert sizes == [batch] * (n // batch)
    # the full batches are the same pictures, augmented the same, as without the option
    for (xa, ya, _), (xb, yb, _) in zip(dropped.epoch(3), kept.epoch(3), strict=False):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_drop_last_without_a_full_batch_is_refused_in_one_line():
    cfg = TrainConfig.from_dict({"data": {"batch_size": 64, "drop_last": True}})
    with pytest.raises(UserError, match="^--drop-last: the 50 training pictures make no full batch of 64; "):
        refuse_unsupported(cfg, 50, DistInfo())
    refuse_unsupported(cfg, 64, DistInfo())


# ---------------------------------------------------------------- (c) the final max-pool

def test_global_max_pool_gives_the_adaptive_pools_outputs_and_gradients():
    x = torch.randn(8, 16, 3, 3).to(memory_format=torch.channels_last)
    reference = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = GlobalMaxPool()(a), reference(b)
    assert out_a.shape == (8, 16) and torch.equal(out_a, out_b)
    g = torch.randn(8, 16)
    out_a.backward(g)
    out_b.backward(g)
    assert torch.equal(a.grad, b.grad) and a.grad.is_contiguous(memory_format=torch.channels_last)
    assert GlobalMaxPool()(torch.randn(2, 4, 7, 5)).shape == (2, 4)  # any map size (progressive resizing)


def test_fastnet_state_dict_keys_are_unchanged_by_the_pool():
    """Checkpoints of fastnet written before the pool became GlobalMaxPool load as they did."""
    keys = set(FastNet().state_dict())
    assert "head.weight" in keys and not any(k.startswith("blocks.4") or k.startswith("blocks.5") for k in keys)


# ---------------------------------------------------------------- (d) the schedule, weight decay, whitening bias

def test_lr_factor_defaults_are_bit_for_bit_the_old_formula():
    for schedule in ("onecycle", "cosine", "constant"):
        for step in range(40):
            old = (step + 1) / 7 if step < 7 else None
            new = lr_factor(step, total_steps=40, warmup_steps=7, schedule=schedule)
            if old is not None:
                assert new == old
    assert lr_factor(39, total_steps=40, warmup_steps=7, schedule="onecycle") == 0.0
    assert lr_factor(20, total_steps=40, warmup_steps=7, schedule="onecycle") == 1.0 - 14 / 33


def test_warmup_start_and_lr_end_as_the_speed_records():
    f = [lr_factor(s, total_steps=100, warmup_steps=10, schedule="onecycle", start=0.2, end=0.07)
         for s in range(100)]
    assert f[0] == pytest.approx(0.2 + 0.8 / 10) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10], strict=False))
    assert f[-1] == pytest.approx(0.07) and min(f) == pytest.approx(0.07)
    assert lr_factor(99, total_steps=100, warmup_steps=10, schedule="cosine", end=0.07) == pytest.approx(0.07)


def test_decay_biases_puts_every_parameter_in_the_decayed_group():
    model = FastNet()
    default = param_groups(model, 1e-3)
    assert default[1]["params"] and all(p.ndim == 1 for p in default[1]["params"])
    groups = param_groups(model, 1e-3, decay_biases=True)
    assert [g["weight_decay"] for g in groups] == [1e-3, 0.0] and groups[1]["params"] == []
    assert len(groups[0]["params"]) == len(default[0]["params"]) + len(default[1]["params"])
    opt = build_optimizer(model, OptimConfig(decay_biases=True))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(groups[0]["params"])


def test_whitening_bias_trains_in_its_first_epochs_only():
    model = FastNet()
    cfg = TrainConfig.from_dict({"model": {"name": "fastnet", "whiten_bias_epochs": 3}})
    bias = whitening_bias(model, 3, "fastnet")
    assert bias is model.whiten.bias and not bias.requires_grad  # frozen unless asked
    bias.requires_grad_(True)  # as build_run does, before the optimizer is built
    assert any(p is bias for g in build_optimizer(model, cfg.optim).param_groups for p in g["params"])
    states = []
    for epoch in range(5):
        set_stage(model, [], cfg, epoch)
        states.append(bias.requires_grad)
    assert states == [True, True, True, False, False]
    assert not model.whiten.weight.requires_grad
    with pytest.raises(UserError, match="^--whiten-bias-epochs is for fastnet networks .+; tutorial_cnn has none$"):
        whitening_bias(build_model("tutorial_cnn", num_classes=10), 3, "tutorial_cnn")
    assert whitening_bias(build_model("tutorial_cnn", num_classes=10), 0, "tutorial_cnn") is None


# ---------------------------------------------------------------- (a) --bf16-weights

def test_bf16_weights_need_bf16_arithmetic():
    assert weights_dtype(False, torch.float32) == torch.float32
    assert weights_dtype(True, torch.bfloat16) == torch.bfloat16
    for precision in (torch.float32, torch.float16):
        with pytest.raises(UserError, match=r"^--bf16-weights needs bf16 arithmetic, but this run computes in "):
            weights_dtype(True, precision)


def test_bf16_weights_and_ema_are_refused_together():
    cfg = TrainConfig(run=RunConfig(bf16_weights=True, ema=True))
    with pytest.raises(UserError, match="^--ema with --bf16-weights is not supported"):
        refuse_unsupported(cfg, 100, DistInfo())


def test_cast_weights_keeps_batchnorm_in_float32():
    model = cast_weights(FastNet(), torch.bfloat16)
    for name, t in model.state_dict().items():
        in_norm = isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.BatchNorm2d)
        expected = torch.int64 if name.endswith("num_batches_tracked") else (
            torch.float32 if in_norm else torch.bfloat16)
        assert t.dtype == expected, name
    same = FastNet()
    assert cast_weights(same, torch.float32) is same and next(same.parameters()).dtype == torch.float32


def test_a_bf16_batch_is_the_float32_batch_rounded_once():
    t, x = BatchTransform(MEAN, STD), _split(4).images
    assert torch.equal(t(x, train=False, dtype=torch.bfloat16), t(x, train=False).to(torch.bfloat16))


def test_a_bf16_weights_step_trains_without_autocast_and_lookahead_keeps_float32():
    import contextlib

    model = FastNet()
    model.init_whitening(torch.randn(16, 3, 32, 32))
    cast_weights(model, torch.bfloat16)
    before = copy.deepcopy(model.state_dict())
    opt = build_optimizer(model, OptimConfig(lr=0.1, momentum=0.85, weight_decay=1e-3))
    state = TrainState(model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                       total_steps=10, lookahead=Lookahead(model))
    x = torch.randn(8, 3, 32, 32).to(torch.bfloat16)
    loss, _ = train_step(state, x, torch.arange(8), loss_fn=nn.CrossEntropyLoss(), autocast=contextlib.nullcontext)
    state.after_update(5)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(v.dtype == torch.float32 for v in state.lookahead.average.values())
    assert all(opt.state[p]["momentum_buffer"].dtype == p.dtype for p in model.parameters() if p.grad is not None)
    assert next(model.parameters()).dtype == torch.bfloat16
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("blocks.1.0") for k in moved)


@pytest.mark.slow
def test_every_lever_trains_end_to_end_and_resumes_exactly(tmp_path):
    """One tiny fastnet run with all the levers on, and the same run stopped after its first epoch and resumed:
    the same figures; its checkpoint predicts in float32 from bf16 weights."""
    import json

    from imgclf.resolve import resolve
    from imgclf.train import resumed_config, train

    classes = [f"c{i}" for i in range(4)]
    write_class_folder(tmp_path / "d" / "train", classes, 11, size=16, seed=1)
    write_class_folder(tmp_path / "d" / "test", classes, 4, size=16, seed=2)
    levers = {("data", "data"): str(tmp_path / "d"), ("data", "batch_size"): 8, ("data", "drop_last"): True,
              ("model", "whiten_bias_epochs"): 1, ("optim", "decay_biases"): True, ("optim", "epochs"): 2,
              ("optim", "warmup_start"): 0.2, ("optim", "lr_end"): 0.07, ("run", "bf16_weights"): True,
              ("run", "precision"): "bf16", ("run", "device"): "cpu"}
    whole = train(resolve({**levers, ("run", "out"): str(tmp_path / "a")}, recipe="records"))
    with pytest.raises(Exception, match="stopped by --stop-after 1"):
        train(resolve({**levers, ("run", "out"): str(tmp_path / "b"), ("run", "stop_after"): 1}, recipe="records"))
    resumed = train(resumed_config(tmp_path / "b"), resume=True)
    assert (whole["train_loss"], whole["val_acc"]) == (resumed["train_loss"], resumed["val_acc"])
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["scheduler"]["last_epoch"] == 2 * (44 // 8)  # --drop-last: five full steps an epoch, not six
    assert ckpt["state_dict"]["blocks.1.0.weight"].dtype == torch.bfloat16
    assert ckpt["state_dict"]["whiten.bias"].abs().sum() > 0  # trained in the first epoch (it starts at zero)
