"""The loop (notes 26-28): one training epoch and one evaluation. Returns numbers; writes no files."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn

from imgclf.distributed import DistInfo, all_reduce_sum
from imgclf.models import training_loss
from imgclf.optim import Lookahead
from imgclf.tasks import argmax_hits


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, step: int, value: float):
        # counted from 1, as the progress lines show them ("epoch 3/10  step 40/390")
        super().__init__(f"loss became {value} at epoch {epoch + 1}, step {step + 1}")
        self.epoch, self.step = epoch, step


class Hooks:
    """What the loop tells the run about each step; the defaults do nothing (override what you need)."""

    def on_loss(self, step: int, loss: float) -> None:
        """Step `step`'s loss, once it has been read from the device (in step order)."""

    def should_stop(self) -> bool:
        """Asked after every step: True ends the epoch there, resumably."""
        return False


@dataclass
class TrainState:
    """A run's moving parts and its progress, with symmetric `state_dict` / `load_state_dict`: what a
    checkpoint saves is exactly what resuming restores. `net` is `model` as trained (compiled, DDP-wrapped);
    `model` is the plain module whose weights are saved."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    scaler: torch.amp.GradScaler | None = None
    ema: nn.Module | None = None  # torch.optim.swa_utils.AveragedModel
    lookahead: Lookahead | None = None
    net: nn.Module | None = None
    epoch: int = 0  # epochs finished
    step: int = 0  # steps done of epoch `epoch` (a run stopped mid-epoch)
    best_score: float | None = None  # the best value of the monitored validation metric so far
    best_epoch: int = 0  # the epoch (counted from 1) that reached it
    waited: int = 0  # evaluations since the best one (--patience counts them; --val-every may skip epochs)
    metrics: dict = field(default_factory=dict)  # the last evaluated epoch's record (every epoch's by default)
    partial: list[float] | None = None  # (loss sum, correct, seen) of the first `step` steps of epoch `epoch`
    bn_frozen: bool = False  # --bn-stats frozen: every BatchNorm keeps its running statistics while training

    def __post_init__(self):
        self.net = self.net or self.model

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and kept: the average when there is one."""
        return self.ema.module if self.ema is not None else self.net

    def after_update(self, step: int) -> None:
        """Weight averaging after optimizer step number `step` (1-based, over the whole run)."""
        if self.ema is not None and step % 5 == 1:
            self.ema.update_parameters(self.model)
        if self.lookahead is not None:
            self.lookahead.after_step(self.model, step, self.total_steps)

    def end_epoch(self, record: dict, monitor: str, task) -> bool:
        """Record a finished epoch's metrics; True when its `monitor` figure is the best so far (`task` says
        which way is better). An epoch that was not evaluated (--val-every: no `monitor` in `record`) is never
        the best, counts no evaluation and leaves `metrics` (a multi-label run's thresholds) as they were."""
        self.epoch, self.step, self.partial = record["epoch"], 0, None
        if monitor not in record:
            return False
        better = task.improved(record[monitor], self.best_score, monitor)
        self.metrics, self.waited = record, 0 if better else self.waited + 1
        if better:
            self.best_score, self.best_epoch = record[monitor], record["epoch"]
        return better

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "step": self.step, "best_score": self.best_score,
                 "best_epoch": self.best_epoch, "waited": self.waited, "metrics": self.metrics,
                 "partial": self.partial, "state_dict": _cpu(self.model.state_dict()),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler else None,
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}
        if self.lookahead is not None:
            state["lookahead"] = self.lookahead.state_dict()
        if self.ema is not None:
            state["ema_state_dict"] = _cpu(self.ema.module.state_dict())
            state["ema_count"] = int(self.ema.n_averaged)  # how many averages were taken: the next one depends on it
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        # a checkpoint of before --val-every was evaluated after every epoch
        self.waited = state.get("waited", self.epoch - self.best_epoch)
        self.metrics, self.partial = state.get("metrics") or {}, state.get("partial")
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema_state_dict"):
            self.ema.module.load_state_dict(state["ema_state_dict"])
            self.ema.n_averaged.fill_(state.get("ema_count", 1))
        if self.lookahead is not None and state.get("lookahead"):
            self.lookahead.load_state_dict(state["lookahead"])
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])


def train_mode(model: nn.Module, *, bn_frozen: bool = False) -> None:
    """model.train(), except BatchNorm layers whose parameters are all frozen (or every BatchNorm layer, with
    `bn_frozen`): they keep their running statistics and normalise by them (eval mode), so a frozen backbone
    stays exactly as it was trained (note 24); their scale and shift still train where not frozen."""
    model.train()
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                bn_frozen or (params and not any(p.requires_grad for p in params))):
            module.eval()


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}


