"""Embeddings (issue 25, point 2): what a trained network's classifier head reads, one vector per picture.

The vector of a picture is the input of the head that `imgclf.models` names for the checkpoint's family
(`Adapter.head`: the main classifier), caught by a forward pre-hook, so it is the same layer whatever the
network; a head that reads a feature map (squeezenet's 1x1 convolution) gets it averaged over the map. Data
sets are decoded through `sources.load_data` (and its cache) at the checkpoint's size and channels, loose
pictures through `transforms.load_image` as `predict` decodes them, and both normalised by the checkpoint's
mean and std: the pictures the network sees are the ones it saw in evaluation.

`embed_data` gives an `Embedded` (vectors, probabilities and rows of every split); `write_embeddings` writes it
as FILE.npy + FILE.csv; `nearest` is the cosine search `imgclf similar` runs.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from imgclf.checkpoint import load_checkpoint
from imgclf.config import DataConfig
from imgclf.errors import UserError, shown
from imgclf.files import atomic_write
from imgclf.models import adapter_for, check_fits, model_from_checkpoint
from imgclf.pipeline import eval_batch_size, place_model
from imgclf.predict import exported_kind, fetch
from imgclf.runtime import autocast_factory, resolve_device, resolve_precision
from imgclf.sources import load_data
from imgclf.tasks import DEFAULT, MULTILABEL, checkpoint_task
from imgclf.transforms import BadImage, BatchTransform, load_image


@dataclass
class Network:
    """A checkpoint's network ready to embed: the model (eval mode, on `device`), its main head, the
    normalisation, input size and channels, class names and task."""

    model: torch.nn.Module
    head: torch.nn.Module
    transform: BatchTransform
    size: int
    channels: int
    classes: list[str]
    task: object
    device: torch.device
    autocast: object
    source: str
    recorded: dict = field(default_factory=dict)  # the run's data options as its checkpoint recorded them (config.json's "data" section)


def open_network(path, *, device: str = "auto", precision: str = "fp32") -> Network:
    """The checkpoint at `path` (or a run folder's best, else last, checkpoint) as a Network. An exported model (ONNX, OpenVINO, TorchScript) has no head to
    read and a multi-label one no single label per row: each is one UserError line."""
    if exported_kind(path) is not None:
        raise UserError(f"{shown(path)} is an exported model; embeddings are read inside the network: give its "
                        f"imgclf checkpoint (.pt)")
    path = run_checkpoint(path)
    ckpt = load_checkpoint(path)
    if ckpt.get("task", DEFAULT) == MULTILABEL:
        raise UserError(f"{shown(path)} is a multi-label model; embed, similar, duplicates and review take "
                        f"single-label models for now")
    check_fits(ckpt)
    dev = resolve_device(device)
    model = place_model(model_from_checkpoint(ckpt), dev, channels_last=False)
    inp = ckpt["input"]
    return Network(model=model, head=adapter_for(ckpt["model"]["name"]).head(model)[0],
                   transform=BatchTransform(tuple(inp["mean"]), tuple(inp["std"])), size=inp["size"],
                   channels=inp["channels"], classes=list(ckpt["classes"]), task=checkpoint_task(ckpt), device=dev,
                   autocast=autocast_factory(dev, resolve_precision(precision, dev)), source=str(path),
                   recorded=dict((ckpt.get("config") or {}).get("data") or {}))


def run_checkpoint(path) -> Path:
    """`path` itself, or for a run folder its checkpoints/best.pt, else last.pt (as `imgclf.load` chooses)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    found = [path / "checkpoints" / name for name in ("best.pt", "last.pt")]
    return next((p for p in found if p.is_file()), found[0])


@torch.inference_mode()
def run_network(net: Network, images) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, C, size, size) pictures (an array, tensor or memmap; at most one batch) -> (vectors (N, D)
    float32, probabilities (N, classes) float32): the head's input and the task's activation of the output."""
    caught = []

    def catch(module, inputs):
        x = inputs[0].float()
        caught.append(x.mean(dim=tuple(range(2, x.ndim))) if x.ndim > 2 else x)  # a map's average

    handle = net.head.register_forward_pre_hook(catch)
    try:
        x = net.transform(torch.as_tensor(np.asarray(images)).to(net.device), train=False)
        with net.autocast():
            probs = net.task.activation(net.model(x).float())
    finally:
        handle.remove()
    if not caught:  # a network whose forward pass goes around the layer its family names as the head
        raise UserError(f"{shown(net.source)}: the classifier head {type(net.head).__name__} was not called in "
                        f"the forward pass; its input cannot be read")
    return caught[0].cpu().numpy().astype(np.float32), probs.cpu().numpy().astype(np.float32)


def run_split(net: Network, split, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """`run_network` over every picture of a `cache.Split`, in order, `batch` at a time."""
    vectors, probs = [], []
    for start in range(0, len(split), batch):
        v, p = run_network(net, split.images[start:start + batch])
        vectors.append(v)
        probs.append(p)
    return np.concatenate(vectors), np.concatenate(probs)


@dataclass
class Embedded:
    """Every picture of a data set's splits, in the order train, validation, test: `vectors` (N, D) float32,
    `probs` (N, classes) float32, and per row its file (`paths`; "DATA:split[i]" for a built-in data set),
    split name (train, the validation split's own name, test) and given label (`labels`, class indices).
    `pictures` holds the decoded splits (name, cache.Split) in that order, for `picture(i)`."""

    vectors: np.ndarray
    probs: np.ndarray
    paths: list[str]
    splits: list[str]
    labels: np.ndarray
    classes: list[str]
    pictures: list

    def picture(self, i: int) -> np.ndarray:
        """Row `i`'s picture as the network saw it: uint8 (C, size, size)."""
        for _, split in self.pictures:
            if i < len(split):
                return np.asarray(split.images[i])
            i -= len(split)
        raise IndexError(i)

    def rows(self, split: str) -> np.ndarray:
        """The row indices of the split named `split`."""
        return np.flatnonzero(np.asarray(self.splits) == split)


READ_AS_RECORDED = ("data_root", "labels", "val_fraction")  # what decides which pictures a run held out


def data_config(net: Network, data: str, **given) -> DataConfig:
    """How to read `data` for `net`: the DataConfig of the options `given` (None: not given), the others of
    READ_AS_RECORDED as the run recorded them when `data` is the run's own data set (so that its held-out
    split is the one it held out), else their defaults."""
    recorded = net.recorded.get("data")
    same = isinstance(recorded, str) and (recorded == data or Path(recorded).expanduser().resolve() ==
                                          Path(data).expanduser().resolve())
    values = {name: net.recorded.get(name) for name in READ_AS_RECORDED if same and name in net.recorded}
    values.update({name: value for name, value in given.items() if value is not None})
    return DataConfig(data=data, **values)


def load_for(net: Network, data_cfg: DataConfig):
    """`data_cfg`'s data set decoded as the network expects (`sources.ImageData`); classes that differ from
    the checkpoint's are one UserError line."""
    data = load_data(replace(data_cfg, img_size=net.size, augment="none", task=DEFAULT), img_size=net.size,
                     channels=net.channels)
    if data.classes != net.classes:
        raise UserError(f"{shown(net.source)} was trained for the classes {', '.join(net.classes[:5])}"
                        f"{', ...' if len(net.classes) > 5 else ''}, but {shown(data_cfg.data)} has "
                        f"{', '.join(data.classes[:5])}{', ...' if len(data.classes) > 5 else ''}")
    return data


def embed_data(net: Network, data_cfg: DataConfig, *, splits: tuple[str, ...] | None = None) -> Embedded:
    """Vectors and probabilities of every picture of `data_cfg.data` (or of the roles in `splits`: train,
    val, test) through `net`."""
    data = load_for(net, data_cfg)
    names = {"train": "train", "val": data.val_name, "test": "test"}
    parts = [(names[role], split) for role, split in data.splits().items() if splits is None or role in splits]
    vectors, probs, paths, where, labels = [], [], [], [], []
    for name, split in parts:
        v, p = run_split(net, split, eval_batch_size(data_cfg, split))
        vectors.append(v)
        probs.append(p)
        paths += split.files or [f"{data_cfg.data}:{name}[{i}]" for i in range(len(split))]
        where += [name] * len(split)
        labels.append(np.asarray(split.labels, dtype=np.int64))
    return Embedded(np.concatenate(vectors), np.concatenate(probs), [str(p) for p in paths], where,
                    np.concatenate(labels), list(data.classes), parts)


def decode_pictures(net: Network, paths: list[str]) -> np.ndarray:
    """Picture files (or URLs, "-") decoded as `predict` decodes them: uint8 (N, C, size, size); one that
    cannot be read is one UserError line."""
    out = []
    for path in paths:
        try:
            out.append(load_image(fetch(path), size=net.size, channels=net.channels).transpose(2, 0, 1))
        except BadImage as err:
            raise UserError(f"{shown(path)}: not a readable picture ({err})") from None
    return np.stack(out)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a zero row stays zero), for cosine similarity as a dot product."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def nearest(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` rows of `vectors` (N, D) most cosine-similar to `query` (D,), most similar first:
    (indices, similarities)."""
    sims = unit_rows(vectors) @ unit_rows(query[None, :].astype(np.float32))[0]
    order = np.argsort(-sims, kind="stable")[:k]
    return order, sims[order]


def write_embeddings(emb: Embedded, out) -> tuple[Path, Path]:
    """FILE.npy (the vectors, float32 (N, D)) and FILE.csv (a header path,split,label then one row per
    vector, row i of the CSV for row i of the array); `out` may end in .npy or .csv or neither."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".npy", ".csv") else out
    npy, table = stem.parent / f"{stem.name}.npy", stem.parent / f"{stem.name}.csv"

    def write_csv(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "split", "label"])
            writer.writerows(zip(emb.paths, emb.splits, (emb.classes[i] for i in emb.labels), strict=True))

    def write_npy(tmp):
        with open(tmp, "wb") as f:
            np.save(f, emb.vectors)

    atomic_write(npy, write_npy)
    atomic_write(table, write_csv)
    return npy, table


