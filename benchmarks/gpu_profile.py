"""Where a training step of `--recipe records` goes on a CUDA GPU (issue 15): measured, not guessed.

Builds the run exactly as `imgclf train --recipe records --batch-size 1024 --lr 1.5` does, then prints:
each epoch's milliseconds per step (the first includes cuDNN's autotuning), the loader alone, the
profiler's top kernels and host calls for a few steps of the real loop, and one fixed batch's step under
each lever (autocast over fp32 weights, weights kept in the training precision, fused optimizer steps).

    python benchmarks/gpu_profile.py CIFAR10_FOLDER            (needs a CUDA GPU; PYTHONPATH=src)
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from imgclf.distributed import DistInfo
from imgclf.engine import train_one_epoch
from imgclf.pipeline import build_run
from imgclf.resolve import resolve
from imgclf.runtime import autocast_factory, resolve_precision
from imgclf.sources import load_data
from imgclf.tasks import training_task
from imgclf.train import _train_state


def timed(fn, repeat: int = 1) -> float:
    """Seconds per call of `fn`, the device synchronised before and after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


class Steps:
    """The first `n` batches of one epoch of `loader`, as a loader."""

    def __init__(self, loader, n: int):
        self.loader, self.n, self.world = loader, n, 1

    def __len__(self) -> int:
        return self.n

    def epoch(self, epoch: int, start_step: int = 0):
        return itertools.islice(self.loader.epoch(epoch, start_step=start_step), self.n)


def main() -> None:
    root, out = sys.argv[1], tempfile.mkdtemp()
    given = {("data", "data"): root, ("data", "batch_size"): 1024, ("optim", "lr"): 1.5, ("optim", "epochs"): 10,
             ("run", "out"): out, ("run", "device"): "cuda"}
    cfg = resolve(given, recipe="records")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    data = load_data(cfg.data, progress=False)
    precision = resolve_precision(cfg.run.precision, device)
    parts = build_run(cfg, data, device=device)
    state = _train_state(cfg, parts, device=device, precision=precision, dist=DistInfo())
    loss_fn, autocast = training_task(cfg, data, device).loss, autocast_factory(device, precision)
    steps = len(parts.train)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, precision {precision}, {steps} steps/epoch")
    for epoch in range(3):
        s = timed(lambda e=epoch: train_one_epoch(state, parts.train, epoch=e, loss_fn=loss_fn, autocast=autocast,
                                                  check_every=32))
        print(f"epoch {epoch}: {s:.3f} s, {1000 * s / steps:.2f} ms/step")
    s = timed(lambda: [None for _ in parts.train.epoch(3)])
    print(f"loader alone: {1000 * s / steps:.2f} ms/step")

    from torch.profiler import ProfilerActivity, profile
    few = Steps(parts.train, 12)
    train_one_epoch(state, few, epoch=4, loss_fn=loss_fn, autocast=autocast, check_every=32)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_one_epoch(state, few, epoch=5, loss_fn=loss_fn, autocast=autocast, check_every=32)
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"profiled 12 steps: {kernels / 12:.0f} GPU kernels/memcpys a step")
    print(events.table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))

    x, y, _ = next(iter(parts.train.epoch(6)))
    levers(parts.model, x, y, cfg, precision)


def levers(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, precision: torch.dtype) -> None:
    """One fixed batch's optimizer step under each lever, ms per step (after warming up)."""
    def run(net, inputs, fused: bool, cast: bool, label: str) -> None:
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.85, nesterov=True, weight_decay=1e-4, fused=fused)
        ctx = autocast_factory(torch.device("cuda"), precision) if cast else contextlib.nullcontext

        def step():
            with ctx():
                loss = F.cross_entropy(net(inputs), y, label_smoothing=0.2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        timed(step, 10)
        print(f"  {label}: {1000 * timed(step, 40):.2f} ms/step")

    def fwd_bwd(net, inputs, cast: bool, label: str) -> None:
        ctx = autocast_factory(torch.device("cuda"), precision) if cast else contextlib.nullcontext

        def step():
            with ctx():
                loss = F.cross_entropy(net(inputs), y, label_smoothing=0.2)
            loss.backward()

        timed(step, 10)
        print(f"  {label}: {1000 * timed(step, 40):.2f} ms/step")

    print(f"levers, one batch of {len(x)} ({x.dtype}, channels_last={x.is_contiguous(memory_format=torch.channels_last)}):")
    run(copy.deepcopy(model), x, fused=False, cast=True, label="autocast over fp32 weights, foreach SGD (today)")
    run(copy.deepcopy(model), x, fused=True, cast=True, label="autocast over fp32 weights, fused SGD")
    low = copy.deepcopy(model).to(precision)
    for m in low.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.float()
    xl = x.to(precision)
    run(low, xl, fused=False, cast=False, label=f"{precision} weights, foreach SGD")
    run(copy.deepcopy(low), xl, fused=True, cast=False, label=f"{precision} weights, fused SGD")
    fwd_bwd(copy.deepcopy(model), x, cast=True, label="forward+backward only, autocast")
    fwd_bwd(copy.deepcopy(low), xl, cast=False, label=f"forward+backward only, {precision} weights")


if __name__ == "__main__":
    main()
