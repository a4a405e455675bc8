"""`train(cfg)`: the composition root (notes 26-30), readable top to bottom.

The routine is the notes' own: load the data, build the network, then for every epoch train, evaluate,
record and save. Everything a run changes lives in one `TrainState` (imgclf.engine), which is what a
checkpoint saves and what resuming restores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from imgclf import __version__, distributed
from imgclf.calibration import describe, fit_on
from imgclf.checkpoint import build_checkpoint, load_checkpoint, non_finite, safe_load, save_checkpoint
from imgclf.config import TrainConfig
from imgclf.configfile import RUN_HEADER, config_yaml
from imgclf.engine import Diverged, Hooks, TrainState, evaluate, train_one_epoch
from imgclf.errors import (
    EXIT_DISTRIBUTED,
    EXIT_DIVERGED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    Stopped,
    UserError,
    first_line,
)
from imgclf.files import atomic_write_text, claim_run_folder, remove_temporaries
from imgclf.models import checked_model_name, refuse_misfit
from imgclf.optim import Lookahead, build_optimizer, build_scheduler, clip_norm, ema_update, staged_groups
from imgclf.pipeline import (
    RunParts,
    build_run,
    contract_decoding,
    describe_finetune,
    load_data_ranked,
    run_decoding,
    set_stage,
)
from imgclf.runtime import autocast_factory, resolve_device, resolve_precision
from imgclf.sources import ImageData, imbalance_warning
from imgclf.tasks import DEFAULT, Task, checkpoint_task, training_task
from imgclf.tracking import RunRecord, Tracker


def train(cfg: TrainConfig, *, resume: bool = False, model: torch.nn.Module | None = None,
          on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train as `cfg` says, writing everything into `cfg.run.out`; return the last epoch's metrics.

    `model`: a network object to train instead of building `cfg.model.name` (the Python API; its output must
    have one logit per class). `on_epoch(record)` is called after every epoch with its metrics.jsonl record
    (main process only); raising `imgclf.errors.Stopped` there ends the run resumably.

    The main process holds `cfg.run.out` (files.claim_run_folder) for the whole run: a second run into the
    same folder, or into a folder of files imgclf did not write, is one UserError line. --folds K without
    --fold I is K runs, not one (imgclf.crossval): one UserError line here."""
    if cfg.data.folds and cfg.data.fold is None:
        raise UserError(f"--folds {cfg.data.folds} trains {cfg.data.folds} runs, one per fold: `imgclf train "
                        f"--folds K` or imgclf.crossval.cross_validate does; give --fold I to train fold I alone")
    dist = distributed.from_environment()
    device = resolve_device(cfg.run.device, dist)
    distributed.init(dist, device)
    try:
        with (claim_run_folder(cfg.run.out) if dist.is_main else contextlib.nullcontext(),
              RunRecord(cfg, enabled=dist.is_main) as run_record):  # status.json and MLflow: finished, stopped...
            record = _train(cfg, resume=resume, dist=dist, device=device, model=model,
                            on_epoch=run_record.epoch_hook(on_epoch), run_record=run_record)
        distributed.barrier(dist)  # leave together: tearing down a group that a peer still uses can abort it
        return record
    except RuntimeError as err:
        if not dist.enabled or not distributed.is_peer_failure(err):
            raise
        raise UserError(f"rank {dist.rank}: another process of the distributed job failed or stopped answering "
                        f"({str(err).splitlines()[0][:160]}); the whole job stops", EXIT_DISTRIBUTED) from None
    finally:
        distributed.close(dist)


