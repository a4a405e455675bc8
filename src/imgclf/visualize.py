"""Pictures (notes 07-08, 14, 17-19): labelled image grids, training curves, confusion matrices, feature maps.

The drawing functions return a matplotlib `Figure` built with the object API (no pyplot, so no global figure
state and no GUI backend); `save_png` writes it and `figure_array` turns it into pixels for TensorBoard. What
`imgclf show` and `imgclf features` do is here too (`show`, `features`); their flags are in imgclf.cli.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from imgclf.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(**kwargs) -> Figure:
    """A matplotlib Figure; matplotlib is imported here, not at start-up (~0.3 s every command would pay)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _canvas(fig: Figure):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return FigureCanvasAgg(fig)

DPI = 100
TRAIN_COLOR, VAL_COLOR = "tab:blue", "tab:orange"


# ---------------------------------------------------------------- figures -> files / pixels

def save_png(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG (atomically: a reader never sees half a file)."""
    from imgclf.files import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: _canvas(fig).print_png(tmp))
    return path


def save_rgb_png(pixels: np.ndarray, path: Path) -> Path:
    """Write uint8 (H, W, 3) pixels, e.g. a `figure_array`, as a PNG (atomically): one rendering serves both
    the file and TensorBoard."""
    from PIL import Image

    from imgclf.files import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
    return path


def figure_array(fig: Figure) -> np.ndarray:
    """The rendered figure as uint8 (H, W, 3), as TensorBoard's add_image(dataformats='HWC') takes it."""
    canvas = _canvas(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# ---------------------------------------------------------------- image grids

def _tile(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 (C, H, W) -> (side, side, 3) for the mosaic; large pictures are shrunk to keep PNGs small. 16-bit
    pictures are shown at 8 bits, and more than 3 bands (imgclf.bands) by their first three."""
    image = np.array(image)
    x = torch.as_tensor(image.astype(np.float32) / 257.0 if image.dtype == np.uint16 else image).float().unsqueeze(0)
    if x.shape[1] not in (1, 3):
        x = x[:, :3] if x.shape[1] > 3 else x[:, :1]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (side, side):
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                                            align_corners=False)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def image_grid(images, labels: Sequence[str], *, ncols: int, title: str | None = None,
               colors: Sequence[str] | None = None, row_labels: Sequence[str] | None = None,
               tile_inches: float = 1.25, lines: int = 1) -> Figure:
    """A grid of uint8 (N, C, H, W) pictures, each with its label above it (`lines` lines of text).

    Drawn as one mosaic in one axes, which renders many pictures far faster than a subplot each.
    `row_labels` names each row on the left (one class per row in `imgclf show --per-class`).
    """
    images = list(images)
    if not images:
        raise UserError("no pictures to draw")
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    side = min(128, max(np.asarray(images[0]).shape[-2:]))
    gap = max(2, side // 16)
    band = round(side * 0.2 * lines) if lines else gap  # room for the label above each tile
    cell_w, cell_h = side + gap, side + band
    mosaic = np.full((nrows * cell_h, ncols * cell_w - gap, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        mosaic[r * cell_h + band : (r + 1) * cell_h, c * cell_w : c * cell_w + side] = _tile(img, side)
    left = 0.25 + 0.085 * max(len(label) for label in row_labels) if row_labels else 0.05  # inches of text
    width_in = ncols * tile_inches
    if title:  # wrapped to the figure's width: about 10 pixels a character at 12 points
        title = textwrap.fill(title, width=max(20, int((width_in + left) * DPI / 10)))
    head = 0.25 + 0.22 * title.count("\n") + 0.2 if title else 0.05
    height_in = width_in * mosaic.shape[0] / mosaic.shape[1]
    fig = _figure(figsize=(width_in + left + 0.05, height_in + head + 0.05), dpi=DPI)
    W, H = fig.get_size_inches()
    ax = fig.add_axes((left / W, 0.05 / H, width_in / W, height_in / H))
    ax.imshow(mosaic, interpolation="nearest" if side <= 64 else "antialiased")
    ax.set_axis_off()
    fontsize = 8 if lines == 1 else 7
    for i, label in enumerate(labels):
        r, c = divmod(i, ncols)
        ax.text(c * cell_w + side / 2, r * cell_h + band - 1, label, ha="center", va="bottom", fontsize=fontsize,
                color=colors[i] if colors else "black", clip_on=False)
    for r, label in enumerate(row_labels or []):
        ax.text(-gap * 2, r * cell_h + band + side / 2, label, ha="right", va="center", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=12, y=1 - 0.08 / H, va="top")
    return fig


# ---------------------------------------------------------------- training curves and confusion matrix

def curves_figure(records: Sequence[dict], *, title: str = "training curves") -> Figure:
    """Loss and accuracy per epoch, train and validation, from metrics.jsonl records; a figure is drawn at
    the epochs whose records have it (--val-every evaluates only some)."""
    fig = _figure(figsize=(10, 4), dpi=DPI)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, key, label in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy (%)")):
        scale = 100 if key == "acc" else 1
        for split, color in (("train", TRAIN_COLOR), ("val", VAL_COLOR)):
            points = [(r["epoch"], r[f"{split}_{key}"] * scale) for r in records if f"{split}_{key}" in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=color, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label.split(" ")[0])
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    scored = [r for r in records if "val_acc" in r]
    if scored:
        best = max(scored, key=lambda r: r["val_acc"])
        acc_ax.annotate(f"best {best['val_acc']:.1%} (epoch {best['epoch']})", (best["epoch"], best["val_acc"] * 100),
                        textcoords="offset points", xytext=(0, -16), ha="center", fontsize=9, color=VAL_COLOR)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_figure(confusion, classes: Sequence[str], *, title: str = "confusion matrix") -> Figure:
    """Counts with true class in rows and predicted class in columns; the diagonal is what was right."""
    cm = np.asarray(confusion, dtype=np.int64)
    k = len(classes)
    side = min(20.0, max(4.5, 0.45 * k + 2.5))
    fig = _figure(figsize=(side + 1, side), dpi=DPI)
    ax = fig.add_subplot()
    image = ax.imshow(cm, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if k <= 60:
        ax.set_xticks(range(k), classes, rotation=45 if k > 2 else 0, ha="right" if k > 2 else "center",
                      fontsize=9 if k <= 20 else 6)
        ax.set_yticks(range(k), classes, fontsize=9 if k <= 20 else 6)
    if k <= 25:
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=9 if k <= 12 else 6,
                        color="white" if cm[i, j] > threshold else "black")
    total = cm.sum()
    acc = np.trace(cm) / total if total else 0.0
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}: {acc:.1%} of {total} right")
    fig.tight_layout()
    return fig


def per_class_figure(accuracies: Sequence[float], classes: Sequence[str], name: str = "accuracy") -> Figure:
    """One bar per class of its figure `name` (accuracy; a multi-label run's average precision), in %."""
    fig = _figure(figsize=(max(5, 0.35 * len(classes) + 2), 3.5), dpi=DPI)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(classes)), [a * 100 for a in accuracies], color=VAL_COLOR)
    if len(classes) <= 30:
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45 if len(classes) > 4 else 0, ha="right", fontsize=8)
    ax.set_ylim(0, 108)  # room for the label of a bar at 100
    ax.set_ylabel(f"{name} (%)")
    ax.set_title(f"{name} per class")
    fig.tight_layout()
    return fig


def reliability_figure(figures: dict, *, title: str = "reliability") -> Figure:
    """The reliability diagram of `calibration.calibration_figures`: for each confidence bin, the share of
    its pictures classified right (bars) against the diagonal of perfect calibration, before and after
    temperature scaling side by side, with each side's ECE; the bins' picture counts in grey beneath."""
    fig = _figure(figsize=(9, 4.6), dpi=DPI)
    for i, when in enumerate(("before", "after")):
        bins = figures[f"reliability_{when}"]
        edges = np.asarray(bins["edges"])
        width, left, count = np.diff(edges), edges[:-1], np.asarray(bins["count"], dtype=float)
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
        filled = count > 0
        ax.bar(left[filled], np.asarray(bins["accuracy"])[filled], width=width[filled], align="edge",
               color=VAL_COLOR if when == "after" else TRAIN_COLOR, edgecolor="black", lw=0.5, label="accuracy")
        ax.bar(left, count / max(count.max(), 1) * 0.25, width=width, align="edge", color="lightgrey",
               edgecolor="grey", lw=0.3, label="pictures (scaled)")
        t = 1.0 if when == "before" else figures["temperature"]
        ax.set_title(f"{when}: T = {t:.3g}, ECE {figures[f'ece_{when}']:.4f}", fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top probability)")
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{title} ({figures['count']} pictures, {figures['bins']} bins)")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- feature maps (notes 17-19)

def feature_maps_figure(activation: torch.Tensor, *, title: str, max_channels: int = 64) -> Figure:
    """Channels of one activation (C, H, W) as a grid; each channel scaled to its own min..max."""
    act = activation.detach().float().cpu()
    shown = act[:max_channels]
    lo = shown.amin(dim=(1, 2), keepdim=True)
    hi = shown.amax(dim=(1, 2), keepdim=True)
    scaled = ((shown - lo) / (hi - lo).clamp_min(1e-12) * 255).round().to(torch.uint8)  # (C, H, W)
    n = scaled.shape[0]
    ncols = math.ceil(math.sqrt(n))
    cmap = _viridis()
    images = [cmap[ch].permute(2, 0, 1).numpy() for ch in scaled.long()]  # (3, H, W) each
    more = f", first {n} shown" if act.shape[0] > n else ""
    shape = "x".join(map(str, act.shape))
    return image_grid(images, [str(i) for i in range(n)], ncols=ncols, tile_inches=max(0.6, 8 / ncols),
                      title=f"{title}  ({shape}{more}; each channel scaled to its own range)")


def _viridis() -> torch.Tensor:
    from matplotlib import colormaps

    return torch.from_numpy((colormaps["viridis"](np.arange(256))[:, :3] * 255).astype(np.uint8))


# ---------------------------------------------------------------- `imgclf show`

def split_names(data) -> dict[str, str]:
    """Each split's role -> the name it has in this data set (the validation split may be called test)."""
    return {"train": "train", "val": data.val_name, **({"test": "test"} if data.test is not None else {})}


def class_counts(data) -> list[tuple]:
    """(class, count in train, count in val[, count in test]) for each class (multi-label: the pictures that
    show it)."""
    columns = [(split.labels.sum(0) if split.labels.ndim == 2 else
                torch.bincount(split.labels, minlength=len(data.classes))).tolist() for split in data.splits().values()]
    return list(zip(data.classes, *columns, strict=True))


def pick_samples(labels: torch.Tensor, *, num_classes: int, per_class: int | None, random: int | None,
                 seed: int) -> list[int]:
    """Indices of the pictures to draw: the first `per_class` of each class in a seeded shuffle, or `random`."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    if random is not None:
        return order[:random].tolist()
    shuffled = labels[order]
    picks = []
    for c in range(num_classes):
        picks += order[shuffled == c][:per_class].tolist()
    return picks


def class_count_table(data) -> str:
    """Pictures per class in each split of `data` (an ImageData), with totals, as a text table."""
    rows = class_counts(data)
    width = max(8, *(len(row[0]) for row in rows))
    lines = [f"{'class':<{width}}" + "".join(f"  {name:>7}" for name in split_names(data).values())]
    lines += [f"{row[0]:<{width}}" + "".join(f"  {n:>7}" for n in row[1:]) for row in rows]
    lines.append(f"{'total':<{width}}" + "".join(f"  {len(split):>7}" for split in data.splits().values()))
    lines.append(f"{len(data.classes)} classes, pictures {data.channels}x{data.img_size}x{data.img_size}")
    return "\n".join(lines)


def samples_figure(data, *, name: str, split: str = "train", per_class: int | None = None,
                   random: int | None = None, seed: int = 0) -> Figure:
    """A grid of pictures of `data` (an ImageData called `name`) labelled with their classes: `per_class` of
    each class, one row per class, or `random` ones; by default 8 per class, or 64 when there are over 20
    classes."""
    if split == "test" and data.test is None:  # the test split serves as validation, or there is none
        split = "val"
    chosen, split_name = data.splits()[split], split_names(data)[split]
    multilabel = chosen.labels.ndim == 2  # (N, classes) 0/1: a picture is drawn once, captioned with all its labels
    if multilabel and random is None:
        per_class, random = None, min(64, 8 * (per_class or 8))
    if per_class is None and random is None:
        per_class, random = (8, None) if len(data.classes) <= 20 else (None, 64)
    idx = pick_samples(chosen.labels, num_classes=len(data.classes), per_class=per_class, random=random,
                       seed=seed)
    images = [np.asarray(chosen.images[i]) for i in idx]
    names = [" ".join(data.classes[c] for c in chosen.labels[i].nonzero().flatten().tolist()) or "(none)"
             if multilabel else data.classes[int(chosen.labels[i])] for i in idx]
    if per_class is None:
        return image_grid(images, names, ncols=min(8, len(images)),
                          title=f"{name}: {len(images)} random {split_name} pictures")
    counts = class_counts(data)
    grid, labels, row_labels = [], [], []  # one row per class, labelled on the left; short rows padded with blanks
    blank = np.full_like(images[0], 255)
    for c, class_name in enumerate(data.classes):
        mine = [img for img, n in zip(images, names, strict=True) if n == class_name]
        if mine:
            grid += mine + [blank] * (per_class - len(mine))
            labels += [""] * per_class
            row_labels.append(f"{class_name} ({counts[c][1 + list(split_names(data)).index(split)]})")
    return image_grid(grid, labels, ncols=per_class, row_labels=row_labels, lines=0,
                      title=f"{name}: {per_class} {split_name} pictures per class")


def show(data_cfg, *, per_class: int | None = None, random: int | None = None, split: str = "train",
         out="samples.png", seed: int = 0) -> tuple[str, Path]:
    """`imgclf show`: load the data set of `data_cfg` (a DataConfig), draw `samples_figure` to the PNG `out`.
    Returns the `class_count_table` and the PNG written."""
    from imgclf.sources import imbalance_warning, load_data

    data = load_data(replace(data_cfg, augment="none"))  # every split at the model's side
    fig = samples_figure(data, name=_data_name(data_cfg.data), split=split, per_class=per_class, random=random,
                         seed=seed)
    warning = imbalance_warning(data.train.labels, data.classes) if data.train.labels.ndim == 1 else None
    return class_count_table(data) + (f"\n{warning}" if warning else ""), save_png(fig, Path(out))


def _data_name(data: str) -> str:
    return Path(data).name or data


# ---------------------------------------------------------------- `imgclf features`

ACTIVATIONS = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.PReLU, torch.nn.ELU, torch.nn.SELU,
               torch.nn.CELU, torch.nn.GELU, torch.nn.SiLU, torch.nn.Mish, torch.nn.Sigmoid, torch.nn.Tanh,
               torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.Softplus)
POOLS = (torch.nn.modules.pooling._MaxPoolNd, torch.nn.modules.pooling._AvgPoolNd)


def feature_maps(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[tuple[str, str, torch.Tensor]], torch.Tensor]:
    """Outputs (C, H, W) of every convolution, activation and pooling layer for one input (1, C, H, W),
    in the order they run, as (name, layer type, tensor); and the model's logits."""
    found: list[tuple[str, str, torch.Tensor]] = []
    names = {m: n for n, m in model.named_modules()}
    calls: dict[str, int] = {}

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            name = names[module] or type(module).__name__
            calls[name] = calls.get(name, 0) + 1
            label = name if calls[name] == 1 else f"{name}#{calls[name]}"
            found.append((label, type(module).__name__, output[0].detach().clone()))  # clone: ReLU may be in-place

    kinds = (torch.nn.modules.conv._ConvNd, *ACTIVATIONS, *POOLS)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            logits = model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return found, logits


def _checkpoint_or_random(target: str, *, input_shape: tuple[int, int, int], seed: int) -> dict:
    """The checkpoint at `target`, or for a model name a stand-in with seeded random weights for an input of
    `input_shape` (as note 17 looks at an untrained convolution), inputs scaled to -1..1 and no class names."""
    from imgclf.checkpoint import load_checkpoint
    from imgclf.models import build_model

    path = Path(target).expanduser()
    if path.is_file() or path.suffix in (".pt", ".pth") or "/" in target:
        return load_checkpoint(path)
    channels, size, width = input_shape
    if size != width:
        raise UserError(f"--input-size must be square, got {'x'.join(map(str, input_shape))}")
    torch.manual_seed(seed)
    model = build_model(target, num_classes=10, in_channels=channels, img_size=size)
    return {"model": {"name": target}, "model_object": model, "classes": [],
            "input": {"channels": channels, "size": size, "mean": [0.5] * channels, "std": [0.5] * channels}}


def _read_picture(path: Path, inp: dict) -> np.ndarray:
    """The picture at `path` as the model sees it: uint8 (C, size, size)."""
    from imgclf.transforms import BadImage, input_decoding, load_image

    if not path.is_file():
        raise UserError(f"no such picture: {path}")
    try:
        return load_image(path, size=inp["size"], channels=inp["channels"],
                          decoding=input_decoding(inp)).transpose(2, 0, 1)
    except BadImage as err:
        raise UserError(f"{path} is not a readable picture ({err})") from None


@dataclass(frozen=True)
class FeaturesWritten:
    image: Path
    label: str  # the model's prediction, or that its weights are random
    layers: list[tuple[str, str, tuple[int, ...]]]  # (name, layer type, output shape) in the order they ran
    out: Path  # the folder of the PNGs and TensorBoard events


def features(target: str, image, *, input_shape: tuple[int, int, int] = (3, 32, 32), seed: int = 0, out=None,
             max_channels: int = 64) -> FeaturesWritten:
    """`imgclf features`: run the picture `image` through the checkpoint `target` (or, for a model name,
    random weights seeded by `seed` for `input_shape`) and draw each convolution, activation and pooling
    layer's output, at most `max_channels` channels each, as PNGs and TensorBoard images in `out`
    (default features/<picture name>)."""
    from imgclf.models import model_from_checkpoint
    from imgclf.tasks import checkpoint_task
    from imgclf.transforms import BatchTransform

    ckpt = _checkpoint_or_random(target, input_shape=input_shape, seed=seed)
    inp = ckpt["input"]
    image_path = Path(image).expanduser()
    picture = _read_picture(image_path, inp)
    model = model_from_checkpoint(ckpt) if "state_dict" in ckpt else ckpt["model_object"]
    x = BatchTransform(tuple(inp["mean"]), tuple(inp["std"]))(torch.from_numpy(picture.copy())[None], train=False)
    maps, logits = feature_maps(model, x)
    if not maps:
        raise UserError(f"{ckpt['model']['name']} has no convolution, activation or pooling layers to draw")
    task = checkpoint_task(ckpt)
    [(top, p)] = task.decode(task.activation(logits.float())[0], 1)
    label = (f"predicted {ckpt['classes'][top]} {p:.1%}" if ckpt["classes"]
             else f"random weights (seed {seed}), no prediction")
    folder = Path(out) if out else Path("features") / image_path.stem
    title = f"{image_path.name} as the model sees it ({inp['channels']}x{inp['size']}x{inp['size']})"
    _write_feature_maps(folder, picture, label, title, maps, max_channels=max_channels)
    return FeaturesWritten(image_path, label, [(name, kind, tuple(act.shape)) for name, kind, act in maps], folder)


def _write_feature_maps(out: Path, picture: np.ndarray, label: str, title: str, maps, *, max_channels: int) -> None:
    """00_input.png and one PNG per layer in `out`, and the same pictures as TensorBoard images."""
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(out))
    try:
        pixels = figure_array(image_grid([picture], [label], ncols=1, tile_inches=3, title=title))
        save_rgb_png(pixels, out / "00_input.png")
        writer.add_image("features/00 input", pixels, 0, dataformats="HWC")
        for i, (name, kind, act) in enumerate(maps, start=1):
            fig = feature_maps_figure(act, title=f"{i}. {name} ({kind})", max_channels=max_channels)
            stem = f"{i:02d}_{name.replace('.', '_').replace('#', '_')}_{kind}"
            pixels = figure_array(fig)
            save_rgb_png(pixels, out / f"{stem}.png")
            writer.add_image(f"features/{i:02d} {name} ({kind})", pixels, 0, dataformats="HWC")
    finally:
        writer.close()


def features_output(done) -> tuple[str, str]:
    """What `imgclf features` prints: (standard output, standard error): the picture's label and one line per
    layer drawn; where the PNGs and the TensorBoard events are."""
    lines = [f"{done.image.name}: {done.label}"]
    lines += [f"{i:3d}. {name:<24} {kind:<12} {'x'.join(map(str, shape))}"
              for i, (name, kind, shape) in enumerate(done.layers, start=1)]
    return "\n".join(lines) + "\n", (f"wrote {len(done.layers) + 1} PNGs and TensorBoard events to {done.out} "
                                      f"(tensorboard --logdir {done.out})\n")
