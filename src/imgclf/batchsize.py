"""`--batch-size auto`: the largest training batch that fits in the GPU's memory, found by trying steps.

Untested on a GPU so far: the search is tested with a fake memory probe (tests/test_stable.py).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
from collections.abc import Callable

import torch
from torch import nn

from imgclf.config import MAX_BATCH, TrainConfig, scaled_lr
from imgclf.errors import UserError

# Share of the largest batch that fitted which a run uses: the run holds more than a probe step does (an EMA
# copy, the evaluation batch, the data set when it is kept on the GPU, the allocator's fragmentation).
HEADROOM = 0.9


def largest_batch(fits: Callable[[int], bool], *, limit: int) -> int:
    """The largest n in 1..`limit` for which `fits(n)`, taking `fits` to be true up to some n and false
    beyond: doubling from 1, then halving the interval; 0 when even 1 does not fit."""
    low, n = 0, 1
    while n <= limit and fits(n):
        low, n = n, n * 2
    high = min(n, limit + 1)  # the first size known not to fit, or one beyond the limit
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def kept_batch(largest: int) -> int:
    """HEADROOM of `largest`, rounded down to a multiple of 8 from 16 on (tensor cores' tile), at least 1."""
    n = int(largest * HEADROOM)
    return max(1, n - n % 8 if n >= 16 else n)


def resolve_auto_batch(cfg: TrainConfig, *, pictures: int, world: int, device: torch.device,
                       build: Callable[[], nn.Module] | None = None, shape: tuple[int, int, int] | None = None,
                       autocast=None, probe: Callable[[int], bool] | None = None) -> TrainConfig:
    """`cfg` with --batch-size auto replaced by a number, and its learning rate scaled to it (config.scaled_lr);
    `cfg` itself when the batch size is a number. The number: `kept_batch` of the largest per-process batch
    (or all of each process's share of the `pictures` when they fit) whose training step (forward, backward, optimizer
    step of a fresh network from `build` on inputs of `shape`) fits in `device`'s memory, times --accumulate
    (each micro-batch must fit) and the `world` size. `probe(n)` says whether n pictures fit, instead of
    trying (tests). On anything but a CUDA device, one UserError line: there is no memory to fill."""
    if cfg.data.batch_size != "auto":
        return cfg
    if device.type != "cuda" and probe is None:
        raise UserError(f"--batch-size auto fills a GPU's memory, and this run is on {device.type}; give a number "
                        f"(the default recipe's is 128)")
    limit = max(1, min(MAX_BATCH // (world * cfg.optim.accumulate), pictures // world))
    probe = probe or _step_fits(build(), cfg, shape=shape, device=device, autocast=autocast)
    largest = largest_batch(probe, limit=limit)
    if largest == 0:
        raise UserError(f"--batch-size auto: not even one picture's training step fits in {device}'s free memory")
    kept = largest if largest == limit else kept_batch(largest)  # headroom only where memory was the limit
    batch = kept * cfg.optim.accumulate * world
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch),
                               optim=scaled_lr(cfg.optim, batch))


def _step_fits(model: nn.Module, cfg: TrainConfig, *, shape, device: torch.device, autocast) -> Callable[[int], bool]:
    """probe(n): whether a training step on n pictures of `shape` fits on `device`; it trains a copy of
    `model` (on `device`), with the run's optimizer, whose state then stays allocated as in the run."""
    from imgclf.models import training_loss
    from imgclf.optim import build_optimizer

    fmt = torch.channels_last if cfg.run.channels_last else torch.preserve_format
    model = copy.deepcopy(model).to(device, memory_format=fmt).train()
    optimizer = build_optimizer(model, cfg.optim)
    loss_fn = nn.CrossEntropyLoss()

    def fits(n: int) -> bool:
        try:
            x = torch.zeros((n, *shape), device=device).contiguous(memory_format=fmt)
            y = torch.zeros(n, dtype=torch.long, device=device)
            with autocast():
                _, loss = training_loss(model(x), y, loss_fn)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            x = y = loss = None  # noqa: F841 (freed before the next, larger try)
            gc.collect()
            torch.cuda.empty_cache()

    return fits