def _train(cfg: TrainConfig, *, resume: bool, dist, device: torch.device, model, on_epoch,
           run_record: RunRecord) -> dict:
    run_dir, epochs = Path(cfg.run.out), cfg.optim.epochs
    ckpt = _resume_point(cfg) if resume else None
    torch.manual_seed(cfg.run.seed)
    data = _data(cfg, dist, ckpt)
    if device.type == "cuda":  # every batch has the same shape: let cuDNN time its algorithms once and keep the best
        torch.backends.cudnn.benchmark = True
    precision = resolve_precision(cfg.run.precision, device)
    cfg = _batch_size(cfg, data, device=device, dist=dist, precision=precision, model=model)
    parts = build_run(cfg, data, device=device, dist=dist, fresh=ckpt is None, model=model)
    state = _train_state(cfg, parts, device=device, precision=precision, dist=dist)
    if ckpt:
        _restore(state, ckpt, run_dir / "checkpoints" / "last.pt")
    tracker = Tracker(run_dir, enabled=dist.is_main, resume_epoch=state.epoch, steps_per_epoch=len(parts.train),
                      log_every=cfg.run.log_every)
    if dist.is_main:
        _start_run_folder(cfg, parts, tracker, device=device, precision=precision, world=dist.world_size,
                          fresh=ckpt is None)
    run_record.start(resumed=ckpt is not None)
    task, autocast = training_task(cfg, data, device), autocast_factory(device, precision)
    check_every = 1 if device.type == "cpu" else 32  # reading a loss makes the host wait for the GPU
    with StopFlag(dist, device) as stop:
        for invocation_epochs, epoch in enumerate(range(state.epoch, epochs), start=1):
            tracker.start_epoch(epoch, epochs, start_step=state.step)
            set_stage(parts.model, parts.head, cfg, epoch)
            stats = _train_epoch(state, parts, cfg, task, epoch=epoch, autocast=autocast, dist=dist, run_dir=run_dir,
                                 hooks=_RunHooks(state, tracker, stop), check_every=check_every)
            if stats["stopped_at"] is not None:
                _stop_mid_epoch(cfg, parts, state, stats, stop=stop, dist=dist, epoch=epoch, task=task)
            val = (_validate(cfg, parts, state, task=task, epoch=epoch, autocast=autocast, dist=dist)
                   if _evaluates(cfg, stop, epoch=epoch, invocation_epochs=invocation_epochs) else None)
            _refuse_non_finite(state, val, epoch=epoch, run_dir=run_dir)  # never saved, never "best"
            record = epoch_record(epoch, stats, val, lr=state.optimizer.param_groups[0]["lr"], data=data, task=task)
            tracker.end_epoch(record)
            _save(cfg, parts, state, dist=dist, best=state.end_epoch(record, cfg.optim.monitor, task), task=task)
            if on_epoch is not None and dist.is_main:  # after the save: a Stopped raised here keeps this epoch
                on_epoch(record)
            if val is not None and _patience_spent(cfg, state, tracker):
                break
            _stop_between_epochs(cfg, stop, invocation_epochs, epoch=epoch, run_dir=run_dir)
    if parts.test is not None:
        record = tracker.amend_last(_final_test(cfg, parts, state, task=task, autocast=autocast, dist=dist))
    _finish(cfg, parts, state, tracker, task=task, device=device, autocast=autocast, dist=dist, val=val)
    tracker.close()
    return record


def _evaluates(cfg: TrainConfig, stop: StopFlag, *, epoch: int, invocation_epochs: int) -> bool:
    """--val-every N: whether epoch `epoch` (counted from 0) is evaluated: every Nth (none with N = 0), the
    run's last, and the last of this invocation (--stop-after, or a signal received during the epoch), so
    that a run stopped between epochs resumes after an evaluation. The same answer in every process."""
    every, done, after = cfg.run.val_every, epoch + 1, cfg.run.stop_after
    return (bool(every and done % every == 0) or done == cfg.optim.epochs
            or (after is not None and invocation_epochs >= after) or stop.check())


def _validate(cfg: TrainConfig, parts: RunParts, state: TrainState, *, task: Task, epoch: int, autocast,
              dist) -> dict:
    """`evaluate` of the held-out split after epoch `epoch`. Test-time augmentation costs 2 or 6 passes
    (--tta-shift): only the final figure (and `imgclf eval`) pays for it; the final probabilities are kept for the run's pictures
    (one process holds them all)."""
    final = epoch + 1 == cfg.optim.epochs
    return evaluate(state.eval_model, parts.val, task=task, autocast=autocast, dist=dist,
                    tta=cfg.run.tta and final, tta_shift=cfg.run.tta_shift, keep_probs=final and not dist.enabled)


