"""Pictures of a finished run (notes 07-08, 27): curves.png, confusion.png and mistakes.png in the run folder,
and the same in TensorBoard with per-class accuracy and the run's hyper-parameters."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

MISTAKES_SHOWN = 24


def write_run_report(run_dir: Path, *, records: Sequence[dict], result: dict, data, task, writer=None,
                     hparams: dict | None = None, explain: Callable | None = None) -> list[Path]:
    """Draw the run's pictures into `run_dir` and, with a SummaryWriter `writer`, into TensorBoard.

    `records` are metrics.jsonl's per-epoch dicts; `result` is `engine.evaluate(..., keep_probs=True)` over
    `data.val` in its order (so that probs[i] belongs to data.val.labels[i]) for `task` (a tasks.Task, which
    names the per-class figure). `explain(indices)`: heatmap overlays of those pictures of `data.val` for
    mistakes.png (`mistake_overlays`), or None. Returns the PNGs written.
    """
    from imgclf.visualize import confusion_figure, curves_figure, figure_array, per_class_figure, save_rgb_png

    run_dir = Path(run_dir)
    name = run_dir.resolve().name
    classes = list(data.classes)
    step = int(records[-1]["epoch"]) if records else 0
    figures = {"curves": curves_figure(records, title=f"{name}: loss and accuracy per epoch")}
    if "confusion" in result:  # one class per picture (a multi-label run has per-class figures instead)
        figures["confusion"] = confusion_figure(result["confusion"], classes, title=f"{name}, {data.val_name} split")
        figures["mistakes"] = mistakes_figure(result["probs"], data.val, classes, explain=explain)
    pixels = {key: figure_array(fig) for key, fig in figures.items()}  # rendered once, for file and TensorBoard
    written = [save_rgb_png(image, run_dir / f"{key}.png") for key, image in pixels.items()]
    if writer is None:
        return written
    for key, image in pixels.items():
        writer.add_image(f"report/{key}", image, step, dataformats="HWC")
    figure, per_class = task.per_class(result)
    writer.add_image("report/per_class", figure_array(per_class_figure(per_class, classes, figure)), step,
                     dataformats="HWC")
    for cls, figure in zip(classes, per_class, strict=True):
        writer.add_scalar(f"test_class/{cls}", figure, step)
    if hparams is not None:
        write_hparams(writer, hparams, {"val/acc": result["acc"], "val/loss": result["loss"]})
    writer.flush()
    return written


def mistakes_figure(probs: torch.Tensor, split, classes: Sequence[str], *, count: int = MISTAKES_SHOWN,
                    explain: Callable | None = None):
    """The test pictures the model got wrong with the highest confidence, with true and predicted labels;
    with `explain` (indices -> uint8 (3, S, S) overlays, or None), each beside its heatmap of the class
    predicted (imgclf.cam: where the network saw it)."""
    from matplotlib.figure import Figure

    from imgclf.visualize import image_grid

    labels = split.labels
    conf, pred = probs.max(dim=1)
    wrong = torch.nonzero(pred != labels[: len(pred)]).flatten()
    worst = confident_mistakes(probs, labels, count=count)
    if not worst:
        fig = Figure(figsize=(6, 2))
        fig.text(0.5, 0.5, f"no mistakes: all {len(pred)} test pictures were classified right",
                 ha="center", va="center", fontsize=12)
        return fig
    images = [np.asarray(split.images[i]) for i in worst]
    captions = [f"true: {classes[int(labels[i])]}\npred: {classes[int(pred[i])]} {float(conf[i]):.0%}"
                for i in worst]
    overlays = explain(worst) if explain is not None else None
    title = f"most confident mistakes: {len(worst)} of {len(wrong)} wrong out of {len(pred)}"
    if overlays is not None:  # each picture, then where the network saw the class it predicted
        images = [tile for pair in zip(images, overlays, strict=True) for tile in pair]
        captions = [text for i, c in zip(worst, captions, strict=True) for text in
                    (c, f"Grad-CAM of\n{classes[int(pred[i])]}")]
        title += " (each beside its heatmap)"
    return image_grid(images, captions, ncols=min(8, len(images)), lines=2, tile_inches=1.5,
                      colors=["firebrick"] * len(images), title=title)


def mistake_overlays(model: torch.nn.Module, split, transform, device, indices: list[int]) -> list | None:
    """Grad-CAM overlays (uint8 (3, S, S), imgclf.cam) of the class `model` predicts for the pictures
    `indices` of `split`, normalised by `transform`; None when the network has no spatial layer to explain
    (or anything else fails: the heatmaps are a bonus to mistakes.png)."""
    from imgclf.cam import class_maps, find_layer, overlay

    try:
        images = torch.as_tensor(np.stack([np.asarray(split.images[i]) for i in indices]))
        x = transform(images.to(device), train=False)
        maps = class_maps(model, find_layer(model, x[:1]), x)[0].cpu().numpy()
        top, left = (images.shape[2] - maps.shape[1]) // 2, (images.shape[3] - maps.shape[2]) // 2
        pictures = images.numpy()[:, :, top : top + maps.shape[1], left : left + maps.shape[2]]  # centre crop
        return [overlay(p.transpose(1, 2, 0), heat).transpose(2, 0, 1) for p, heat in zip(pictures, maps,
                                                                                          strict=True)]
    except Exception:  # noqa: BLE001 - no spatial layer, an unusual network: mistakes.png without heatmaps
        return None


def confident_mistakes(probs: torch.Tensor, labels: torch.Tensor, *, count: int) -> list[int]:
    """Indices of wrongly classified samples, the most confidently wrong first, at most `count`."""
    conf, pred = probs.max(dim=1)
    wrong = torch.nonzero(pred != labels[: len(pred)]).flatten()
    return wrong[conf[wrong].argsort(descending=True, stable=True)][:count].tolist()


def write_hparams(writer, hparams: dict, metrics: dict) -> None:
    """The run's hyper-parameters in TensorBoard's HPARAMS tab, in the run's own event file (not a sub-run,
    as SummaryWriter.add_hparams would make), tied to scalars the run already logs."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    clean = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
    for summary in hparams_summary(clean, metrics):
        # a private SummaryWriter method: the public add_hparams would write a separate sub-run
        writer._get_file_writer().add_summary(summary)  # noqa: SLF001