def train_one_epoch(state: TrainState, loader, *, epoch: int, loss_fn, autocast: Callable[[], AbstractContextManager],
                    hooks: Hooks | None = None, dist: DistInfo | None = None, check_every: int = 1,
                    hits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = argmax_hits,
                    clip_grad: float | None = None, accumulate: int = 1) -> dict:
    """Train `state.net` over `loader.epoch(epoch)`, from `state.step` when the epoch was begun before; each
    step as `train_step` makes it (`clip_grad`, `accumulate`).

    Stops early (returning `stopped_at`) as soon as `hooks.should_stop()` is true after a step. Losses are
    read every `check_every` steps (1 on a CPU; more on a GPU, so that the host does not wait for the device
    at every step) and at the end; a non-finite one raises Diverged. Loss and accuracy (`loss_fn`, `hits`: the
    task's) are over the global batch, summed across the processes of `dist`; with `state.partial` (the sums of a
    stopped epoch's first steps) the figures cover all of the epoch, exactly as if it had not stopped."""
    hooks, dist = hooks or Hooks(), dist or DistInfo()
    model = state.net
    train_mode(model, bn_frozen=state.bn_frozen)
    world, device, steps = getattr(loader, "world", 1), _device(model), len(loader)
    carry = state.partial if state.step else None
    base = carry if carry and dist.is_main else [0.0, 0.0, 0.0]  # counted once
    loss_sum, seen = float(base[0]), int(base[2])
    correct = torch.tensor(int(base[1]), device=device)
    pending: list[tuple[int, torch.Tensor, int]] = []  # (step, loss on the device, pictures) not yet read
    start, stopped_at = time.perf_counter(), None
    for step, (x, y, n_global) in enumerate(loader.epoch(epoch, start_step=state.step), start=state.step):
        # mean over the global batch, also when each process holds a share of it
        loss, right = train_step(state, x, y, loss_fn=loss_fn, autocast=autocast, scale=y.shape[0] * world / n_global,
                                 hits=hits, clip_grad=clip_grad, accumulate=accumulate)
        state.scheduler.step()
        state.after_update(epoch * steps + step + 1)
        pending.append((step, loss * (n_global / (y.shape[0] * world)), y.shape[0]))
        correct += right
        seen += y.shape[0]
        stop = hooks.should_stop()
        if stop or len(pending) >= check_every:
            loss_sum += _read_losses(pending, epoch, hooks.on_loss)
        if stop:
            stopped_at = step + 1
            break
    loss_sum += _read_losses(pending, epoch, hooks.on_loss)
    totals = all_reduce_sum(torch.tensor([loss_sum, float(correct), float(seen)], dtype=torch.float64,
                                         device=device), dist).tolist()
    return {"loss": totals[0] / max(totals[2], 1), "acc": totals[1] / max(totals[2], 1),
            "images": int(totals[2]) - int(carry[2] if carry else 0), "sums": totals,
            "seconds": time.perf_counter() - start, "stopped_at": stopped_at}