def _data(cfg: TrainConfig, dist, ckpt: dict | None) -> ImageData:
    data = load_data_ranked(cfg.data, dist, run_decoding(cfg))
    if ckpt and ckpt["classes"] != data.classes:
        raise UserError(f"{cfg.run.out} was trained on classes {ckpt['classes']}, but {cfg.data.data} has "
                        f"{data.classes}; start a new run with --out")
    if ckpt and (ckpt["input"]["channels"], ckpt["input"]["size"]) != (data.channels, data.img_size):
        was, now = (ckpt["input"]["channels"], ckpt["input"]["size"]), (data.channels, data.img_size)
        raise UserError(f"{cfg.run.out} was trained on {was[0]}x{was[1]}x{was[1]} pictures, but {cfg.data.data} "
                        f"gives {now[0]}x{now[1]}x{now[1]}; resume with the run's data, or start a new run with --out")
    return data


def _batch_size(cfg: TrainConfig, data: ImageData, *, device, dist, precision, model) -> TrainConfig:
    """`cfg` with --batch-size auto resolved (imgclf.batchsize) and the learning rate following it, said in one line."""
    if cfg.data.batch_size == "auto":
        return _auto_batch(cfg, data, device=device, dist=dist, precision=precision, model=model)
    # A folder smaller than the batch keeps the recipe's (or the user's) rate: scaling it to the pictures a step
    # changed what --lr and --recipe notes promise, and clipping (--clip-grad) already keeps such runs finite.
    return cfg


def _auto_batch(cfg: TrainConfig, data: ImageData, *, device, dist, precision, model) -> TrainConfig:
    from imgclf.batchsize import resolve_auto_batch
    from imgclf.models import build_model

    def build():  # the network whose steps are tried: its weights do not matter
        return model if model is not None else build_model(
            cfg.model.name, num_classes=len(data.classes), in_channels=data.channels, img_size=data.img_size,
            freeze_backbone=cfg.model.freeze_backbone, model_args=cfg.model.args)

    cfg = resolve_auto_batch(cfg, pictures=len(data.train), world=dist.world_size, device=device, build=build,
                             shape=(data.channels, data.img_size, data.img_size),
                             autocast=autocast_factory(device, precision))
    if dist.is_main:
        print(f"imgclf: --batch-size auto: {cfg.data.batch_size} (the largest step that fitted, less "
              f"headroom), --lr {cfg.optim.lr:.4g}", file=sys.stderr)
    return cfg


def _stop_mid_epoch(cfg: TrainConfig, parts: RunParts, state: TrainState, stats: dict, *, stop, dist,
                    epoch: int, task: Task) -> None:
    """A signal arrived during the epoch: save where it stopped (with the partial sums), then raise Stopped."""
    state.step, state.partial = stats["stopped_at"], stats["sums"]
    _save(cfg, parts, state, dist=dist, best=False, task=task)
    raise Stopped(f"stopped by {stop.name} at epoch {epoch + 1}, step {state.step}; resume with: "
                  f"imgclf train --resume {cfg.run.out}", _exit_code(stop.name))


def _report(cfg: TrainConfig, parts: RunParts, state: TrainState, tracker: Tracker, *, task: Task, device,
            autocast, result: dict) -> None:
    from imgclf.report import report_after_training

    report_after_training(Path(cfg.run.out), cfg=cfg, data=parts.data, task=task, model=state.eval_model,
                          transform=parts.transform, device=device, autocast=autocast, records=tracker.records,
                          writer=tracker.writer, result=result)


def _finish(cfg: TrainConfig, parts: RunParts, state: TrainState, tracker: Tracker, *, task: Task, device, autocast,
            dist, val: dict) -> None:
    """After the last epoch, main process: curves.png, confusion.png, mistakes.png and TensorBoard pictures,
    then the calibration (`_calibrate`); neither ever fails the run."""
    if dist.is_main:
        _report(cfg, parts, state, tracker, task=task, device=device, autocast=autocast, result=val)
        _calibrate(cfg, parts, state, tracker, task=task, autocast=autocast, dist=dist, val=val)


