"""`imgclf lr-find`: the learning-rate range test (Smith 2015; fastai's `lr_find`), notes 23 and 26.

Train from the model's initial weights for a few steps while the learning rate grows exponentially from
`start_lr` to `end_lr`; record the loss, smoothed with an exponential moving average (bias-corrected); stop
once the smoothed loss exceeds four times its best, or becomes NaN. A good learning rate lies where the loss
falls fastest, before it turns upward. Nothing is saved but the plot: the model is thrown away after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imgclf.errors import UserError
from imgclf.models import training_loss


@dataclass
class RangeTest:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed
    raw: list[float] = field(default_factory=list)
    diverged: bool = False


def lr_at(step: int, *, start_lr: float, end_lr: float, num_steps: int) -> float:
    """Exponential sweep: start_lr at step 0, end_lr at step num_steps - 1."""
    return start_lr * (end_lr / start_lr) ** (step / max(1, num_steps - 1))


def range_test(model: torch.nn.Module, batches, *, optimizer: torch.optim.Optimizer, loss_fn, start_lr: float,
               end_lr: float, num_steps: int, autocast, beta: float = 0.98, diverge_factor: float = 4.0) -> RangeTest:
    """Run the sweep over `batches` (an iterator of (x, y, ...) that yields at least `num_steps` batches)."""
    out = RangeTest()
    model.train()
    average, best = 0.0, math.inf
    for step in range(num_steps):
        try:
            x, y, *_ = next(batches)
        except StopIteration:
            break
        lr = lr_at(step, start_lr=start_lr, end_lr=end_lr, num_steps=num_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast():
            _, loss = training_loss(model(x), y, loss_fn)  # auxiliary classifiers included
        value = loss.item()
        if not math.isfinite(value):
            out.diverged = True
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        average = beta * average + (1 - beta) * value
        smoothed = average / (1 - beta ** (step + 1))  # bias correction: early averages are not pulled to 0
        out.lrs.append(lr)
        out.raw.append(value)
        out.losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > diverge_factor * best:
            out.diverged = True
            break
    return out


def suggestions(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """Suggested learning rates from a sweep (named as in fastai; the valley is found our own way).

    valley: the middle (in log lr) of the stretch where the loss falls from near its start to its minimum;
    steep: where the loss falls fastest per unit of log(lr); minimum: a tenth of the lr at the lowest loss.
    The first tenth of the sweep (still warming the average) and the last few points (diverging) are ignored.
    """
    lo, hi = len(lrs) // 10, max(len(lrs) - 5, len(lrs) // 10 + 2)
    lrs, losses = lrs[lo:hi], losses[lo:hi]
    if len(lrs) < 3:
        raise UserError("the sweep stopped too early to suggest a learning rate; lower --start-lr or raise --steps")
    lowest = min(range(len(losses)), key=losses.__getitem__)
    # the valley: from the last point still within 10% of the whole drop from the start, down to the minimum
    drop = losses[0] - losses[lowest]
    top = max((i for i in range(lowest + 1) if losses[i] >= losses[lowest] + 0.9 * drop), default=0)
    valley = (top + lowest) // 2
    logs = [math.log(lr) for lr in lrs]
    slopes = [(losses[i + 1] - losses[i]) / (logs[i + 1] - logs[i]) for i in range(len(lrs) - 1)]
    steep = min(range(len(slopes)), key=slopes.__getitem__)
    return {"valley": lrs[valley], "steep": lrs[steep], "minimum": lrs[lowest] / 10}


def lr_find_figure(test: RangeTest, suggested: dict[str, float], *, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    ax.plot(test.lrs, test.raw, color="lightgray", linewidth=1, label="loss of each step")
    ax.plot(test.lrs, test.losses, color="tab:blue", linewidth=2, label="smoothed loss")
    markers = {"valley": ("tab:red", "o"), "steep": ("tab:green", "^"), "minimum": ("tab:purple", "s")}
    for name, lr in suggested.items():
        i = min(range(len(test.lrs)), key=lambda k: abs(math.log(test.lrs[k] / lr)))
        color, marker = markers[name]
        ax.plot([lr], [test.losses[i]], marker=marker, color=color, markersize=9, linestyle="none",
                label=f"{name}: {lr:.1e}")
    ax.set_xscale("log")
    first = test.losses[0] if test.losses else 1.0
    low = min(test.losses) if test.losses else 0.0
    span = max(first - low, 0.02 * abs(first), 1e-3)
    ax.set_ylim(low - 0.15 * span, first + 1.0 * span)  # the divergence spike goes off the top
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the whole test

def lr_find(cfg, *, start_lr: float, end_lr: float, steps: int, plot: Path) -> tuple[RangeTest, dict, Path]:
    """The range test for training configuration `cfg` (a TrainConfig): the same data, model, augmentation and
    batches as `imgclf train` with the same flags (imgclf.pipeline). Returns the sweep, the suggestions and
    the PNG written to `plot`."""
    from imgclf.optim import build_optimizer
    from imgclf.pipeline import build_run, run_decoding
    from imgclf.runtime import autocast_factory, resolve_device, resolve_precision
    from imgclf.sources import load_data
    from imgclf.tasks import make_task
    from imgclf.visualize import save_png

    if not 0 < start_lr < end_lr < math.inf:
        raise UserError(f"need 0 < --start-lr < --end-lr, got {start_lr} and {end_lr}")
    if steps < 10:
        raise UserError(f"--steps must be at least 10, got {steps}")
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    parts = build_run(cfg, load_data(cfg.data, decoding=run_decoding(cfg)), device=device)
    if len(parts.train) == 0:
        raise UserError(f"the training split of {cfg.data.data} is too small for a batch")

    def batches():
        epoch = 0
        while True:
            yield from parts.train.epoch(epoch)
            epoch += 1

    test = range_test(parts.model, batches(), optimizer=build_optimizer(parts.model, cfg.optim),
                      loss_fn=make_task(parts.data.task, parts.data.classes, label_smoothing=cfg.optim.label_smoothing).loss,
                      start_lr=start_lr, end_lr=end_lr, num_steps=steps,
                      autocast=autocast_factory(device, resolve_precision(cfg.run.precision, device)))
    suggested = suggestions(test.lrs, test.losses)
    batch = min(cfg.data.batch_size, len(parts.data.train))
    title = (f"lr-find: {cfg.model.name} on {Path(cfg.data.data).name or cfg.data.data}, {cfg.optim.optimizer}, "
             f"batch {batch}")
    return test, suggested, save_png(lr_find_figure(test, suggested, title=title), Path(plot))


def lr_find_output(test: RangeTest, suggested: dict[str, float], plot: Path, *, start_lr: float,
                   end_lr: float) -> tuple[str, str]:
    """What `imgclf lr-find` prints: (standard output, standard error): the suggested learning rates and the
    plot; how far the sweep went."""
    where = (f"stopped at lr {test.lrs[-1]:.1e} after {len(test.lrs)} steps: the loss diverged" if test.diverged
             else f"{len(test.lrs)} steps up to lr {test.lrs[-1]:.1e}")
    return (f"suggested learning rate: {suggested['valley']:.1e} (valley)\n"
            f"  steepest descent at {suggested['steep']:.1e}; minimum loss / 10 at {suggested['minimum']:.1e}\n"
            f"plot: {plot}\n"), f"swept {start_lr:.0e} .. {end_lr:.0e}; {where}\n"