def embed_output(emb: Embedded, written: tuple[Path, Path]) -> tuple[str, str]:
    """`imgclf embed`'s output: what was written, and how many rows of which split."""
    counts = ", ".join(f"{emb.splits.count(name)} {name}" for name, _ in emb.pictures)
    npy, table = written
    return (f"wrote {shown(npy)} ({emb.vectors.shape[0]} x {emb.vectors.shape[1]} float32) and {shown(table)} "
            f"(path, split, label)\n", f"imgclf: embedded {counts} pictures\n")


def similar(net: Network, query: str, data_cfg: DataConfig, *, k: int = 5) -> tuple[Embedded, list[tuple]]:
    """The `k` pictures of `data_cfg.data` nearest (cosine) to the picture `query`: the embedded data set and
    (row, similarity) pairs, most similar first."""
    vector, _ = run_network(net, decode_pictures(net, [query]))
    emb = embed_data(net, data_cfg)
    rows, sims = nearest(emb.vectors, vector[0], k)
    return emb, list(zip(rows.tolist(), sims.tolist(), strict=True))


def similar_output(emb: Embedded, found: list[tuple]) -> tuple[str, str]:
    """`imgclf similar`'s table: rank, cosine similarity, split, label, path."""
    lines = ["rank  cosine  split  label  path"]
    for rank, (row, sim) in enumerate(found, start=1):
        lines.append(f"{rank:>4}  {sim:6.4f}  {emb.splits[row]}  {shown(emb.classes[emb.labels[row]])}  "
                     f"{shown(emb.paths[row])}")
    return "\n".join(lines) + "\n", ""