def _calibrate(cfg: TrainConfig, parts: RunParts, state: TrainState, tracker: Tracker, *, task: Task, autocast,
               dist, val: dict) -> None:
    """--calibrate: fit the temperature of last.pt and of best.pt on the validation split and store it in each
    (imgclf.calibration); write calibration.json and reliability.png (best.pt's) into the run folder and say
    it in one line. `val`: the last epoch's evaluation (last.pt's weights), whose probabilities serve last.pt
    and, when it is the same epoch, best.pt. Multi-label runs and torchrun jobs are skipped in one line; a
    failure is a warning and never loses the run (the checkpoints are already saved)."""
    from imgclf.report import write_calibration

    if not cfg.run.calibrate or not dist.is_main:
        return
    if task.name != DEFAULT or dist.enabled:
        tracker.message("calibration: skipped (" + ("multi-label models decide by their per-class thresholds"
                        if task.name != DEFAULT else "not under torchrun; it needs every validation picture in "
                        "one process") + ")")
        return
    try:
        folder, fitted = Path(cfg.run.out) / "checkpoints", {}
        for name in ("last.pt", "best.pt"):
            if not (folder / name).is_file():
                continue
            ckpt = safe_load(folder / name)
            same = [figures for epoch, figures in fitted.values() if epoch == ckpt["epoch"]]
            probs = None if same else val.get("probs") if name == "last.pt" else None
            if not same and probs is None:  # best.pt of an earlier epoch, or a run ended early (no kept probs)
                probs = _val_probs(ckpt, parts, state, task, autocast)
            figures = same[0] if same else fit_on(probs, parts.data.val.labels[: len(probs)])
            save_checkpoint(folder / name, {**ckpt, "temperature": figures["temperature"]})
            fitted[name] = (ckpt["epoch"], figures)
        figures = fitted.get("best.pt", fitted.get("last.pt", (0, None)))[1]
        if figures is not None:
            tracker.message(describe(figures, f"best.pt, {parts.data.val_name} split"))
            write_calibration(Path(cfg.run.out), {name: f for name, (_, f) in fitted.items()}, figures)
    except Exception as err:  # noqa: BLE001 - calibration is added after the run; its checkpoints are saved
        tracker.message(f"imgclf: warning: no calibration ({type(err).__name__}: {first_line(err)[:160]})")


def _val_probs(ckpt: dict, parts: RunParts, state: TrainState, task: Task, autocast) -> torch.Tensor:
    """The validation split's probabilities (uncalibrated) of `ckpt`'s weights, computed as training evaluates."""
    model = state.ema.module if state.ema is not None else state.model
    model.load_state_dict(ckpt.get("ema_state_dict") or ckpt["state_dict"])
    return evaluate(state.eval_model, parts.val, task=task, autocast=autocast, tta=ckpt["config"]["run"]["tta"],
                    tta_shift=ckpt["config"]["run"].get("tta_shift", True),
                    keep_probs=True)["probs"]


def resumed_config(folder, *, check_code: bool = True, model_code: str | None = None,
                   trust_changed_code: bool = False) -> TrainConfig:
    """The configuration to continue the run in `folder` with: its own, `out` set to `folder`, `stop_after`
    cleared (it counts the epochs of one call), and with `check_code`, a network from the user's .py file
    named by `model_code`, checked against its recorded hash. One UserError line when there is nothing to resume."""
    last = Path(folder) / "checkpoints" / "last.pt"
    if not last.is_file():
        raise UserError(f"nothing to resume: {last} does not exist")
    ckpt = load_checkpoint(last)
    try:
        base = TrainConfig.from_dict(ckpt["config"])
    except (KeyError, TypeError, AttributeError, ValueError, UserError) as err:
        raise UserError(f"cannot resume from {last}: its configuration is missing or damaged ({first_line(err)}); "
                        f"start a new run with --out") from None
    model = base.model
    if check_code:
        name = checked_model_name(ckpt, model_code=model_code, trust_changed_code=trust_changed_code)
        model = dataclasses.replace(model, name=name)
    return dataclasses.replace(base, run=dataclasses.replace(base.run, out=str(folder), stop_after=None), model=model)


