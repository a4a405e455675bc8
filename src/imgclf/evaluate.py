"""Evaluating a saved model (notes 27, 31): a checkpoint on a data set, preprocessed and computed as it was trained."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from imgclf.calibration import calibration_figures, describe, rejection_line, rescaled
from imgclf.checkpoint import load_checkpoint
from imgclf.config import DataConfig
from imgclf.engine import evaluate, evaluate_outputs
from imgclf.errors import UserError
from imgclf.models import check_fits, model_from_checkpoint
from imgclf.pipeline import eval_batch_size, eval_loader, place_model
from imgclf.predict import ExportedPredictor, exported_kind
from imgclf.runtime import autocast_factory, resolve_device, resolve_precision
from imgclf.sources import load_data
from imgclf.tasks import DEFAULT, MULTILABEL, checkpoint_task, make_task
from imgclf.transforms import BatchTransform, input_decoding

SPLITS = ("train", "val", "test")


def evaluate_checkpoint(path, data_cfg: DataConfig, *, split: str | None = None, device: str = "auto",
                        precision: str | None = None) -> dict:
    """Evaluate a checkpoint on one split of `data_cfg.data`, preprocessed as it was trained and, unless
    `precision` says otherwise, computed in the run's precision (so it reproduces the run's figures).

    `split`: train, val or test; by default the test split where the data set has one beside its validation
    split, else the held-out one (a test folder serving as validation), and all of a plain folder of class
    folders. The result is `engine.evaluate`'s with `task` (the checkpoint's, a tasks.Task), `classes`, `split`
    (its name), `data` and `split_data` added; `evaluation_summary` and `evaluation_table` show it."""
    kind = exported_kind(path)
    if kind is not None:
        return _evaluate_exported(ExportedPredictor(path, kind), data_cfg, split=split, where=path)
    ckpt = load_checkpoint(path)
    check_fits(ckpt)  # before the pictures are decoded at the checkpoint's size
    inp = ckpt["input"]
    # augment "none": every split decoded at the model's size (training's larger photo store is not needed)
    data = load_data(replace(data_cfg, img_size=inp["size"], augment="none", task=ckpt.get("task", DEFAULT)),
                     img_size=inp["size"], channels=inp["channels"], whole=split is None,
                     classes=ckpt["classes"] if ckpt.get("task") == MULTILABEL else None,
                     decoding=input_decoding(inp), crop_train=True)  # every split as predict decodes it
    if data.classes != ckpt["classes"]:
        raise UserError(f"{path} was trained for {len(ckpt['classes'])} classes ({preview(ckpt['classes'])}), "
                        f"but {data_cfg.data} has {len(data.classes)} ({preview(data.classes)})")
    run = ckpt.get("config", {}).get("run", {})
    channels_last = run.get("channels_last", False)
    dev = resolve_device(device)
    model = place_model(model_from_checkpoint(ckpt), dev, channels_last=channels_last)
    name, chosen = _choose(data, split, data_cfg.data)
    loader = eval_loader(chosen, BatchTransform(tuple(inp["mean"]), tuple(inp["std"])),
                         batch_size=eval_batch_size(data_cfg, chosen), device=dev, channels_last=channels_last)
    autocast = autocast_factory(dev, resolve_precision(precision or run.get("precision", "fp32"), dev))
    task = checkpoint_task(ckpt)
    result = evaluate(model, loader, task=task, autocast=autocast, tta=run.get("tta", False),
                      tta_shift=run.get("tta_shift", True), keep_probs=True)  # runs before --tta-shift shifted
    result.update(task=task, classes=data.classes, split=name, data=data, split_data=chosen)
    return result


def _evaluate_exported(predictor: ExportedPredictor, data_cfg: DataConfig, *, split: str | None, where) -> dict:
    """As `evaluate_checkpoint`, for a model exported by `imgclf export`: uint8 pictures into its graph."""
    start = time.perf_counter()
    task = predictor.task
    data = load_data(replace(data_cfg, img_size=predictor.size, augment="none", task=task.name),
                     img_size=predictor.size, channels=predictor.channels, whole=split is None,
                     classes=predictor.classes if task.name == MULTILABEL else None,
                     decoding=predictor.decoding, crop_train=True)
    if data.classes != predictor.classes:
        raise UserError(f"{where} was exported for {len(predictor.classes)} classes ({preview(predictor.classes)}), "
                        f"but {data_cfg.data} has {len(data.classes)} ({preview(data.classes)})")
    name, chosen = _choose(data, split, data_cfg.data)
    # the graph divides the logits by the stored temperature: undone, so that the figures (the loss) and the
    # kept probabilities are those `evaluate_checkpoint` gives of the checkpoint
    t = getattr(task, "temperature", 1.0)
    result = score(lambda x: rescaled(predictor.probabilities(x), 1 / t), chosen, len(data.classes),
                   eval_batch_size(data_cfg, chosen), task=task)
    result.update(seconds=time.perf_counter() - start, task=task, classes=data.classes, split=name, data=data,
                  split_data=chosen)
    return result


def score(probabilities, split, num_classes: int, batch: int, *, task=None) -> dict:
    """`task`'s figures (by default single-label over `num_classes` classes: loss, accuracy, confusion matrix,
    top-5 with over 5 classes) of `probabilities` (uint8 (N, C, S, S) pictures -> the task's activation, as
    `Predictor.probabilities`) on `split`, `batch` pictures at a time, through the one evaluation loop; also
    "probs" and "predicted" (the top-1 class) of every picture."""
    task = task or make_task(DEFAULT, [str(i) for i in range(num_classes)])
    batches = ((torch.as_tensor(np.asarray(split.images[i : i + batch])), split.labels[i : i + batch])
               for i in range(0, len(split), batch))
    return evaluate_outputs(probabilities, batches, task=task, device=torch.device("cpu"), keep=True,
                            probabilities=True)


def evaluation_summary(result: dict) -> dict:
    """`evaluate_checkpoint`'s result as `imgclf eval --json` prints it (and `Run.evaluate` returns it): plain
    numbers and lists, as its task writes them; a single-label one with "calibration": the stored
    temperature and the ECE and NLL before and after it (`calibration_of`)."""
    summary = result["task"].summary(result)
    figures = calibration_of(result)
    if figures is not None:
        summary["calibration"] = {k: v for k, v in figures.items() if not k.startswith("reliability")}
    return summary


def evaluation_table(result: dict) -> str:
    """`evaluate_checkpoint`'s result as `imgclf eval` prints it without --json."""
    figures = calibration_of(result)
    where = f"{'stored' if figures and figures['temperature'] != 1.0 else 'none stored'}, {result.get('split')} split"
    return result["task"].table(evaluation_summary(result)) + ("" if figures is None else
                                                               "\n\n" + describe(figures, where))


