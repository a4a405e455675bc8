"""The loop (notes 26-28): one training epoch and one evaluation. Returns numbers; writes no files."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from imgclf.distributed import DistInfo, all_reduce_sum
from imgclf.metrics import accuracy, confusion_matrix


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, step: int, value: float):
        # counted from 1, as the progress lines show them ("epoch 3/10  step 40/390")
        super().__init__(f"loss became {value} at epoch {epoch + 1}, step {step + 1}")
        self.epoch, self.step = epoch, step


def train_one_epoch(model: nn.Module, loader, *, epoch: int, optimizer, scheduler, loss_fn,
                    autocast: Callable[[], AbstractContextManager], scaler=None, start_step: int = 0,
                    should_stop: Callable[[], bool] = lambda: False, dist: DistInfo | None = None,
                    after_update: Callable[[int], None] = lambda step: None,
                    on_step: Callable[[int, float], None] = lambda step, loss: None,
                    carry: list[float] | None = None, check_every: int = 1) -> dict:
    """Train over `loader.epoch(epoch)` from `start_step`. Stops early (returning `stopped_at`) as soon as
    `should_stop()` is true after a step. `after_update(step)` runs right after each optimizer step;
    `on_step(step, loss)` gets each step's loss once it has been read from the device.
    Losses are read every `check_every` steps (1 on a CPU; more on a GPU, so that the host does not wait
    for the device at every step) and at the end; a non-finite one raises Diverged.
    Loss and accuracy are over the whole global batch, summed across the processes of `dist`.
    `carry` is the `sums` (loss sum, correct, seen) an earlier, stopped call returned for the steps before
    `start_step`: the epoch's figures then cover all of it, exactly as if it had not stopped."""
    model.train()
    world = getattr(loader, "world", 1)
    device = _device(model)
    base = carry if carry and (dist is None or dist.is_main) else [0.0, 0.0, 0.0]  # counted once
    loss_sum, seen = float(base[0]), int(base[2])
    correct = torch.tensor(int(base[1]), device=device)
    pending: list[tuple[int, torch.Tensor, int]] = []  # (step, loss on the device, pictures) not yet read
    start = time.perf_counter()
    stopped_at = None
    for step, (x, y, n_global) in enumerate(loader.epoch(epoch, start_step=start_step), start=start_step):
        with autocast():
            logits = model(x)
            # mean over the global batch, also when each process holds a share of it
            loss = loss_fn(logits.float(), y) * (y.shape[0] * world / n_global)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        after_update(step)
        pending.append((step, loss.detach() * (n_global / (y.shape[0] * world)), y.shape[0]))
        correct += (logits.argmax(1) == y).sum()
        seen += y.shape[0]
        stop = should_stop()
        if stop or len(pending) >= check_every:
            loss_sum += _read_losses(pending, epoch, on_step)
        if stop:
            stopped_at = step + 1
            break
    loss_sum += _read_losses(pending, epoch, on_step)
    totals = all_reduce_sum(torch.tensor([loss_sum, float(correct), float(seen)], dtype=torch.float64,
                                         device=device), dist or DistInfo()).tolist()
    return {"loss": totals[0] / max(totals[2], 1), "acc": totals[1] / max(totals[2], 1),
            "images": int(totals[2]) - int(carry[2] if carry else 0), "sums": totals,
            "seconds": time.perf_counter() - start, "stopped_at": stopped_at}


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
def evaluate(model: nn.Module, loader, *, num_classes: int, autocast: Callable[[], AbstractContextManager],
             dist: DistInfo | None = None, tta: bool = False, keep_probs: bool = False) -> dict:
    """Loss (plain cross-entropy), accuracy and confusion matrix over every sample once, summed across
    processes. With `tta`, logits are those of `tta_logits`."""
    model.eval()
    dist = dist or DistInfo()
    start = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=_device(model))
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=_device(model))
    probs = []
    for x, y, _ in loader.epoch(0):
        with autocast():
            logits = tta_logits(model, x) if tta else model(x).float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        confusion += confusion_matrix(logits.argmax(1), y, num_classes)
        if keep_probs:
            probs.append(logits.softmax(1).cpu())
    all_reduce_sum(loss_sum, dist)
    all_reduce_sum(confusion, dist)
    count = int(confusion.sum())
    out = {"loss": float(loss_sum) / max(count, 1), "acc": accuracy(confusion.cpu()), "count": count,
           "confusion": confusion.cpu(), "seconds": time.perf_counter() - start}
    if keep_probs:
        out["probs"] = torch.cat(probs) if probs else torch.zeros(0, num_classes)
    return out


def tta_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation of the CIFAR speed records (airbench's level 2): half the average over the
    picture and its mirror image, half the same average over the picture shifted one pixel up-left and
    one pixel down-right (reflected borders). Six forward passes; float32 logits."""
    def mirrored(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (model(v).float() + model(v.flip(3)).float())

    h, w = x.shape[2:]
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = 0.5 * (mirrored(padded[:, :, :h, :w]) + mirrored(padded[:, :, 2:, 2:]))
    return 0.5 * mirrored(x) + 0.5 * shifted