def _resume_point(cfg: TrainConfig) -> dict:
    run_dir = Path(cfg.run.out)
    last = run_dir / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    problem = _resume_problem(ckpt)
    if problem:
        raise UserError(f"cannot resume from {last}: {problem} (a damaged or hand-made checkpoint); start a new "
                        f"run with --out")
    if ckpt["epoch"] >= cfg.optim.epochs:
        raise UserError(f"{run_dir} already finished {ckpt['epoch']}/{cfg.optim.epochs} epochs; "
                        f"pass a larger --epochs to train further, or start a new run with --out")
    return ckpt


def _resume_problem(ckpt: dict) -> str | None:
    """What a checkpoint lacks to be resumed from (beyond what load_checkpoint checks), or None."""
    for key in ("epoch", "step", "best_epoch", "waited"):
        value = ckpt.get(key, 0) if key == "waited" else ckpt.get(key)  # waited: absent before --val-every
        if type(value) is not int or value < 0:
            return f"its {key} is {value!r:.40}, not a count"
    if ckpt.get("best_score") is not None and not isinstance(ckpt["best_score"], float | int):
        return "its best_score is not a number"
    for key in ("optimizer", "scheduler", "rng"):
        if not isinstance(ckpt.get(key), dict):
            return f"it has no {key} state"
    if not isinstance(ckpt["rng"].get("torch"), torch.Tensor):
        return "it has no random number generator state"
    return _schedule_problem(ckpt["optimizer"], ckpt["scheduler"])


def _schedule_problem(optimizer: dict, scheduler: dict) -> str | None:
    """What in the saved optimizer and scheduler states is not the numbers their `step` computes with (torch
    would fail inside the first step, with its own traceback), or None."""
    def numbers(values) -> bool:
        return isinstance(values, list) and all(type(v) in (int, float) for v in values)

    groups = optimizer.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return "its optimizer state has no parameter groups"
    for key in ("lr", "initial_lr", "weight_decay", "momentum"):
        if not numbers([g[key] for g in groups if key in g]):
            return f"its optimizer's {key} is not a number"
    for key in ("base_lrs", "_last_lr"):
        if key in scheduler and not numbers(scheduler[key]):
            return f"its scheduler's {key} are not numbers"
    if type(scheduler.get("last_epoch", 0)) is not int:
        return "its scheduler's step count is not a whole number"
    return None


def _restore(state: TrainState, ckpt: dict, path: Path) -> None:
    """`state.load_state_dict(ckpt)`, with anything that does not fit this run told in one line (weights of
    another shape: which, and their shapes)."""
    try:
        refuse_misfit(ckpt["model"]["name"], {k: v.shape for k, v in state.model.state_dict().items()},
                      ckpt["state_dict"])
    except UserError as err:
        raise UserError(f"cannot resume from {path}: {err}") from None
    wanted = [set(group) for group in state.optimizer.param_groups]
    try:
        state.load_state_dict(ckpt)
        for need, group in zip(wanted, state.optimizer.param_groups, strict=True):  # else the first step fails
            if missing := need - set(group):
                raise KeyError(f"its optimizer's settings lack {', '.join(sorted(missing))}")
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as err:
        raise UserError(f"cannot resume from {path}: its saved state does not fit this run "
                        f"({first_line(err)}); start a new run with --out") from None




def _train_state(cfg: TrainConfig, parts: RunParts, *, device, precision, dist) -> TrainState:
    """Optimizer, schedule, loss scaling and weight averaging around `parts.model`, as `cfg` asks."""
    model, steps = parts.model, len(parts.train)
    groups = None
    if cfg.model.freeze_epochs and not cfg.model.freeze_backbone:
        groups = staged_groups(model, parts.head, cfg.optim, cfg.model.backbone_lr_scale)
    optimizer = build_optimizer(model, cfg.optim, groups=groups)
    ema = None
    if cfg.run.ema:
        from torch.optim.swa_utils import AveragedModel

        ema = AveragedModel(model, multi_avg_fn=ema_update(cfg.run.ema_decay), use_buffers=True)
    return TrainState(model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg.optim, steps),
                      total_steps=cfg.optim.epochs * steps, ema=ema, net=_wrap(model, cfg, dist, device),
                      scaler=torch.amp.GradScaler(device.type) if precision == torch.float16 else None,
                      lookahead=Lookahead(model) if cfg.optim.lookahead else None,
                      bn_frozen=cfg.model.bn_stats == "frozen")


