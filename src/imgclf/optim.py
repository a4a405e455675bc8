"""Loss, optimizers and learning-rate schedules (notes 22-23)."""

from __future__ import annotations

import math

import torch
from torch import nn

from imgclf.config import OptimConfig


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str, start: float = 0.0,
              end: float = 0.0) -> float:
    """Multiplier of the base learning rate at `step` (0-based). Pure, so it can be tested and plotted.

    Warm-up rises linearly from `start` (at step -1) to 1 (at its last step): from 1/warmup with the default
    start of 0. Then `constant` stays at 1, `cosine` follows half a cosine from 1 to `end` at the last step,
    `onecycle` falls linearly from 1 to `end`. The defaults' arithmetic is exact: 0 + 1 * x is x.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return start + (1.0 - start) * (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps + 1) / span)
    if schedule == "cosine":
        return end + (1.0 - end) * (0.5 * (1.0 + math.cos(math.pi * progress)))
    if schedule == "onecycle":
        return end + (1.0 - end) * (1.0 - progress)
    raise ValueError(f"unknown schedule {schedule!r}")


def param_groups(model: nn.Module, weight_decay: float, *, decay_biases: bool = False) -> list[dict]:
    """Weight decay on weights of convolutions and linear layers only, not on biases or norm layers; with
    `decay_biases` on every parameter (the second group is then empty: the same two groups either way)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if decayed(p, decay_biases) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def decayed(p: nn.Parameter, decay_biases: bool) -> bool:
    """Whether weight decay acts on `p`: weights (two or more dimensions), and with `decay_biases` all."""
    return decay_biases or p.ndim > 1


def staged_groups(model: nn.Module, head: list[nn.Parameter], cfg: OptimConfig, backbone_lr_scale: float) -> list[dict]:
    """Staged fine-tuning: every parameter in the optimizer from the start (frozen ones have no gradient, so
    no step moves them), the backbone's at `backbone_lr_scale` times the learning rate."""
    head_ids = {id(p) for p in head}
    groups = []
    for params, scale in (([p for p in model.parameters() if id(p) in head_ids], 1.0),
                          ([p for p in model.parameters() if id(p) not in head_ids], backbone_lr_scale)):
        for decay in (True, False):
            chosen = [p for p in params if decayed(p, cfg.decay_biases) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": cfg.lr * scale,
                               "weight_decay": cfg.weight_decay if decay else 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum when asked), Adam or AdamW over `groups` (default: `param_groups`).

    On a GPU the fused implementations step every parameter in a few kernels: with ~30 small tensors the
    per-tensor launches were the largest cost of a fastnet step (H200: 6.67 -> 4.92 ms, benchmarks/RESULTS.md).
    On the CPU the default (foreach) implementation is kept: it is what every CPU figure was measured with."""
    groups = groups or param_groups(model, cfg.weight_decay, decay_biases=cfg.decay_biases)
    fused = {"fused": True} if all(p.is_cuda for p in model.parameters()) else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               **fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, **fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, **fused)


AUTO_CLIP = 10.0  # --clip-grad's default for networks without BatchNorm (config.OptimConfig.clip_grad says why)


def clip_norm(setting: float | None, model: nn.Module) -> float:
    """The gradient norm a step clips to (0: none): --clip-grad's `setting`, or by default AUTO_CLIP for a
    network without BatchNorm, whose diverging steps it stops, and 0 for one with it, whose healthy steps
    already reach that norm (measured: docs/usage.md, Stable training)."""
    if setting is not None:
        return setting
    has_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return 0.0 if has_norm else AUTO_CLIP


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps=total, warmup_steps=warmup, schedule=cfg.schedule,
                                          start=cfg.warmup_start, end=cfg.lr_end))


def balancing_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class weights N / (K * n_c): every class then counts as much in all as a balanced set's would."""
    counts = torch.bincount(labels, minlength=num_classes).double().clamp_min(1)
    return (len(labels) / (num_classes * counts)).float()


def ema_decay(decay: float, updates: int) -> float:
    """The decay of EMA update number `updates` + 1: warmed up as timm and the speed records do, so that a
    short run's average is not mostly its random initialisation: (1 + n) / (10 + n), at most `decay`."""
    return min(decay, (1 + updates) / (10 + updates))


def ema_update(decay: float):
    """AveragedModel's multi_avg_fn for an exponential moving average with `ema_decay`'s warm-up."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        d = ema_decay(decay, int(num_averaged))
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return update


def lookahead_decay(step: int, total_steps: int) -> float:
    """How much of its average the Lookahead keeps at `step` (1-based count of steps done): 0 at the start
    (no averaging while the weights move fast), rising as (step/total)^3 to 0.95**5 (a 0.95-per-step EMA
    applied every 5 steps), and 1.0 at the end, where the weights become the average (airbench94)."""
    if step >= total_steps:
        return 1.0
    return 0.95**5 * (step / total_steps) ** 3


class Lookahead:
    """Lookahead weight averaging as in the CIFAR speed records: every `every` steps the average moves
    towards the weights by (1 - decay), then the weights are reset to the average. BatchNorm statistics
    are averaged too. `state_dict` / `load_state_dict` make it resumable."""

    every = 5

    def __init__(self, model: nn.Module):
        # float32 averages whatever the weights' dtype (--bf16-weights): a bf16 average would lose the small steps
        self.average = {k: v.detach().to(torch.float32, copy=True) for k, v in model.state_dict().items()
                        if v.is_floating_point()}

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Call after optimizer step number `step` (1-based, counted over the whole run)."""
        if step % self.every and step < total_steps:
            return
        decay = lookahead_decay(step, total_steps)
        current = model.state_dict()
        averages = list(self.average.values())
        values = [current[name] for name in self.average]
        # two multi-tensor operations rather than two kernels a tensor (the same arithmetic)
        torch._foreach_lerp_(averages, [v.float() for v in values], 1.0 - decay)  # .float(): itself if float32
        torch._foreach_copy_(values, averages)

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.average.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.average[k].copy_(v)
