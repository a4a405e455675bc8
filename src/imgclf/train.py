"""`train(cfg)`: the composition root (notes 26-30), readable top to bottom."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from pathlib import Path

import torch

from imgclf import __version__, distributed
from imgclf.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    atomic_write_text,
    load_checkpoint,
    remove_temporaries,
    save_checkpoint,
)
from imgclf.config import TrainConfig
from imgclf.data import BatchLoader, ImageData, load_data
from imgclf.engine import Diverged, evaluate, train_one_epoch
from imgclf.errors import EXIT_DISTRIBUTED, EXIT_DIVERGED, EXIT_SIGINT, EXIT_SIGTERM, UserError
from imgclf.models import build_model
from imgclf.optim import Lookahead, build_loss, build_optimizer, build_scheduler
from imgclf.runtime import autocast_factory, resolve_device, resolve_precision
from imgclf.tracking import Tracker
from imgclf.transforms import BatchTransform


class Stopped(Exception):
    """Training stopped early but resumably (a signal or --stop-after). `code` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Train as `cfg` says, writing everything into `cfg.run.out`; return the last epoch's metrics."""
    dist = distributed.from_environment()
    device = resolve_device(cfg.run.device, dist)
    distributed.init(dist, device)
    try:
        record = _train(cfg, resume=resume, dist=dist, device=device)
        distributed.barrier(dist)  # leave together: tearing down a group that a peer still uses can abort it
        return record
    except RuntimeError as err:
        if not dist.enabled or not distributed.is_peer_failure(err):
            raise
        raise UserError(f"rank {dist.rank}: another process of the distributed job failed or stopped answering "
                        f"({str(err).splitlines()[0][:160]}); the whole job stops", EXIT_DISTRIBUTED) from None
    finally:
        distributed.close(dist)