def _train_epoch(state: TrainState, parts: RunParts, cfg: TrainConfig, task: Task, *, run_dir: Path,
                 **kwargs) -> dict:
    """`train_one_epoch` with the task's loss and hits, --clip-grad and --accumulate; a diverged loss told to
    the user in one line. --bf16-weights: bf16 weights take bf16 batches, so the steps run without autocast
    (nothing to cast; evaluation keeps it, for float inputs)."""
    if cfg.run.bf16_weights:
        kwargs["autocast"] = contextlib.nullcontext
    try:
        return train_one_epoch(state, parts.train, loss_fn=task.loss, hits=task.hits, accumulate=cfg.optim.accumulate,
                               clip_grad=clip_norm(cfg.optim.clip_grad, state.model), **kwargs)
    except Diverged as err:
        raise _diverged(str(err), run_dir) from None
    except ValueError as err:
        if "Expected more than 1 value per channel when training" not in str(err):
            raise
        raise UserError(f"the network's batch normalisation needs more than one value per channel, and a batch of "
                        f"{parts.train.batch_size} gives it one ({first_line(err)}); use a larger --batch-size "
                        f"(2 or more) or --img-size") from None


def _refuse_non_finite(state: TrainState, val: dict | None, *, epoch: int, run_dir: Path) -> None:
    """Stop the run (one line, EXIT_DIVERGED) when the epoch's validation loss (None: not evaluated) or the
    weights it would save are NaN or infinite: such a model must never become last.pt or best.pt."""
    if val is not None and not math.isfinite(val["loss"]):
        raise _diverged(f"the validation loss became {val['loss']} after epoch {epoch + 1}", run_dir)
    for model in (state.model, state.ema.module) if state.ema is not None else (state.model,):
        key = non_finite(model.state_dict())
        if key is not None:
            raise _diverged(f"the weights {key} became NaN or infinite in epoch {epoch + 1}", run_dir)


def _diverged(what: str, run_dir: Path) -> UserError:
    last = run_dir / "checkpoints" / "last.pt"
    kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written"
    return UserError(f"training diverged: {what}; {kept}; try a lower --lr", EXIT_DIVERGED)


class _RunHooks(Hooks):
    """Each step's loss to the progress bar and TensorBoard; a signal received ends the epoch resumably."""

    def __init__(self, state: TrainState, tracker: Tracker, stop: StopFlag):
        self.state, self.tracker, self.stop = state, tracker, stop

    def on_loss(self, step: int, loss: float) -> None:
        self.tracker.step(step, loss, self.state.optimizer.param_groups[0]["lr"])

    def should_stop(self) -> bool:
        return self.stop.check()


def _stop_between_epochs(cfg: TrainConfig, stop: StopFlag, invocation_epochs: int, *, epoch: int,
                         run_dir: Path) -> None:
    """Raise Stopped after a finished epoch when a signal came or --stop-after is reached (not after the last)."""
    after = cfg.run.stop_after
    if stop.requested or (after and invocation_epochs >= after and epoch + 1 < cfg.optim.epochs):
        why = stop.name or f"--stop-after {after}"
        raise Stopped(f"stopped by {why} after epoch {epoch + 1}; resume with: imgclf train --resume {run_dir}",
                      _exit_code(stop.name))


def _exit_code(signal_name: str | None) -> int:
    return {"SIGTERM": EXIT_SIGTERM, "SIGINT": EXIT_SIGINT}.get(signal_name, 0)


def epoch_record(epoch: int, stats: dict, val: dict | None, *, lr: float, data: ImageData, task: Task) -> dict:
    """One line of metrics.jsonl from `train_one_epoch`'s and `evaluate`'s results (epoch counted from 0);
    `val` None (an epoch --val-every does not evaluate): no val_* figures at all."""
    return {"epoch": epoch + 1, "train_loss": stats["loss"], "train_acc": stats["acc"],
            **(split_figures("val", val, task) if val is not None else {}), "lr": lr,
            "images_per_s": stats["images"] / max(stats["seconds"], 1e-9), "train_seconds": stats["seconds"],
            "epoch_seconds": stats["seconds"] + (val["seconds"] if val is not None else 0.0),
            "skipped_files": len(data.skipped), "time": time.time()}