def flatten_config(cfg: dict, prefix: str = "", sep: str = ".") -> dict:
    """{'optim': {'lr': 0.05}} -> {'optim.lr': 0.05}: nested dicts as keys joined by `sep`."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{prefix}{key}{sep}", sep))
        else:
            out[f"{prefix}{key}"] = value
    return out


def write_calibration(run_dir: Path, fitted: dict[str, dict], shown: dict) -> list[Path]:
    """calibration.json (each checkpoint's `calibration.calibration_figures`, by file name) and reliability.png
    (of `shown`, best.pt's) in `run_dir`; returns the files written."""
    import json

    from imgclf.files import atomic_write_text
    from imgclf.visualize import reliability_figure, save_png

    run_dir = Path(run_dir)
    atomic_write_text(run_dir / "calibration.json", json.dumps(fitted, indent=1) + "\n")
    title = f"{run_dir.resolve().name}: reliability on the validation split"
    return [run_dir / "calibration.json", save_png(reliability_figure(shown, title=title), run_dir / "reliability.png")]


def report_after_training(run_dir: Path, *, cfg, data, task, model: torch.nn.Module, transform, device, autocast,
                          records: Sequence[dict], writer, result: dict | None = None) -> None:
    """Write the run's pictures from `result` (the last evaluation, with probabilities of the whole held-out
    split in order), or, without one, evaluate the final model once more in this process.
    A failure here is reported in one line and never loses the run."""
    try:
        from imgclf.engine import evaluate
        from imgclf.pipeline import eval_batch_size, eval_loader

        if result is None or "probs" not in result:
            loader = eval_loader(data.val, transform, batch_size=eval_batch_size(cfg.data, data.val), device=device)
            result = evaluate(model, loader, task=task, autocast=autocast, tta=cfg.run.tta, tta_shift=cfg.run.tta_shift,
                              keep_probs=True)
        explain = functools.partial(mistake_overlays, model, data.val, transform, device)
        write_run_report(run_dir, records=records, result=result, data=data, task=task, writer=writer,
                         hparams=flatten_config(cfg.to_dict()), explain=explain)
    except Exception as err:  # noqa: BLE001 - pictures are a bonus; the checkpoints are already saved
        print(f"imgclf: warning: no run pictures ({type(err).__name__}: {str(err).splitlines()[0][:160]})",
              file=sys.stderr)