def _train(cfg: TrainConfig, *, resume: bool, dist, device: torch.device) -> dict:
    run_dir = Path(cfg.run.out)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt") if resume else None
    if ckpt and ckpt["epoch"] >= cfg.optim.epochs:
        raise UserError(f"{run_dir} already finished {ckpt['epoch']}/{cfg.optim.epochs} epochs; "
                        f"pass a larger --epochs to train further, or start a new run with --out")
    torch.manual_seed(cfg.run.seed)
    data = _load_data_ranked(cfg, dist)
    if ckpt and ckpt["classes"] != data.classes:
        raise UserError(f"{run_dir} was trained on classes {ckpt['classes']}, but {cfg.data.data} has "
                        f"{data.classes}; start a new run with --out")
    precision = resolve_precision(cfg.run.precision, device)
    if device.type == "cuda":  # every batch has the same shape: let cuDNN time its algorithms once and keep the best
        torch.backends.cudnn.benchmark = True
    model = build_model(cfg.model.name, num_classes=len(data.classes), in_channels=data.channels,
                        img_size=data.img_size, pretrained=None if ckpt else cfg.model.pretrained,
                        freeze_backbone=cfg.model.freeze_backbone)
    pad = max(1, data.img_size // 8) if cfg.data.crop_pad is None else cfg.data.crop_pad
    if pad >= data.img_size:
        raise UserError(f"--crop-pad {pad} must be smaller than the picture side ({data.img_size})")
    transform = BatchTransform(data.mean, data.std, cfg.data.augment, pad=pad)
    loaders = _loaders(cfg, data, transform, device, dist)
    if hasattr(model, "init_whitening") and not ckpt:
        model.init_whitening(next(iter(loaders["whiten"].epoch(0)))[0].cpu())
    model.to(device, memory_format=torch.channels_last if cfg.run.channels_last else torch.preserve_format)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, len(loaders["train"]))
    scaler = torch.amp.GradScaler(device.type) if precision == torch.float16 else None
    ema = _ema(model, cfg) if cfg.run.ema else None
    lookahead = Lookahead(model) if cfg.optim.lookahead else None
    start_epoch, start_step, best_acc = 0, 0, 0.0
    if ckpt:
        start_epoch, start_step, best_acc = _restore(ckpt, model, optimizer, scheduler, scaler, ema, lookahead)
    net = _wrap(model, cfg, dist, device)
    autocast = autocast_factory(device, precision)
    tracker = Tracker(run_dir, enabled=dist.is_main, resume_epoch=start_epoch, steps_per_epoch=len(loaders["train"]),
                      log_every=cfg.run.log_every)
    if dist.is_main:
        _start_run_folder(cfg, data, model, loaders["train"], tracker, device=device, precision=precision,
                          world=dist.world_size, fresh=ckpt is None)
    loss_fn = build_loss(cfg.optim)
    stop = StopFlag(dist, device)
    state = dict(cfg=cfg, data=data, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                 ema=ema, lookahead=lookahead, run_dir=run_dir, dist=dist)
    steps, total_steps = len(loaders["train"]), cfg.optim.epochs * len(loaders["train"])
    check_every = 1 if device.type == "cpu" else 32  # reading a loss makes the host wait for the GPU
    record: dict = ckpt["metrics"] if ckpt else {}
    carry = ckpt.get("partial") if ckpt else None  # sums of the steps done before a mid-epoch stop
    epochs_this_run = 0
    with stop:
        for epoch in range(start_epoch, cfg.optim.epochs):
            tracker.start_epoch(epoch, cfg.optim.epochs, start_step=start_step)
            try:
                stats = train_one_epoch(
                    net, loaders["train"], epoch=epoch, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
                    autocast=autocast, scaler=scaler, start_step=start_step, should_stop=stop.check, dist=dist,
                    after_update=lambda step, done=epoch * steps: _after_update(done + step + 1, total_steps, model,
                                                                                ema, lookahead),
                    on_step=lambda step, loss: tracker.step(step, loss, optimizer.param_groups[0]["lr"]),
                    carry=carry, check_every=check_every)
            except Diverged as err:
                last = run_dir / "checkpoints" / "last.pt"
                kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written"
                raise UserError(f"training diverged: {err}; {kept}; try a lower --lr", EXIT_DIVERGED) from None
            if stats["stopped_at"] is not None:
                _save(state, epoch=epoch, step=stats["stopped_at"], metrics=record, best_acc=best_acc, best=False,
                      partial=stats["sums"])
                raise Stopped(f"stopped by {stop.name} at epoch {epoch + 1}, step {stats['stopped_at']}; resume with: "
                              f"imgclf train --resume {run_dir}", EXIT_SIGTERM if stop.name == "SIGTERM" else EXIT_SIGINT)
            start_step, carry = 0, None
            final = epoch + 1 == cfg.optim.epochs
            # test-time augmentation costs 6 passes: only the final figure (and `imgclf eval`) pays for it;
            # the final probabilities are kept for the run's pictures (one process holds them all)
            test = evaluate(ema.module if ema else net, loaders["test"], num_classes=len(data.classes), autocast=autocast,
                            dist=dist, tta=cfg.run.tta and final, keep_probs=final and not dist.enabled)
            record = epoch_record(epoch, stats, test, lr=optimizer.param_groups[0]["lr"], skipped=len(data.skipped))
            tracker.end_epoch(record)
            improved = test["acc"] > best_acc
            best_acc = max(best_acc, test["acc"])
            _save(state, epoch=epoch + 1, step=0, metrics=record, best_acc=best_acc, best=improved)
            epochs_this_run += 1
            if stop.requested or (cfg.run.stop_after and epochs_this_run >= cfg.run.stop_after
                                  and epoch + 1 < cfg.optim.epochs):
                why = stop.name or f"--stop-after {cfg.run.stop_after}"
                code = {"SIGTERM": EXIT_SIGTERM, "SIGINT": EXIT_SIGINT}.get(stop.name, 0)
                raise Stopped(f"stopped by {why} after epoch {epoch + 1}; resume with: imgclf train --resume "
                              f"{run_dir}", code)
    if dist.is_main:  # curves.png, confusion.png, mistakes.png and TensorBoard pictures; never fails the run
        from imgclf.report import report_after_training

        report_after_training(run_dir, cfg=cfg, data=data, model=ema.module if ema else model, transform=transform,
                              device=device, autocast=autocast, records=tracker.records, writer=tracker.writer,
                              result=test)
    tracker.close()
    return record


def epoch_record(epoch: int, stats: dict, test: dict, *, lr: float, skipped: int) -> dict:
    """One line of metrics.jsonl from `train_one_epoch`'s and `evaluate`'s results (epoch counted from 0)."""
    return {"epoch": epoch + 1, "train_loss": stats["loss"], "train_acc": stats["acc"],
            "test_loss": test["loss"], "test_acc": test["acc"], "test_count": test["count"], "lr": lr,
            "images_per_s": stats["images"] / max(stats["seconds"], 1e-9), "train_seconds": stats["seconds"],
            "epoch_seconds": stats["seconds"] + test["seconds"], "skipped_files": skipped, "time": time.time()}


def _start_run_folder(cfg: TrainConfig, data: ImageData, model, train_loader, tracker: Tracker, *, device,
                      precision, world: int, fresh: bool) -> None:
    """Main process: clear a killed run's half-written files, write config.json, say what runs where, and
    for a new run show its first batch and graph in TensorBoard."""
    run_dir = Path(cfg.run.out)
    remove_temporaries(run_dir)
    atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    tracker.message(f"imgclf {__version__}: {cfg.model.name} on {cfg.data.data} ({len(data.train)} train / "
                    f"{len(data.test)} {data.test_name} pictures, {len(data.classes)} classes, "
                    f"{data.channels}x{data.img_size}x{data.img_size}) on {device}, {str(precision)[6:]}, "
                    f"world size {world}; run folder {run_dir}")
    if fresh:
        first = next(iter(train_loader.epoch(0)))[0]
        tracker.batch_grid("train/batch", first, data.mean, data.std)
        tracker.graph(model, first)


