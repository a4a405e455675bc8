"""Evaluating a saved model (notes 27, 31): a checkpoint on a data set, preprocessed and computed as it was trained."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from imgclf.checkpoint import load_checkpoint
from imgclf.config import DataConfig
from imgclf.engine import evaluate
from imgclf.errors import UserError
from imgclf.metrics import accuracy, confusion_matrix
from imgclf.models import check_fits, model_from_checkpoint
from imgclf.pipeline import eval_batch_size, eval_loader, place_model
from imgclf.predict import ExportedPredictor, exported_kind
from imgclf.runtime import autocast_factory, resolve_device, resolve_precision
from imgclf.sources import load_data
from imgclf.transforms import BatchTransform

SPLITS = ("train", "val", "test")


def evaluate_checkpoint(path, data_cfg: DataConfig, *, split: str | None = None, device: str = "auto",
                        precision: str | None = None) -> dict:
    """Evaluate a checkpoint on one split of `data_cfg.data`, preprocessed as it was trained and, unless
    `precision` says otherwise, computed in the run's precision (so it reproduces the run's figures).

    `split`: train, val or test; by default the test split where the data set has one beside its validation
    split, else the held-out one (a test folder serving as validation), and all of a plain folder of class
    folders. The result is `engine.evaluate`'s with `classes`, `split` (its name) and `data` added."""
    kind = exported_kind(path)
    if kind is not None:
        return _evaluate_exported(ExportedPredictor(path, kind), data_cfg, split=split, where=path)
    ckpt = load_checkpoint(path)
    check_fits(ckpt)  # before the pictures are decoded at the checkpoint's size
    inp = ckpt["input"]
    # augment "none": every split decoded at the model's size (training's larger photo store is not needed)
    data = load_data(replace(data_cfg, img_size=inp["size"], augment="none"), img_size=inp["size"],
                     channels=inp["channels"],
                     whole=split is None)
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
    result = evaluate(model, loader, num_classes=len(data.classes), autocast=autocast, tta=run.get("tta", False),
                      keep_probs=True)
    result.update(classes=data.classes, split=name, data=data, split_data=chosen)
    return result


def _evaluate_exported(predictor: ExportedPredictor, data_cfg: DataConfig, *, split: str | None, where) -> dict:
    """As `evaluate_checkpoint`, for a model exported by `imgclf export`: uint8 pictures into its graph."""
    start = time.perf_counter()
    data = load_data(replace(data_cfg, img_size=predictor.size, augment="none"), img_size=predictor.size,
                     channels=predictor.channels, whole=split is None)
    if data.classes != predictor.classes:
        raise UserError(f"{where} was exported for {len(predictor.classes)} classes ({preview(predictor.classes)}), "
                        f"but {data_cfg.data} has {len(data.classes)} ({preview(data.classes)})")
    name, chosen = _choose(data, split, data_cfg.data)
    result = score(predictor.probabilities, chosen, len(data.classes), eval_batch_size(data_cfg, chosen))
    result.update(seconds=time.perf_counter() - start, classes=data.classes, split=name, data=data, split_data=chosen)
    return result


def score(probabilities, split, num_classes: int, batch: int) -> dict:
    """Loss, accuracy, confusion matrix (and top-5 with over 5 classes) of `probabilities` (uint8 (N, C, S, S)
    pictures -> class probabilities, as `Predictor.probabilities`) on `split`, `batch` pictures at a time;
    also `predicted`, the top-1 class of every picture."""
    k = num_classes
    confusion, loss_sum, top5, predicted = torch.zeros(k, k, dtype=torch.int64), 0.0, 0, []
    for i in range(0, len(split), batch):
        probs = probabilities(torch.as_tensor(np.asarray(split.images[i : i + batch])))
        y = split.labels[i : i + batch]
        loss_sum += float(torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum"))
        predicted.append(probs.argmax(1))
        confusion += confusion_matrix(predicted[-1], y, k)
        top5 += int((probs.topk(min(5, k), dim=1).indices == y.view(-1, 1)).any(1).sum())
    count = int(confusion.sum())
    result = {"loss": loss_sum / max(count, 1), "acc": accuracy(confusion), "count": count, "confusion": confusion,
              "predicted": torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.int64)}
    if k > 5:
        result["top5"] = top5 / max(count, 1)
    return result


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
