"""Training that does not diverge by default (issue 22, points 2-3): gradient accumulation is the big batch's
step, clipping bounds the gradient norm, the learning rate follows the batch size (timm's lr-base rule),
--batch-size auto finds the largest batch that fits (with a fake memory probe: no GPU here), the notes'
network on 48 pictures stays finite, and every option given either acts or is refused in one line."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import run_cli, write_class_folder
from torch import nn

from imgclf.batchsize import kept_batch, largest_batch, resolve_auto_batch
from imgclf.config import TrainConfig, config_fields, idle_options
from imgclf.engine import TrainState, loss_shares, train_step
from imgclf.errors import UserError
from imgclf.resolve import resolve

pytestmark = pytest.mark.usefixtures("one_thread")

NO_AUTOCAST = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
CLASSES = 3


def plain_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, CLASSES))


def state_of(model: nn.Module, lr: float = 0.1) -> TrainState:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return TrainState(model=model, optimizer=optimizer, total_steps=10,
                      scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))


def batches(steps: int = 3, n: int = 12, *, soft: bool = False):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(n, 3, 8, 8, generator=gen)
        y = torch.randint(0, CLASSES, (n,), generator=gen)
        yield x, (nn.functional.one_hot(y, CLASSES).float() * 0.7 + 0.1 if soft else y)


def trained(accumulate: int, loss_fn, *, soft: bool = False, net=plain_net) -> nn.Module:
    state = state_of(net())
    for x, y in batches(soft=soft):
        train_step(state, x, y, loss_fn=loss_fn, autocast=NO_AUTOCAST, accumulate=accumulate)
    return state.model


# ---------------------------------------------------------------- accumulation

@pytest.mark.parametrize("accumulate", [2, 3, 5])
@pytest.mark.parametrize("case", ["smoothing", "class weights", "soft labels"])
def test_accumulation_is_the_big_batchs_step_to_float_rounding(accumulate, case):
    """12 pictures a step in 2, 3 or 5 micro-batches (5: unequal sizes): the weights after three steps of
    momentum SGD are those of the whole batch's steps, with label smoothing, class weights (whose mean
    divides by the batch's total weight) or soft labels (mixup's)."""
    weights = torch.tensor([1.0, 3.0, 0.5]) if case == "class weights" else None
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=0.1)
    whole = trained(1, loss_fn, soft=case == "soft labels")
    split = trained(accumulate, loss_fn, soft=case == "soft labels")
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_accumulation_with_the_tasks_class_weighted_loss():
    """The loss as training passes it (a task's method, --balance loss's class weights inside)."""
    from imgclf.tasks import SingleLabel

    task = SingleLabel(["a", "b", "c"], label_smoothing=0.1, class_weights=torch.tensor([1.0, 3.0, 0.5]))
    whole, split = trained(1, task.loss), trained(3, task.loss)
    for a, b in zip(whole.parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_accumulate_one_is_the_plain_step_bit_for_bit():
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    a, b = trained(1, loss_fn), state_of(plain_net())
    for x, y in batches():  # the step as engine made it before --accumulate existed
        loss = loss_fn(b.model(x), y)
        b.optimizer.zero_grad()
        loss.backward()
        b.optimizer.step()
    for p, q in zip(a.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_loss_shares_of_micro_batches():
    y = torch.tensor([0, 0, 1, 2])
    parts = list(y.tensor_split(2))
    assert loss_shares(nn.CrossEntropyLoss(), y, parts) == [0.5, 0.5]
    weighted = loss_shares(nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 4.0])), y, parts)
    assert [float(s) for s in weighted] == [2 / 8, 6 / 8]
    assert loss_shares(nn.CrossEntropyLoss(), y, [y]) == [1.0]


def test_batchnorm_statistics_move_per_step_as_without_accumulation():
    """Micro-batches of equal statistics: the running mean after one step equals the whole batch's, and the
    BatchNorm momentum is left as it was."""
    def bn_net():
        torch.manual_seed(0)
        return nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 64, CLASSES))

    x = torch.randn(4, 3, 8, 8).repeat(3, 1, 1, 1)  # three identical micro-batches of 4
    y = torch.tensor([0, 1, 2, 0]).repeat(3)
    results = []
    for accumulate in (1, 3):
        state = state_of(bn_net())
        train_step(state, x, y, loss_fn=nn.CrossEntropyLoss(), autocast=NO_AUTOCAST, accumulate=accumulate)
        results.append(state.model[0].running_mean.clone())
        assert state.model[0].momentum == 0.1
    torch.testing.assert_close(results[1], results[0])


# ---------------------------------------------------------------- clipping

@pytest.mark.parametrize("norm", [0.01, 0.5])
def test_clipping_bounds_the_gradient_norm(norm):
    state = state_of(plain_net(), lr=0.0)
    x, y = next(batches())
    loss_fn = nn.CrossEntropyLoss()
    train_step(state, x * 100, y, loss_fn=loss_fn, autocast=NO_AUTOCAST)
    unclipped = torch.cat([p.grad.flatten() for p in state.model.parameters()]).norm()
    assert unclipped > norm  # else the test would prove nothing
    train_step(state, x * 100, y, loss_fn=loss_fn, autocast=NO_AUTOCAST, clip_grad=norm, accumulate=2)
    clipped = torch.cat([p.grad.flatten() for p in state.model.parameters()]).norm()
    assert clipped <= norm * (1 + 1e-5)
    torch.testing.assert_close(clipped, torch.tensor(norm), rtol=1e-4, atol=0)


def test_a_norm_below_the_clip_leaves_the_step_bit_for_bit():
    """--clip-grad's default (10) is far above a healthy step's norm: such runs train exactly as unclipped."""
    loss_fn = nn.CrossEntropyLoss()
    plain, clipped = state_of(plain_net()), state_of(plain_net())
    for x, y in batches():
        train_step(plain, x, y, loss_fn=loss_fn, autocast=NO_AUTOCAST)
        train_step(clipped, x, y, loss_fn=loss_fn, autocast=NO_AUTOCAST, clip_grad=10.0)
    for p, q in zip(plain.model.parameters(), clipped.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_clipping_by_default_without_batchnorm_and_off_in_the_recipes_that_copy_others():
    from imgclf.models import build_model
    from imgclf.optim import clip_norm

    assert resolved().optim.clip_grad is None
    assert resolved(recipe="notes").optim.clip_grad == 0.0 == resolved(recipe="fast").optim.clip_grad
    plain, resnet = (build_model(name, num_classes=3, img_size=32) for name in ("tutorial_cnn", "resnet18"))
    assert (clip_norm(None, plain), clip_norm(None, resnet)) == (10.0, 0.0)
    assert (clip_norm(0.0, plain), clip_norm(2.5, resnet)) == (0.0, 2.5)


# ---------------------------------------------------------------- the learning rate follows the batch size

def resolved(**options) -> TrainConfig:
    recipe = options.pop("recipe", "default")
    keys = {f.name: section for section, f, _ in config_fields()}
    return resolve({(keys[k], k): v for k, v in options.items()}, recipe=recipe)


@pytest.mark.parametrize(("options", "lr", "base"), [
    ({}, 0.05, 128),  # the recipe's own batch: unchanged
    ({"batch_size": 16}, 0.05 * 16 / 128, 16),  # SGD: linear
    ({"batch_size": 512}, 0.2, 512),
    ({"batch_size": 32, "optimizer": "adamw"}, 0.05 * 0.5, 32),  # Adam family: square root
    ({"batch_size": 512, "optimizer": "adam"}, 0.1, 512),
    ({"batch_size": 16, "lr": 0.1}, 0.1, 16),  # both given: as given
    ({"lr": 0.1}, 0.1, 128),
    ({"lr": 0.1, "batch_size": "auto"}, 0.1, None),  # an lr given with auto: taken as it is
    ({"batch_size": 64, "lr": 0.1, "lr_base_batch": 256}, 0.025, 64),  # timm's --lr-base-size
    ({"recipe": "notes", "batch_size": 128}, 0.02, 128),  # the base batch is the recipe's
    ({"recipe": "records", "batch_size": 1024}, 1.5, 1024),  # what the records recipe's comment tells GPUs to use
    ({"batch_size": "auto"}, 0.05, 128),  # scaled once the batch is known
])
def test_lr_follows_the_batch_size_when_only_the_batch_is_given(options, lr, base):
    cfg = resolved(**options)
    assert math.isclose(cfg.optim.lr, lr, rel_tol=1e-12)
    assert cfg.optim.lr_base_batch == base


def test_a_resumed_configuration_keeps_its_learning_rate():
    cfg = resolved(batch_size=16)
    again = resolve({("data", "batch_size"): 16, ("run", "epochs"): 20}, base=cfg)
    assert again.optim.lr == cfg.optim.lr


# ---------------------------------------------------------------- --batch-size auto (fake memory probe)

def test_largest_batch_search():
    for cap in (1, 37, 64, 1000):
        tried: list[int] = []

        def fits(n, cap=cap, tried=tried):
            tried.append(n)
            return n <= cap

        assert largest_batch(fits, limit=500) == min(cap, 500)
        assert len(tried) <= 2 * math.log2(500) + 2
    assert largest_batch(lambda n: False, limit=100) == 0
    assert largest_batch(lambda n: True, limit=1) == 1


def test_kept_batch_leaves_headroom_on_a_multiple_of_eight():
    assert [kept_batch(n) for n in (1, 5, 17, 18, 300, 1000)] == [1, 4, 15, 16, 264, 896]


def test_auto_batch_size_with_a_fake_probe_scales_the_learning_rate():
    cfg = resolved(batch_size="auto")
    picked = resolve_auto_batch(cfg, pictures=5000, world=1, device=torch.device("cuda"), probe=lambda n: n <= 300)
    assert picked.data.batch_size == 264
    assert math.isclose(picked.optim.lr, 0.05 * 264 / 128) and picked.optim.lr_base_batch == 264
    accumulated = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, accumulate=2))
    two = resolve_auto_batch(accumulated, pictures=5000, world=2, device=torch.device("cuda"),
                             probe=lambda n: n <= 300)
    assert two.data.batch_size == 264 * 2 * 2  # each micro-batch of each process fits
    small = resolve_auto_batch(cfg, pictures=40, world=1, device=torch.device("cuda"), probe=lambda n: True)
    assert small.data.batch_size == 40  # never more than the pictures
    assert resolve_auto_batch(resolved(), pictures=10, world=1, device=torch.device("cpu")) == resolved()


def test_auto_batch_size_on_a_cpu_is_one_line():
    with pytest.raises(UserError, match="--batch-size auto fills a GPU's memory, and this run is on cpu"):
        resolve_auto_batch(resolved(batch_size="auto"), pictures=10, world=1, device=torch.device("cpu"))


def test_batch_size_auto_is_read_from_flags_and_files(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: auto\n")
    for extra in (["--batch-size", "auto"], ["--config", str(config)]):
        out = run_cli("train", "--data", str(tmp_path), *extra, "--print-config")
        assert out.returncode == 0, out.stderr
        assert "batch_size: auto" in out.stdout
    bad = run_cli("train", "--batch-size", "many", "--print-config")
    assert bad.returncode != 0 and "invalid int value: 'many'" in bad.stderr


# ---------------------------------------------------------------- no option silently ignored

FOLDER = "/some/folder"
IDLE = [  # (options, the flag refused): every combination where an option would do nothing
    ({"optimizer": "adam", "momentum": 0.5}, "--momentum"),
    ({"optimizer": "adamw", "momentum": 0.9}, "--momentum"),
    ({"optimizer": "adam", "nesterov": True}, "--nesterov"),
    ({"optimizer": "adamw", "nesterov": True}, "--nesterov"),
    ({"momentum": 0.0, "nesterov": True}, "--nesterov"),
    ({"mixup": 0.2, "mix_switch": 0.3}, "--mix-switch"),
    ({"cutmix": 1.0, "mix_switch": 0.3}, "--mix-switch"),
    ({"augment": "flip-crop", "store_size": 80}, "--store-size"),
    ({"data": FOLDER, "data_root": "elsewhere"}, "--data-root"),
    ({"data": "cifar10", "labels": "x.csv"}, "--labels"),
    ({"data": "cifar10", "val_fraction": 0.3}, "--val-fraction"),
    ({"folds": 5, "val_fraction": 0.3}, "--val-fraction"),
    ({"fold": 2}, "--fold"),
    ({"data": "mnist", "strict": True}, "--strict-data"),
    ({"data": "cifar10", "cache_dir": "c"}, "--cache-dir"),
    ({"freeze_backbone": True, "freeze_epochs": 2}, "--freeze-epochs"),
    ({"backbone_lr_scale": 0.1}, "--backbone-lr-scale"),
    ({"freeze_backbone": True, "freeze_epochs": 1, "backbone_lr_scale": 0.1}, "--freeze-epochs"),
    ({"epochs": 10, "patience": 9}, "--patience"),
    ({"epochs": 10, "patience": 1, "val_every": 0}, "--patience"),  # one evaluation: nothing to wait for
    ({"epochs": 10, "patience": 4, "val_every": 2}, "--patience"),  # evaluations 2, 4, 6, 8 before the last
    ({"batch_size": 4, "accumulate": 5}, "--accumulate"),
    ({"epochs": 3, "stop_after": 3}, "--stop-after"),
    ({"ema_decay": 0.9}, "--ema-decay"),
    ({"tta_shift": False}, "--tta-shift"),
    ({"mlflow_experiment": "mine"}, "--mlflow-experiment"),
    ({"normalize": "data"}, "--normalize"),
    ({"warmup_epochs": 0, "warmup_start": 0.2}, "--warmup-start"),
    ({"schedule": "constant", "lr_end": 0.07}, "--lr-end"),
    ({"weight_decay": 0, "decay_biases": True}, "--decay-biases"),
]
ACTING = [  # the same options where they act
    {"optimizer": "sgd", "momentum": 0.5, "nesterov": False},
    {"optimizer": "adam", "nesterov": False},  # no Nesterov momentum is what Adam has
    {"momentum": 0.0, "nesterov": False},
    {"mixup": 0.2, "cutmix": 1.0, "mix_switch": 0.3},
    {"augment": "photo", "store_size": 80, "data": FOLDER},
    {"data": "cifar10", "data_root": "elsewhere"},
    {"data": FOLDER, "labels": "x.csv", "val_fraction": 0.3, "strict": True, "cache_dir": "c"},
    {"freeze_epochs": 2, "backbone_lr_scale": 0.1},
    {"epochs": 10, "patience": 8, "stop_after": 9},
    {"epochs": 10, "patience": 3, "val_every": 2},
    {"batch_size": 4, "accumulate": 4},
    {"warmup_start": 0.2, "lr_end": 0.07, "decay_biases": True},
    {"ema": True, "ema_decay": 0.9},
    {"tta": True, "tta_shift": False},
    {"mlflow": "sqlite:///m.db", "mlflow_experiment": "mine"},
    {"pretrained": "w.pth", "normalize": "data"},
    {"folds": 5, "fold": 2},
]
# The augmentation options: switch their preset on or are refused by imgclf.augment.choose (tests/test_photo.py).
AUGMENTATION = {"--crop-pad", "--crop-scale", "--auto-augment", "--random-erasing"}
# Options that act whatever else is set (read in train, pipeline, sources, engine: each changes the run).
ALWAYS_ACT = {"--data", "--img-size", "--augment", "--mixup", "--folds", "--calibrate", "--channels",
              "--cutmix", "--progressive-resize", "--batch-size", "--balance", "--eval-batch-size", "--model",
              "--pretrained", "--freeze-backbone", "--model-args", "--optimizer", "--lr", "--weight-decay",
              "--schedule", "--warmup-epochs", "--label-smoothing", "--epochs", "--monitor", "--lookahead",
              "--lr-base-batch", "--clip-grad", "--head-init", "--bn-stats", "--out", "--device", "--seed", "--precision", "--channels-last",
              "--compile", "--log-every", "--ema", "--tta", "--val-every", "--mlflow", "--task",
              "--drop-last", "--whiten-bias-epochs", "--bf16-weights"}  # the last two: refused in one line where not


@pytest.mark.parametrize(("options", "flag"), IDLE, ids=[f"{f}:{','.join(o)}" for o, f in IDLE])
def test_an_option_that_would_do_nothing_is_refused_in_one_line(options, flag):
    options.setdefault("data", FOLDER)
    with pytest.raises(UserError, match=f"^{flag} would change nothing here: .+; drop it$"):
        resolved(**options)


@pytest.mark.parametrize("options", ACTING)
def test_the_same_options_where_they_act_are_taken(options):
    options.setdefault("data", FOLDER)
    resolved(**options)


def test_every_option_is_either_always_acting_or_has_its_rule():
    """The audit, kept honest: a new option must be listed here or given a rule in config.idle_options."""
    ruled = {flag for _, flag in IDLE}
    flags = {flag for _, _, flag in config_fields()}
    assert flags == ALWAYS_ACT | ruled | AUGMENTATION, (flags - ALWAYS_ACT - ruled - AUGMENTATION)
    assert not ALWAYS_ACT & ruled and not AUGMENTATION & (ALWAYS_ACT | ruled)


def test_defaults_in_a_configuration_file_are_not_refused():
    """A run's config.yaml lists every option; its values that are the recipe's change nothing, but neither
    does leaving them out: they pass. A value typed on the command line is refused however set."""
    given = {("optim", "optimizer"): "adam", ("optim", "momentum"): 0.9, ("optim", "nesterov"): True,
             ("run", "ema_decay"): 0.99, ("data", "data"): FOLDER}
    resolve(given, typed=frozenset({("optim", "optimizer")}))
    with pytest.raises(UserError, match="^--momentum"):
        resolve(given, typed=frozenset({("optim", "momentum")}))
    with pytest.raises(UserError, match="^--momentum"):
        resolve({**given, ("optim", "momentum"): 0.5}, typed=frozenset())


def test_idle_options_of_the_default_run():
    assert set(idle_options(resolved(data=FOLDER))) == {"--backbone-lr-scale", "--ema-decay", "--mix-switch", "--tta-shift",
                                                         "--mlflow-experiment", "--data-root", "--normalize"}


def test_the_cli_refuses_in_one_line(tmp_path):
    out = run_cli("train", "--data", str(tmp_path), "--optimizer", "adam", "--momentum", "0.5", "--print-config")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == ["imgclf: error: --momentum would change nothing here: --optimizer "
                                               "adam has no momentum term (its betas are fixed); drop it"]


# ---------------------------------------------------------------- the notes' network on 48 pictures

@pytest.mark.slow
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("batch", [["--batch-size", "16"], []])
def test_tutorial_cnn_on_48_pictures_stays_finite_for_30_epochs(tmp_path, size, batch):
    """The default recipe, the notes' network (no BatchNorm), 48 pictures: at batch 16 it diverged (loss
    8e5 by epoch 7) before the learning rate followed the batch size."""
    data = write_class_folder(tmp_path / "data", ["a", "b", "c"], 16, size=size)
    out = run_cli("train", "--data", data, "--img-size", size, *batch, "--epochs", 30, "--device", "cpu",
                  "--precision", "fp32", "--out", tmp_path / "run", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "done: validation accuracy" in out.stdout + out.stderr
    losses = [json.loads(line)["val_loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