def split_figures(prefix: str, result: dict, task: Task) -> dict:
    """`evaluate`'s result as metrics.jsonl keys, as `task.figures` names them, each led by `prefix` (val or test)."""
    return {f"{prefix}_{key}": value for key, value in task.figures(result).items()}


def _patience_spent(cfg: TrainConfig, state: TrainState, tracker: Tracker) -> bool:
    """--patience: True (and said) when the monitored figure has not improved for that many evaluations
    (epochs, unless --val-every skips some)."""
    waited = state.waited
    if cfg.optim.patience is None or waited < cfg.optim.patience or state.epoch >= cfg.optim.epochs:
        return False
    unit = "epochs" if cfg.run.val_every == 1 else "evaluations"
    tracker.message(f"early stop after epoch {state.epoch}: {cfg.optim.monitor} has not improved for {waited} "
                    f"{unit} (best {state.best_score:.4f} at epoch {state.best_epoch}, kept in best.pt)")
    return True


def _final_test(cfg: TrainConfig, parts: RunParts, state: TrainState, *, task: Task, autocast, dist) -> dict:
    """The test split, evaluated once at the end with best.pt's weights; it never chooses anything."""
    distributed.barrier(dist)  # best.pt is written by the main process
    best = Path(cfg.run.out) / "checkpoints" / "best.pt"
    if not best.is_file():
        return {}
    ckpt = load_checkpoint(best)
    (state.ema.module if state.ema is not None else state.model).load_state_dict(
        ckpt.get("ema_state_dict") or ckpt["state_dict"])
    task = checkpoint_task(ckpt)  # with best.pt's thresholds (a multi-label run's, chosen on validation)
    test = evaluate(state.eval_model, parts.test, task=task, autocast=autocast, dist=dist, tta=cfg.run.tta,
                    tta_shift=cfg.run.tta_shift)
    return {**split_figures("test", test, task), "test_of_epoch": ckpt["epoch"]}


def _start_run_folder(cfg: TrainConfig, parts: RunParts, tracker: Tracker, *, device, precision, world: int,
                      fresh: bool) -> None:
    """Main process: clear a killed run's half-written files, write config.json, say what runs where, and
    for a new run show its first batch and graph in TensorBoard."""
    run_dir, data = Path(cfg.run.out), parts.data
    remove_temporaries(run_dir)
    atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    atomic_write_text(run_dir / "config.yaml", config_yaml(cfg, RUN_HEADER, folder=run_dir))  # for `train --config`
    tracker.message(f"imgclf {__version__}: {cfg.model.name} on {cfg.data.data} ({data.describe()}, "
                    f"{len(data.classes)} classes, "
                    f"{data.channels}x{data.img_size}x{data.img_size}) on {device}, {str(precision)[6:]}, "
                    f"world size {world}; run folder {run_dir}")
    if fresh and cfg.model.pretrained:
        tracker.message(describe_finetune(cfg, parts.contract, data.img_size))
    warning = imbalance_warning(data.train.labels, data.classes) if data.train.labels.ndim == 1 else None
    if warning and cfg.data.balance == "none":
        tracker.message(warning)
    if fresh:
        first = next(iter(parts.train.epoch(0)))[0]
        tracker.batch_grid("train/batch", first, data.mean, data.std)
        tracker.graph(parts.model, first)


def _wrap(model, cfg: TrainConfig, dist, device):
    net = torch.compile(model) if cfg.run.compile else model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


def _save(cfg: TrainConfig, parts: RunParts, state: TrainState, *, dist, best: bool, task: Task) -> None:
    """Write last.pt (and best.pt when `best`) atomically, from the main process only, with what `task`
    keeps of the last epoch's figures (a multi-label run's thresholds)."""
    if not dist.is_main:
        return
    data = parts.data
    ckpt = build_checkpoint(model_name=cfg.model.name, classes=data.classes, channels=data.channels,
                            size=data.img_size, mean=data.mean, std=data.std, config=cfg.to_dict(),
                            state=state.state_dict(), task=task.checkpoint_entries(state.metrics),
                            decoding=contract_decoding(parts.contract), depth=data.depth)
    folder = Path(cfg.run.out) / "checkpoints"
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