def train_step(state: TrainState, x: torch.Tensor, y: torch.Tensor, *, loss_fn,
               autocast: Callable[[], AbstractContextManager], scale: float = 1.0,
               hits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = argmax_hits,
               clip_grad: float | None = None, accumulate: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of `state` on the batch (x, y); returns (its loss times `scale`, its correct
    predictions by `hits`), both on the device, without waiting for it.

    The batch is cut into `accumulate` micro-batches whose gradients add up before the step, each loss
    weighted by its share of the batch's mean (`loss_shares`): without BatchNorm the step is the whole
    batch's, to float rounding. A BatchNorm normalises each micro-batch by its own statistics, and its
    running averages move per micro-batch at a momentum that makes them move per step as without it.
    `clip_grad`: the gradients' global norm is scaled down to at most this before the step (None or 0: not);
    a norm below it leaves them bit for bit (they are multiplied by exactly 1)."""
    model, optimizer, scaler = state.net, state.optimizer, state.scaler
    parts = [(xc, yc) for xc, yc in zip(x.tensor_split(accumulate), y.tensor_split(accumulate), strict=True)
             if len(yc)]
    shares = loss_shares(loss_fn, y, [yc for _, yc in parts])
    optimizer.zero_grad(set_to_none=True)
    total, correct = None, None
    with _micro_batch_momentum(model, len(parts)):
        for i, ((xc, yc), share) in enumerate(zip(parts, shares, strict=True)):
            with _sync_on_last(model, i + 1 == len(parts)), autocast():
                logits, loss = training_loss(model(xc), yc, loss_fn)  # auxiliary classifiers' losses included
                loss = loss * (share * scale)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            right = hits(logits, yc)
            total = loss.detach() if total is None else total + loss.detach()
            correct = right if correct is None else correct + right
    if clip_grad:
        if scaler is not None:
            scaler.unscale_(optimizer)  # the norm of the true gradients
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return total, correct


def loss_shares(loss_fn, y: torch.Tensor, parts: list[torch.Tensor]) -> list:
    """How much each micro-batch's mean loss weighs in the whole batch's mean: its share of the pictures, or
    under class weights (a `weight` on the loss, hard labels) its share of the batch's total weight, the
    divisor of a weighted cross-entropy's mean. Soft labels (mixup) are averaged over pictures either way."""
    if len(parts) == 1:
        return [1.0]
    weight = getattr(loss_fn, "weight", None)
    if weight is None:  # a task's loss method (imgclf.tasks): its class weights
        weight = getattr(getattr(loss_fn, "__self__", None), "class_weights", None)
    if weight is None or y.ndim > 1:
        return [len(p) / len(y) for p in parts]
    total = weight[y].sum()
    return [weight[p].sum() / total for p in parts]


@contextlib.contextmanager
def _micro_batch_momentum(model: nn.Module, parts: int):
    """BatchNorm momentum m as 1 - (1 - m)**(1/parts) while a batch is cut into `parts` micro-batches: the
    running statistics then keep as much of their past per step as without accumulation."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.training and m.momentum is not None] if parts > 1 else []
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 1 - (1 - m.momentum) ** (1 / parts)
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum


def _sync_on_last(model: nn.Module, last: bool) -> AbstractContextManager:
    """DistributedDataParallel averages gradients across processes on the last micro-batch's backward only."""
    return contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


def _read_losses(pending: list, epoch: int, on_step: Callable[[int, float], None]) -> float:
    """Read the pending losses in one transfer, report them in order, raise Diverged at the first
    non-finite one; empty `pending` and return the sum of loss x pictures."""
    if not pending:
        return 0.0
    values = torch.stack([loss for _, loss, _ in pending]).tolist()
    total = 0.0
    for (step, _, n), value in zip(pending, values, strict=True):
        if not math.isfinite(value):
            raise Diverged(epoch, step, value)
        on_step(step, value)
        total += value * n
    pending.clear()
    return total


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def evaluate(model: nn.Module, loader, *, task, autocast: Callable[[], AbstractContextManager],
             dist: DistInfo | None = None, tta: bool = False, tta_shift: bool = True, keep_probs: bool = False) -> dict:
    """`task`'s figures (a `tasks.Task`; for SingleLabel: plain cross-entropy loss, accuracy, top-5 over five
    classes, confusion matrix) of `model` over every sample of `loader` once, summed across processes; with
    `keep_probs` also every picture's activation ("probs") in order. With `tta`, logits are `tta_logits`'
    (`tta_shift`: with the shifted views)."""
    model.eval()

    def logits(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            return tta_logits(model, x, shift=tta_shift) if tta else model(x).float()

    return evaluate_outputs(logits, ((x, y) for x, y, _ in loader.epoch(0)), task=task, device=_device(model),
                            dist=dist, keep=keep_probs)


def evaluate_outputs(outputs: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, *, task, device,
                     dist: DistInfo | None = None, keep: bool = False, probabilities: bool = False) -> dict:
    """The one evaluation loop (training's epochs, `imgclf eval` of checkpoints and exports, the report, tune):
    `outputs(x)` of every (x, targets) batch into `task.tally(device)`, the result summed across the processes
    of `dist`, with "seconds". `probabilities`: `outputs` gives the task's activation (an exported graph), not logits."""
    start = time.perf_counter()
    tally = task.tally(device, keep=keep)
    for x, y in batches:
        tally.add(outputs(x), y, probabilities=probabilities)
    return {**tally.result(dist or DistInfo()), "seconds": time.perf_counter() - start}


def tta_logits(model: nn.Module, x: torch.Tensor, *, shift: bool = True) -> torch.Tensor:
    """Test-time augmentation of the CIFAR speed records (airbench's level 2): half the average over the
    picture and its mirror image, half the same average over the picture shifted one pixel up-left and
    one pixel down-right (reflected borders). Six forward passes; float32 logits. Without `shift` (level 1),
    the average over the picture and its mirror image: two passes."""
    def mirrored(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (model(v).float() + model(v.flip(3)).float())

    if not shift:
        return mirrored(x)

    h, w = x.shape[2:]
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = 0.5 * (mirrored(padded[:, :, :h, :w]) + mirrored(padded[:, :, 2:, 2:]))
    return 0.5 * mirrored(x) + 0.5 * shifted
