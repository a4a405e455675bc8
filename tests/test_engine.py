"""imgclf.engine, unit by unit: TrainState saves and restores everything a run needs to continue bit for bit,
the hooks hear every step in order and can stop an epoch resumably, a non-finite loss stops training,
evaluation counts every sample once, and test-time augmentation keeps the logits' shape."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import assert_same
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from imgclf.cache import Split
from imgclf.config import OptimConfig
from imgclf.engine import Diverged, Hooks, TrainState, evaluate, train_one_epoch, tta_logits
from imgclf.loader import BatchLoader
from imgclf.metrics import confusion_matrix
from imgclf.optim import Lookahead, build_optimizer, build_scheduler
from imgclf.tasks import SingleLabel
from imgclf.transforms import BatchTransform

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 3
CPU = torch.device("cpu")
NO_AUTOCAST = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731


def task(**training) -> SingleLabel:
    return SingleLabel([f"c{i}" for i in range(CLASSES)], **training)


def split(n: int = 24, seed: int = 0) -> Split:
    gen = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8), torch.arange(n) % CLASSES)


def train_loader(n: int = 24, batch_size: int = 6) -> BatchLoader:
    """4 steps an epoch; flips and shifts drawn from (seed, epoch, step)."""
    return BatchLoader(split(n), batch_size=batch_size, transform=BatchTransform((0.5,) * 3, (0.25,) * 3, "flip-crop",
                                                                                 pad=1),
                       train=True, device=CPU, seed=1)


def net(seed: int) -> nn.Module:
    """Small, with BatchNorm statistics and dropout (which draws from the global RNG)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Dropout(0.3), nn.Linear(16, CLASSES))


def make_state(seed: int, *, epochs: int = 3, steps: int = 4, ema: bool = True, lookahead: bool = True) -> TrainState:
    model = net(seed)
    cfg = OptimConfig(lr=0.05, epochs=epochs, warmup_epochs=1.0, schedule="cosine")
    optimizer = build_optimizer(model, cfg)
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True) if ema else None
    return TrainState(model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg, steps),
                      total_steps=epochs * steps, ema=average, lookahead=Lookahead(model) if lookahead else None)


def run_epoch(state: TrainState, epoch: int, loader: BatchLoader | None = None, **kwargs) -> dict:
    kwargs.setdefault("loss_fn", task(label_smoothing=0.1).loss)
    return train_one_epoch(state, loader or train_loader(), epoch=epoch, autocast=NO_AUTOCAST, **kwargs)