def _load_data_ranked(cfg: TrainConfig, dist) -> ImageData:
    """Rank 0 decodes (and caches) first; the others then read its cache instead of decoding again."""
    if not dist.is_main:
        distributed.barrier(dist)
    data = load_data(cfg.data, progress=dist.is_main)
    if dist.is_main:
        distributed.barrier(dist)
    return data


def _loaders(cfg: TrainConfig, data: ImageData, transform, device, dist) -> dict[str, BatchLoader]:
    common = dict(transform=transform, device=device, seed=cfg.run.seed, rank=dist.rank, world=dist.world_size,
                  channels_last=cfg.run.channels_last)
    if cfg.data.batch_size < dist.world_size:
        raise UserError(f"--batch-size {cfg.data.batch_size} is smaller than the {dist.world_size} processes; "
                        f"it is the global batch size, split across them")
    return {"train": BatchLoader(data.train, batch_size=cfg.data.batch_size, train=True, **common),
            "test": BatchLoader(data.test, batch_size=cfg.data.eval_batch_size, train=False, **common),
            "whiten": BatchLoader(data.train, batch_size=5000, train=False, transform=transform, device=device)}


def _wrap(model, cfg: TrainConfig, dist, device):
    net = torch.compile(model) if cfg.run.compile else model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


def _ema(model, cfg: TrainConfig):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True)


def _after_update(step: int, total_steps: int, model, ema, lookahead) -> None:
    """Weight averaging after optimizer step number `step` (1-based, over the whole run)."""
    if ema is not None and step % 5 == 1:
        ema.update_parameters(model)
    if lookahead is not None:
        lookahead.after_step(model, step, total_steps)


def _restore(ckpt: dict, model, optimizer, scheduler, scaler, ema, lookahead) -> tuple[int, int, float]:
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema_state_dict"):
        ema.module.load_state_dict(ckpt["ema_state_dict"])
    if lookahead is not None and ckpt.get("lookahead"):
        lookahead.load_state_dict(ckpt["lookahead"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if torch.cuda.is_available() and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    return ckpt["epoch"], ckpt["step"], ckpt["best_acc"]


def _save(state: dict, *, epoch: int, step: int, metrics: dict, best_acc: float, best: bool,
          partial: list[float] | None = None) -> None:
    """Write last.pt (and best.pt when `best`) atomically, from the main process only."""
    if not state["dist"].is_main:
        return
    cfg, data, model = state["cfg"], state["data"], state["model"]
    ckpt = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "imgclf_version": __version__,
        "model": {"name": cfg.model.name, "num_classes": len(data.classes), "in_channels": data.channels,
                  "img_size": data.img_size},
        "classes": list(data.classes),
        "input": {"channels": data.channels, "size": data.img_size, "mean": list(data.mean), "std": list(data.std)},
        "epoch": epoch, "step": step, "best_acc": best_acc, "metrics": metrics, "config": cfg.to_dict(),
        "partial": partial,  # (loss sum, correct, seen) of the epoch's first `step` steps, when stopped mid-epoch
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": state["optimizer"].state_dict(), "scheduler": state["scheduler"].state_dict(),
        "scaler": state["scaler"].state_dict() if state["scaler"] else None,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
    }
    if state["lookahead"] is not None:
        ckpt["lookahead"] = state["lookahead"].state_dict()
    if state["ema"] is not None:
        ckpt["ema_state_dict"] = {k: v.detach().cpu() for k, v in state["ema"].module.state_dict().items()}
    folder = state["run_dir"] / "checkpoints"
    if best:  # best.pt first: killed between the two, the run resumes from the older last.pt and redoes both
        save_checkpoint(folder / "best.pt", ckpt)
    save_checkpoint(folder / "last.pt", ckpt)


class StopFlag:
    """SIGINT/SIGTERM set a flag that the loop reads after each step; a second Ctrl-C abandons at once.

    With several processes the flag is agreed on by all of them, so they stop at the same step.
    """

    def __init__(self, dist, device: torch.device):
        self.dist, self.device, self.name, self._old = dist, device, None, {}

    @property
    def requested(self) -> bool:
        return self.name is not None

    def check(self) -> bool:
        if not self.dist.enabled:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=self.device)
        distributed.all_reduce_sum(flag, self.dist)
        if flag.item() and not self.requested:
            self.name = "SIGTERM"
        return bool(flag.item())

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        print(f"\nimgclf: {self.name} received; finishing this step and saving (Ctrl-C again to abandon)",
              file=sys.stderr, flush=True)

    def __enter__(self):
        with contextlib.suppress(ValueError):  # only the main thread may install handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
