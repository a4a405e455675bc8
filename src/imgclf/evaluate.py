"""Evaluating a saved model (notes 27, 31): a checkpoint on a data set, preprocessed and computed as it was trained."""

from __future__ import annotations

from dataclasses import replace

from imgclf.checkpoint import load_checkpoint
from imgclf.config import DataConfig
from imgclf.engine import evaluate
from imgclf.errors import UserError
from imgclf.models import model_from_checkpoint
from imgclf.pipeline import eval_loader, place_model
from imgclf.runtime import autocast_factory, resolve_device, resolve_precision
from imgclf.sources import load_data
from imgclf.transforms import BatchTransform


def evaluate_checkpoint(path, data_cfg: DataConfig, *, device: str = "auto", precision: str | None = None) -> dict:
    """Evaluate a checkpoint on the held-out split of `data_cfg.data`, preprocessed as it was trained and,
    unless `precision` says otherwise, computed in the run's precision (so it reproduces the run's figures)."""
    ckpt = load_checkpoint(path)
    inp = ckpt["input"]
    data = load_data(replace(data_cfg, img_size=inp["size"]), img_size=inp["size"], channels=inp["channels"])
    if data.classes != ckpt["classes"]:
        raise UserError(f"{path} was trained for {len(ckpt['classes'])} classes ({preview(ckpt['classes'])}), "
                        f"but {data_cfg.data} has {len(data.classes)} ({preview(data.classes)})")
    run = ckpt.get("config", {}).get("run", {})
    channels_last = run.get("channels_last", False)
    dev = resolve_device(device)
    model = place_model(model_from_checkpoint(ckpt), dev, channels_last=channels_last)
    loader = eval_loader(data.test, BatchTransform(tuple(inp["mean"]), tuple(inp["std"])),
                         batch_size=data_cfg.eval_batch_size, device=dev, channels_last=channels_last)
    autocast = autocast_factory(dev, resolve_precision(precision or run.get("precision", "fp32"), dev))
    result = evaluate(model, loader, num_classes=len(data.classes), autocast=autocast, tta=run.get("tta", False),
                      keep_probs=True)
    result.update(classes=data.classes, split=data.test_name, data=data)
    return result


def preview(names: list[str]) -> str:
    """The first few class names, for messages."""
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