def calibration_of(result: dict) -> dict | None:
    """`calibration.calibration_figures` of a single-label evaluation at its task's (the checkpoint's or
    export's) temperature, on the evaluated pictures; None for a multi-label one or without probabilities."""
    task = result.get("task")
    if getattr(task, "name", None) != DEFAULT or "probs" not in result or not hasattr(task, "temperature"):
        return None
    probs, t = result["probs"], task.temperature  # uncalibrated, from a checkpoint and from an export
    return calibration_figures(probs, result["split_data"].labels[: len(probs)], t)


def extra_outputs(result: dict, *, reliability=None, reject_precision: float | None = None) -> str:
    """`imgclf eval --reliability FILE.png` (the diagram written) and `--reject-precision X` (the cut
    suggested): what they say, for standard error; one UserError line for a multi-label model."""
    if reliability is None and reject_precision is None:
        return ""
    figures = calibration_of(result)
    if figures is None:
        raise UserError("--reliability and --reject-precision are for single-label models")
    lines = []
    if reject_precision is not None:
        labels = result["split_data"].labels[: len(result["probs"])]
        lines.append(rejection_line(calibrated_probs(result), labels, reject_precision, result["split"]))
    if reliability is not None:
        from imgclf.visualize import reliability_figure, save_png

        path = save_png(reliability_figure(figures, title=f"reliability, {result['split']} split"), reliability)
        lines.append(f"wrote {path}")
    return "".join(f"{line}\n" for line in lines)


def calibrated_probs(result: dict) -> torch.Tensor:
    """The evaluated pictures' probabilities at the stored temperature (what predict answers)."""
    return rescaled(result["probs"], result["task"].temperature)


def _choose(data, split: str | None, where: str):
    """(name, Split) of the split to evaluate; see `evaluate_checkpoint`."""
    if split is None:
        return ("test", data.test) if data.test is not None else (data.val_name, data.val)
    if split not in SPLITS:
        raise UserError(f"unknown --split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "test" and data.test is None:
        raise UserError(f"{where} has no test split beside its validation split; its held-out split is "
                        f"{data.val_name!r}: use --split val")
    return {"train": ("train", data.train), "val": (data.val_name, data.val), "test": ("test", data.test)}[split]


def preview(names: list[str]) -> str:
    """The first few class names, for messages."""
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
