"""imgclf.optim, unit by unit: the learning-rate factor of each schedule at known steps, the weight-decay
groups, the optimizer and scheduler built from a configuration, and Lookahead's averaging and state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from imgclf.config import OptimConfig
from imgclf.models import FastNet
from imgclf.optim import (
    Lookahead,
    build_optimizer,
    build_scheduler,
    lookahead_decay,
    lr_factor,
    param_groups,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process trainings: one intra-op thread (conftest)

# ---------------------------------------------------------------- lr_factor


def factor(step: int, schedule: str, *, total: int = 100, warmup: int = 10) -> float:
    return lr_factor(step, total_steps=total, warmup_steps=warmup, schedule=schedule)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_warm_up_rises_linearly_to_one_whatever_the_schedule(schedule):
    assert [factor(s, schedule) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factor(0, schedule) == pytest.approx(0.1)  # the first step already trains
    assert factor(9, schedule) == 1.0  # the warm-up's last step is at the peak


def test_each_schedule_at_known_steps_after_warm_up():
    # 90 steps after a 10-step warm-up: step s is (s - 9) / 90 of the way through them
    assert [factor(s, "constant") for s in (10, 54, 99, 150)] == [1.0, 1.0, 1.0, 1.0]
    assert factor(10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 90)))
    assert factor(54, "cosine") == pytest.approx(0.5)
    assert factor(99, "cosine") == pytest.approx(0.0, abs=1e-12)  # the last step ends at 0
    assert factor(10, "onecycle") == pytest.approx(1 - 1 / 90)
    assert factor(54, "onecycle") == pytest.approx(0.5)
    assert factor(99, "onecycle") == pytest.approx(0.0, abs=1e-12)
    for schedule in ("cosine", "onecycle"):  # past the end (a longer resumed run): stays at 0, never negative
        assert factor(150, schedule) == pytest.approx(0.0, abs=1e-12)
        values = [factor(s, schedule) for s in range(9, 100)]
        assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # falls all the way


def test_no_warm_up_and_edge_lengths():
    assert factor(0, "constant", warmup=0) == 1.0
    assert factor(0, "onecycle", warmup=0) == pytest.approx(0.99)  # 1 of 100 steps done
    assert factor(0, "cosine", total=1, warmup=0) == pytest.approx(0.0, abs=1e-12)  # a one-step run
    assert factor(0, "onecycle", total=5, warmup=5) == pytest.approx(0.2)  # all warm-up: no division by zero
    assert factor(5, "onecycle", total=5, warmup=5) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        factor(50, "step")


# ---------------------------------------------------------------- optimizer, scheduler, loss


def test_param_groups_put_biases_and_norms_in_the_no_decay_group():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2), nn.LayerNorm(2))
    model(torch.zeros(1, 3, 5, 5))
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model.append(frozen)
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(decay["params"]) == ids([model[0].weight, model[3].weight])
    assert ids(no_decay["params"]) == ids([model[0].bias, model[1].weight, model[1].bias, model[3].bias,
                                           model[4].weight, model[4].bias])  # frozen ones in neither


def test_param_groups_of_fastnet_leave_out_its_frozen_layers():
    model = FastNet(num_classes=3, img_size=16)
    decay, no_decay = param_groups(model, 5e-4)
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each once
    assert id(model.whiten.weight) not in grouped  # frozen whitening
    assert id(model.head.weight) in {id(p) for p in decay["params"]}


@pytest.mark.parametrize(("name", "kind"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                            ("adamw", torch.optim.AdamW)])
def test_build_optimizer_from_the_configuration(name, kind):
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, OptimConfig(optimizer=name, lr=0.3, weight_decay=0.02, momentum=0.8))
    assert type(opt) is kind
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.02, 0.0]
    if name == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.8 and opt.param_groups[0]["nesterov"]
    no_momentum = build_optimizer(model, OptimConfig(optimizer="sgd", momentum=0.0, nesterov=True))
    assert not no_momentum.param_groups[0]["nesterov"]  # torch refuses Nesterov without momentum


def scheduled_lrs(cfg: OptimConfig, steps_per_epoch: int) -> list[float]:
    """The learning rate of every step of a run, as the scheduler sets it."""
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_build_scheduler_follows_lr_factor():
    cfg = OptimConfig(lr=0.2, epochs=3, warmup_epochs=0.5, schedule="cosine")
    expected = [0.2 * lr_factor(s, total_steps=12, warmup_steps=2, schedule="cosine") for s in range(12)]
    assert scheduled_lrs(cfg, 4) == pytest.approx(expected)


def test_build_scheduler_clamps_a_warm_up_longer_than_the_run():
    """5 warm-up epochs in a 1-epoch run of 3 steps: warm up over 2 steps, so the last one still decays."""
    lrs = scheduled_lrs(OptimConfig(lr=0.1, epochs=1, warmup_epochs=5, schedule="onecycle"), 3)
    assert lrs == pytest.approx([0.05, 0.1, 0.0], abs=1e-12)


# ---------------------------------------------------------------- Lookahead


def test_lookahead_decay_endpoints():
    assert lookahead_decay(0, 100) == 0.0  # no averaging while the weights move fast
    assert lookahead_decay(99, 100) == pytest.approx(0.95**5 * 0.99**3)
    assert lookahead_decay(99, 100) < 0.95**5 < 1.0
    assert lookahead_decay(100, 100) == 1.0 and lookahead_decay(120, 100) == 1.0  # at the end: the average


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _train_steps(model: nn.Module, lookahead: Lookahead, steps: range, total: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)  # no state of its own
    gen = torch.Generator().manual_seed(steps.start)
    for step in steps:
        x = torch.randn(8, 3, generator=gen)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        lookahead.after_step(model, step, total)


def test_lookahead_averages_floating_state_including_norm_statistics():
    model = _bn_net()
    lookahead = Lookahead(model)
    assert set(lookahead.average) == {k for k, v in model.state_dict().items() if v.is_floating_point()}
    assert "1.running_mean" in lookahead.average and "1.num_batches_tracked" not in lookahead.average
    _train_steps(model, lookahead, range(1, 11), total=50)
    for key, avg in lookahead.average.items():  # step 10 was an averaging step: weights reset to the average
        assert torch.equal(model.state_dict()[key], avg), key


def test_lookahead_state_dict_round_trip_continues_identically():
    model = _bn_net()
    lookahead = Lookahead(model)
    _train_steps(model, lookahead, range(1, 8), total=30)  # stopped between two averaging steps
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = {k: v.clone() for k, v in lookahead.state_dict().items()}
    assert all(v.device.type == "cpu" for v in saved.values())
    assert not torch.equal(saved["0.weight"], saved_model["0.weight"])  # the average is not the weights

    other = _bn_net()
    other.load_state_dict(saved_model)
    restored = Lookahead(other)  # starts from other's weights
    restored.load_state_dict(saved)
    for key in saved:
        assert torch.equal(restored.average[key], saved[key]), key
    _train_steps(model, lookahead, range(8, 31), total=30)
    _train_steps(other, restored, range(8, 31), total=30)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    # and the run ends on the average
    assert all(torch.equal(model.state_dict()[k], v) for k, v in lookahead.average.items())


def test_ema_decay_warms_up_then_stays_at_its_setting():
    from imgclf.optim import ema_decay

    assert ema_decay(0.99, 0) == pytest.approx(0.1)  # the first update keeps a tenth of the initial weights
    assert ema_decay(0.99, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.99, 10_000) == 0.99


@pytest.mark.usefixtures("one_thread")
def test_a_short_runs_average_is_close_to_its_weights_not_to_the_initial_ones():
    """Issue 14.9: with a fixed 0.99 every 5 steps, 100 steps left ~82% of the random initialisation in the
    average; warmed up, the average follows the weights."""
    from torch.optim.swa_utils import AveragedModel

    from imgclf.optim import ema_update

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    initial = model.weight.detach().clone()
    ema = AveragedModel(model, multi_avg_fn=ema_update(0.99), use_buffers=True)
    for step in range(1, 101):  # the weights walk steadily away from their start
        with torch.no_grad():
            model.weight.add_(0.01)
        if step % 5 == 1:
            ema.update_parameters(model)
    final = model.weight.detach()
    gap_to_final = (ema.module.weight - final).abs().mean()
    gap_to_start = (ema.module.weight - initial).abs().mean()
    assert gap_to_final < 0.25 * gap_to_start