def through_a_file(state: dict) -> dict:
    """What a checkpoint holds after torch.save and a weights_only load: a copy sharing nothing."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------- TrainState



@pytest.mark.parametrize("averaging", ["lookahead", "ema"])
def test_state_dict_round_trip_restores_everything_and_continues_bit_for_bit(averaging):
    """Weights, optimizer, scheduler, RNG, and the Lookahead or EMA average: a copy restored from the state
    continues exactly as the original does."""
    a = make_state(0, ema=averaging == "ema", lookahead=averaging == "lookahead")
    run_epoch(a, 0)  # 4 steps: the averages have been updated (EMA at step 1, Lookahead at step 5 next)
    a.epoch, a.metrics = 1, {"epoch": 1, "val_acc": 0.5}
    saved = through_a_file(a.state_dict())
    for key in ("state_dict", "optimizer", "scheduler", "rng", "lookahead" if averaging == "lookahead"
                else "ema_state_dict"):
        assert key in saved, key

    torch.manual_seed(999)  # the RNG moves on elsewhere; the checkpoint's is what counts
    b = make_state(1, ema=averaging == "ema", lookahead=averaging == "lookahead")  # other weights, fresh state
    assert not torch.equal(b.model[0].weight, a.model[0].weight)
    b.load_state_dict(saved)
    assert_same(through_a_file(b.state_dict()), saved)  # symmetric: what was saved is what is restored

    torch.set_rng_state(saved["rng"]["torch"])  # `a` continues with the RNG it had when saved
    stats_a = run_epoch(a, 1)
    b.load_state_dict(saved)
    stats_b = run_epoch(b, 1)
    assert (stats_a["loss"], stats_a["acc"]) == (stats_b["loss"], stats_b["acc"])
    assert_same(b.model.state_dict(), a.model.state_dict(), "weights")
    if averaging == "ema":
        assert_same(b.ema.module.state_dict(), a.ema.module.state_dict(), "ema")
    else:
        assert_same(b.lookahead.state_dict(), a.lookahead.state_dict(), "lookahead")
    assert_same(b.optimizer.state_dict(), a.optimizer.state_dict(), "optimizer")
    assert b.scheduler.state_dict() == a.scheduler.state_dict()


@pytest.mark.parametrize("left_out", ["rng", "lookahead", "ema_state_dict", "optimizer"])
def test_each_part_of_the_state_matters_for_continuing(left_out):
    """The round trip above is not equal by accident: restoring all but one part gives other weights."""
    a = make_state(0)
    run_epoch(a, 0)
    saved = through_a_file(a.state_dict())
    torch.set_rng_state(saved["rng"]["torch"])
    run_epoch(a, 1)
    b = make_state(1)
    partial = dict(saved)
    if left_out == "rng":
        partial["rng"] = {"torch": torch.manual_seed(7).get_state(), "cuda": None}
    elif left_out == "optimizer":  # a fresh optimizer's: no momentum yet
        partial["optimizer"] = make_state(1).optimizer.state_dict()
    else:
        del partial[left_out]
    b.load_state_dict(partial)
    if left_out != "rng":
        torch.set_rng_state(saved["rng"]["torch"])
    run_epoch(b, 1)
    compared = b.ema.module if left_out == "ema_state_dict" else b.model
    reference = a.ema.module if left_out == "ema_state_dict" else a.model
    assert any(not torch.equal(v, reference.state_dict()[k]) for k, v in compared.state_dict().items())


def test_eval_model_is_the_average_when_there_is_one():
    with_ema, without = make_state(0), make_state(0, ema=False)
    assert with_ema.eval_model is with_ema.ema.module
    assert without.eval_model is without.model and without.net is without.model


# ---------------------------------------------------------------- hooks, stopping, divergence


class Recorder(Hooks):
    def __init__(self, stop_after_step: int | None = None):
        self.losses: list[tuple[int, float]] = []
        self.asked = 0
        self.stop_after_step = stop_after_step

    def on_loss(self, step: int, loss: float) -> None:
        self.losses.append((step, loss))

    def should_stop(self) -> bool:
        self.asked += 1  # asked once after every step
        return self.stop_after_step is not None and self.asked == self.stop_after_step + 1


@pytest.mark.parametrize("check_every", [1, 3, 32])
def test_on_loss_hears_every_step_in_order(check_every):
    hooks = Recorder()
    stats = run_epoch(make_state(0), 0, hooks=hooks, check_every=check_every)
    assert [step for step, _ in hooks.losses] == [0, 1, 2, 3] and hooks.asked == 4
    assert stats["stopped_at"] is None and stats["images"] == 24
    # the epoch's loss is the mean of the steps' losses (equal batches)
    assert stats["loss"] == pytest.approx(sum(loss for _, loss in hooks.losses) / 4, rel=1e-12)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_should_stop_after_step_k_and_the_partial_sums_resume_to_the_same_epoch(k):
    full = make_state(0)
    torch.manual_seed(5)
    whole = run_epoch(full, 0, hooks=(heard := Recorder()))

    stopped = make_state(0)
    torch.manual_seed(5)
    first = run_epoch(stopped, 0, hooks=(early := Recorder(stop_after_step=k)))
    assert first["stopped_at"] == k + 1
    assert [step for step, _ in early.losses] == list(range(k + 1))
    assert first["images"] == 6 * (k + 1)
    stopped.step, stopped.partial = first["stopped_at"], first["sums"]  # as train.py saves a stopped epoch
    rest = run_epoch(stopped, 0, hooks=(late := Recorder()))
    assert [step for step, _ in late.losses] == list(range(k + 1, 4))
    assert early.losses + late.losses == heard.losses
    assert (rest["loss"], rest["acc"], rest["sums"]) == (whole["loss"], whole["acc"], whole["sums"])
    assert rest["images"] == 24 - 6 * (k + 1) and rest["stopped_at"] is None
    assert_same(stopped.model.state_dict(), full.model.state_dict(), "weights")


@pytest.mark.parametrize("check_every", [1, 4])
def test_a_nan_loss_raises_diverged_naming_its_step(check_every):
    real = task().loss
    calls = []

    def poisoned(logits, y):
        calls.append(1)
        return real(logits, y) * (float("nan") if len(calls) == 3 else 1.0)  # the third step: step 2

    hooks = Recorder()
    with pytest.raises(Diverged, match=r"loss became nan at epoch 2, step 3") as raised:
        run_epoch(make_state(0), 1, hooks=hooks, loss_fn=poisoned, check_every=check_every)
    assert (raised.value.epoch, raised.value.step) == (1, 2)
    assert [step for step, _ in hooks.losses] == [0, 1]  # the good steps before it were still reported


def test_an_infinite_loss_raises_diverged_too():
    with pytest.raises(Diverged, match=r"loss became -?inf at epoch 1, step 1"):
        run_epoch(make_state(0), 0, loss_fn=lambda logits, y: logits.sum() * float("inf"))


# ---------------------------------------------------------------- evaluate and TTA


def eval_loader(data: Split, *, rank: int = 0, world: int = 1) -> BatchLoader:
    return BatchLoader(data, batch_size=5, transform=BatchTransform((0.5,) * 3, (0.25,) * 3), train=False,
                       device=CPU, rank=rank, world=world)


def test_evaluate_counts_every_sample_once():
    data = split(23, seed=4)  # 5 batches of 5, the last one of 3
    model = net(2).eval()
    result = evaluate(model, eval_loader(data), task=task(), autocast=NO_AUTOCAST, keep_probs=True)
    assert result["count"] == 23 and int(result["confusion"].sum()) == 23
    assert result["confusion"].sum(1).tolist() == data.labels.bincount(minlength=CLASSES).tolist()
    with torch.no_grad():
        logits = model(BatchTransform((0.5,) * 3, (0.25,) * 3)(data.images, train=False))
    assert torch.equal(result["confusion"], confusion_matrix(logits.argmax(1), data.labels, CLASSES))
    assert result["acc"] == pytest.approx(float((logits.argmax(1) == data.labels).double().mean()))
    assert result["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, data.labels)), rel=1e-5)
    assert result["probs"].shape == (23, CLASSES)
    torch.testing.assert_close(result["probs"], logits.softmax(1))
    # two processes' shares cover every sample exactly once: their counts add up to the whole
    shares = [evaluate(model, eval_loader(data, rank=r, world=2), task=task(), autocast=NO_AUTOCAST)
              for r in (0, 1)]
    assert [s["count"] for s in shares] == [12, 11]
    assert torch.equal(shares[0]["confusion"] + shares[1]["confusion"], result["confusion"])


def test_evaluate_leaves_the_model_in_eval_mode_and_its_statistics_alone():
    model = net(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, eval_loader(split(10)), task=task(), autocast=NO_AUTOCAST)
    assert not model.training
    assert_same(model.state_dict(), before, "model")


@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (2, 3, 12, 20), (1, 1, 8, 8)])
def test_tta_logits_shape_and_dtype(shape):
    model = nn.Sequential(nn.Conv2d(shape[1], 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with torch.no_grad():
        logits = tta_logits(model, torch.randn(shape))
        assert logits.shape == (shape[0], 5) and logits.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert tta_logits(model, torch.randn(shape)).dtype == torch.float32
