"""Using a trained model (note 31): predict on pictures. Needs only the checkpoint."""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib
import importlib.util
import io
import json
import math
import os
import stat
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgclf import bands, formats
from imgclf.calibration import is_unknown, stored_reject_below
from imgclf.checkpoint import load_checkpoint
from imgclf.errors import UserError, shown
from imgclf.files import not_regular
from imgclf.models import base_fits, model_from_checkpoint
from imgclf.runtime import autocast_factory, resolve_device, resolve_precision
from imgclf.sources import PictureWalk, is_image_file
from imgclf.tasks import MULTILABEL, Task, stored_task
from imgclf.transforms import BadImage, BatchTransform, input_decoding


@dataclass
class Prediction:
    path: str
    labels: list[str] = field(default_factory=list)  # top-k (multi-label: every one over its threshold), most probable first
    probs: list[float] = field(default_factory=list)
    error: str | None = None  # why this file could not be predicted
    scores: dict[str, float] | None = None  # multi-label, or rejecting: every class's probability
    unknown: bool | None = None  # rejecting (--reject-below): whether the top probability is under the cut


# The most a logit of a network computed under bf16 autocast is taken to differ from its fp32 value, in the
# logits' own units (see `recheck_rows`; a single-label top-1 is re-checked under a margin of twice this).
# bf16 keeps 8 bits of mantissa (relative rounding 2**-9 per operation), accumulated through the network:
# measured over real photos (benchmarks/predict_margins.py, an AMX Xeon), the largest |bf16 - fp32| logit was
# 0.116 on 1,000 pet photos (EfficientNet-Lite0 fine-tuned, 160 px; median 0.013, 99th percentile 0.072) and
# 0.066 on 398 ants/bees photos (Lite0 at 96 px), 0.076 on the 2,000 pet test photos (resnet18 at 224, one
# epoch, logits up to 22.6); relative to the largest logit it is no steadier (up to 9x
# the logit itself near 0), so the bound is absolute: about twice the largest error seen. An empirical bound,
# not a proof: a network with much larger logits or deeper accumulation may exceed it.
BF16_LOGIT_ERROR = 0.25


def recheck_rows(logits: torch.Tensor, error: float, task: Task, reject_below: float | None = None) -> torch.Tensor:
    """Which pictures (rows of `logits`, computed in reduced precision) could be answered otherwise in fp32
    if each of their logits may be off by up to `error`: single-label, those whose top-1 logit leads the
    second by under 2 * error, and with a `reject_below` cut those whose log top probability (at the task's
    temperature) is within 2 * error / temperature of log(cut) (both move at most that much); multi-label,
    those with a class whose logit is within `error` of its threshold's logit; any row that is not finite.
    A bool tensor (N,)."""
    again = ~logits.isfinite().all(1)
    if task.name == MULTILABEL:
        cut = task.thresholds if task.thresholds is not None else torch.full((logits.shape[1],), 0.5)
        return again | ((logits - cut.logit().to(logits)).abs() < error).any(1)  # thresholds 0 and 1: never near
    if logits.shape[1] < 2:
        return again
    top2 = logits.topk(2, dim=1).values
    again |= top2[:, 0] - top2[:, 1] < 2 * error
    if reject_below is not None and reject_below > 0:
        t = getattr(task, "temperature", 1.0)
        log_top = -torch.logsumexp((logits - top2[:, :1]) / t, dim=1)  # log of the top calibrated probability
        again |= (log_top - math.log(reject_below)).abs() < 2 * error / t
    return again


class Predictor:
    """A model with its preprocessing and class names, rebuilt from a checkpoint alone."""


    def __init__(self, ckpt: dict, *, device: str = "auto", precision: str = "fp32",
                 logit_error: float = BF16_LOGIT_ERROR):
        """`precision` as resolve_precision reads it: "fp32" computes in float32 alone; "auto" (bf16 where the
        device computes it natively, else fp32), "bf16" and "fp16" compute under autocast and then again in
        fp32 each picture whose answer the reduced precision could have changed (`recheck_rows`, with
        `logit_error` the most a logit is taken to be off by: 0 trusts the reduced precision, inf recomputes
        every picture). What that guarantees is said in `probabilities`."""
        self.device = resolve_device(device)
        name, size = ckpt["model"]["name"], ckpt["input"]["size"]
        builder = _torchvision_builder_alone(name) if base_fits(name, size) else None  # torchvision imported once
        model = _fold_batchnorm(model_from_checkpoint(ckpt, base_builder=builder))
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.classes: list[str] = ckpt["classes"]
        # the tasks.Task whose activation `probabilities` gives and whose decode labels them (with its thresholds)
        self.task: Task = stored_task(ckpt, self.classes, "the checkpoint")
        self.reject_below: float | None = stored_reject_below(ckpt)  # see `reject`
        self.model_name: str = name
        inp = ckpt["input"]
        self.size, self.channels, self.depth = inp["size"], inp["channels"], inp.get("depth", 8)
        self.decoding = input_decoding(inp)  # the resize and crop evaluation used (a pretrained network's)
        self.transform = BatchTransform(tuple(inp["mean"]), tuple(inp["std"]))
        self.dtype = resolve_precision(precision, self.device)  # the arithmetic of the first pass
        self.autocast = autocast_factory(self.device, self.dtype)
        self.logit_error = logit_error
        self.rechecked = 0  # pictures computed again in fp32 so far (reduced precision only)

    @classmethod
    def from_checkpoint(cls, path, **kwargs) -> Predictor:
        return cls(load_checkpoint(path), **kwargs)

    @classmethod
    def from_path(cls, path, *, device: str = "auto", precision: str | None = None,
                  runtime: str = "auto") -> Predictor:
        """A checkpoint, or a model exported by `imgclf export` (.onnx or OpenVINO .xml, run by the fastest
        runtime installed, see `choose_runtime`; TorchScript). `device` is for checkpoints (exported graphs run
        on the CPU). `precision` None: "auto" for a checkpoint (bf16 where native, answers checked in fp32,
        see `probabilities`), "fp32" for an exported model (its probabilities as exported)."""
        kind = exported_kind(path)
        if kind is None:
            return cls.from_checkpoint(path, device=device, precision=precision or "auto")
        return ExportedPredictor(path, kind, runtime=runtime, precision=precision or "fp32")

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, size, size) (uint16 for 16-bit pictures) -> class probabilities (N, classes).

        In fp32, float32 throughout. In reduced precision (bf16, fp16) the probabilities differ from fp32's
        by that precision's rounding (about 1e-2 relative for bf16), but the answers are fp32's: every picture
        whose answer a logit error of up to `logit_error` could change is computed again in fp32 and answered
        from that (`recheck_rows`: the top-1 class; multi-label, each class's side of its threshold; with a
        reject cut, the side of it). That holds for every picture whose reduced-precision logits are within
        `logit_error` of fp32's: BF16_LOGIT_ERROR says how far it was measured to be. The order of the
        labels after the first (top-k) is not checked. fp32 itself is equal only up to float rounding from
        batch to batch (its algorithms depend on the batch's size): a tie within ~1e-6 may go either way."""
        x = self.transform(images.to(self.device), train=False, memory_format=torch.channels_last)
        with self.autocast():
            logits = self.model(x).float()
        if self.dtype != torch.float32:
            again = recheck_rows(logits, self.logit_error, self.task, self.reject_below)
            if again.any():  # outside autocast: the same weights in float32
                logits[again] = self.model(x[again].contiguous(memory_format=torch.channels_last)).float()
                self.rechecked += int(again.sum())
        return self.task.activation(logits).cpu()

    def predict(self, paths: list[str], *, topk: int = 5, batch_size: int = 64) -> list[Prediction]:
        """Predict every picture in `paths` (files and folders, in order); unreadable ones carry `error`."""
        return list(self.iter_predict(paths, topk=topk, batch_size=batch_size))

    def iter_predict(self, paths: list[str], *, topk: int = 5, batch_size: int = 64) -> Iterator[Prediction]:
        """As `predict`, yielding each batch's answers as soon as they are computed.

        The first batch is the first picture alone, so that its answer comes at once; the next batch is
        decoded (in threads) while the model runs on the current one."""
        files = expand_paths(paths)
        bounds = [0, *range(min(1, len(files)), len(files), max(1, batch_size)), len(files)]
        chunks = [files[a:b] for a, b in pairwise(bounds) if b > a]
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))  # Pillow decodes without the GIL
        try:
            pending = [pool.submit(self._decode, f) for f in chunks[0]] if chunks else []
            for i, chunk in enumerate(chunks):
                decoded = [future.result() for future in pending]
                pending = [pool.submit(self._decode, f) for f in chunks[i + 1]] if i + 1 < len(chunks) else []
                good = [d for d in decoded if isinstance(d, np.ndarray)]
                rows = iter(self.probabilities(torch.from_numpy(np.stack(good))) if good else [])
                for path, item in zip(chunk, decoded, strict=True):
                    if isinstance(item, str):
                        yield Prediction(path, error=item)
                        continue
                    yield self._answer(path, next(rows), topk)  # rows come in the order of the decoded pictures
        finally:  # also when the caller stops early: the prefetched batch is not decoded in vain
            pool.shutdown(wait=True, cancel_futures=True)

    def _answer(self, path: str, row: torch.Tensor, topk: int) -> Prediction:
        """One picture's Prediction from its probabilities `row`, decoded by the task; with a `reject_below`
        cut (single-label), every class's score and whether the picture is "unknown"."""
        labels = self.task.decode(row, topk)
        rejecting = self.reject_below is not None and self.task.name != MULTILABEL
        scores = dict(zip(self.classes, row.tolist(), strict=True)) if self.task.name == MULTILABEL or rejecting \
            else None
        unknown = is_unknown(float(row.max()), self.reject_below) if rejecting and len(row) else None
        return Prediction(path, [self.classes[j] for j, _ in labels], [p for _, p in labels], scores=scores,
                          unknown=unknown)

    def reject(self, below: float | None) -> None:
        """Answer "unknown" for a picture whose top (calibrated) probability is under `below` (None: keep the
        model's stored cut, if any). One UserError line for a multi-label model."""
        if below is None:
            return
        if self.task.name == MULTILABEL:
            raise UserError("--reject-below is for single-label models; a multi-label model's thresholds already "
                            "answer no label")
        self.reject_below = below

    def _decode(self, path: str) -> np.ndarray | str:
        try:
            source = fetch(path)
        except BadImage as err:
            return str(err)
        try:
            return self.prepare(source)
        except BadImage as err:  # Pillow names a file object by its repr: the user knows it as "-" or the URL
            return f"not a readable picture ({str(err).replace(' ' + repr(source), '')})"

    def prepare(self, picture) -> np.ndarray:
        """One picture (a path, a file object, or a decoded PIL image such as a video's frame) as the model
        takes it: uint8 (C, size, size) (uint16 at depth 16), prepared as the checkpoint says (`bands.decode`:
        `load_image` for 8-bit grey or RGB). BadImage if it cannot."""
        return bands.decode(picture, size=self.size, channels=self.channels, depth=self.depth,
                            decoding=self.decoding).transpose(2, 0, 1)


class ExportedPredictor(Predictor):
    """A model exported by `imgclf export` (any format the table imgclf.formats.FORMATS can read back: ONNX,
    OpenVINO IR, TorchScript): preprocessing and class names are inside it (its `imgclf` metadata, checked by
    `formats.check_metadata`), so it needs neither the checkpoint nor the network's code. It runs in
    `runtime`, by default the fastest installed (`choose_runtime`): ONNX files and OpenVINO IR in OpenVINO
    or ONNX Runtime, TorchScript archives in torch (a TorchScript archive is a program: load only your own).
    `precision` "fp32" keeps OpenVINO in float32 even where the CPU has bf16 (probabilities as exported);
    "auto" lets it choose."""

    def __init__(self, path, kind, *, runtime: str = "auto", precision: str = "fp32"):
        fmt = formats.FORMATS[kind] if isinstance(kind, str) else kind
        path = Path(path).expanduser()
        formats.check_files(fmt, path)
        self.runtime = formats.choose_runtime(fmt, runtime, path)
        self._run, meta = fmt.open(path, self.runtime, precision=precision)
        formats.check_metadata(meta, path)
        self.path, self.kind, self.classes, self.metadata = path, fmt.name, meta["classes"], meta
        self.task = stored_task(meta, self.classes, shown(path))
        self.reject_below = stored_reject_below(meta, shown(path))
        self.model_name = meta["model"]["name"]
        self.size, self.channels = meta["input"]["size"], meta["input"]["channels"]
        self.depth = meta["input"].get("depth", 8)
        self.decoding = input_decoding(meta["input"])

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, size, size) -> class probabilities (N, classes), computed by the exported graph;
        UserError when the graph gives another number of outputs than its metadata names classes."""
        probs = torch.from_numpy(np.asarray(self._run(np.ascontiguousarray(images.numpy())), dtype=np.float32))
        if probs.ndim != 2 or probs.shape[1] != len(self.classes):
            raise UserError(f"{shown(self.path)} gives outputs of shape {tuple(probs.shape[1:])} per picture, but its "
                            f"metadata names {len(self.classes)} classes: it was changed after export")
        return probs


def exported_kind(path) -> str | None:
    """The name of the format (formats.FORMATS) of a file `imgclf export` wrote and predict can read back
    ("onnx", "openvino" for an IR .xml, "torchscript"), else None (a checkpoint, or not a model)."""
    fmt = formats.format_of(path)
    return None if fmt is None else fmt.name


def choose_runtime(kind: str, requested: str = "auto", path=None) -> str:
    """The runtime that runs an exported file of format `kind`: `requested`, or for "auto" the fastest
    installed. OpenVINO IR needs OpenVINO. An ONNX graph runs in OpenVINO where it is installed, else in ONNX
    Runtime: on an AVX512-VNNI Xeon, in two runs, OpenVINO ran the same .onnx files 1.3-2x as fast at batch
    64 (resnet18 at 224 int8, tutorial_cnn fp32 and int8), tied on resnet18 fp32 (0.96-1.09x), and answered
    resnet18's single pictures sooner (1.1-1.4x); only the tiny tutorial_cnn's single pictures came sooner
    from ONNX Runtime, by 0.1-0.2 ms (benchmarks/RESULTS.md). The order is each format's `runtimes`."""
    return formats.choose_runtime(formats.FORMATS[kind], requested, path)


def print_predictions(results, style: str = "text", out=None, err=None) -> bool:
    """`imgclf predict`'s output: each Prediction of `results` as soon as it comes, on `out` (default stdout)
    as "text" (one line a picture: path, then label and probability pairs), "json" (one object a line) or
    "csv" (a header row, then one row per label); failures, and answers that are not numbers (NaN, infinite:
    never printed, nor invalid JSON), one line each on `err` (default stderr). True when any failed.
    A Prediction with `unknown` set (--reject-below) prints "unknown (best: ...)" as text, "unknown": true or
    false beside every class's "scores" in JSON, and when unknown a CSV row of rank 0 labelled unknown."""
    out, err = out or sys.stdout, err or sys.stderr
    writer = csv.writer(out) if style == "csv" else None
    if writer:
        writer.writerow(["path", "rank", "label", "probability"])
    failed = False
    for r in results:
        if not r.error and not all(math.isfinite(p) for p in [*r.probs, *(r.scores or {}).values()]):
            r.error, r.labels, r.probs = "the model's output is not a number (NaN or infinite)", [], []
        failed = failed or bool(r.error)
        if r.error:
            print(f"imgclf: {shown(r.path)}: {shown(str(r.error))}", file=err)
        elif style == "json":
            scores = {} if r.scores is None else {"scores": {k: round(p, 6) for k, p in r.scores.items()}}
            print(json.dumps({"path": r.path, "top": [{"label": lab, "probability": round(p, 6)}
                                                      for lab, p in zip(r.labels, r.probs, strict=True)],
                              **scores, **({} if r.unknown is None else {"unknown": r.unknown})}), file=out)
        elif writer:
            if r.unknown:  # a row of its own before the ranked ones, which stay as they are
                writer.writerow([shown(r.path), 0, "unknown", f"{r.probs[0]:.6f}"])
            for rank, (lab, p) in enumerate(zip(r.labels, r.probs, strict=True), start=1):
                writer.writerow([shown(r.path), rank, shown(lab), f"{p:.6f}"])
        else:
            tops = "  ".join(f"{shown(lab)} {p:.1%}" for lab, p in zip(r.labels, r.probs, strict=True))
            if r.scores is not None and not r.labels:
                tops = "(no label over its threshold)"
            elif r.unknown:
                tops = f"unknown (best: {tops})"
            print(f"{shown(r.path)}  {tops}", file=out)  # one line, whatever bytes the file name or an exported model's class holds
        out.flush()  # each answer as soon as it is known, also into a pipe
    return failed


MAX_DOWNLOAD = 50 << 20  # bytes of one picture fetched from a URL or read from standard input
DOWNLOAD_TIMEOUT = 20.0  # seconds for the whole of one download


def fetch(path: str):
    """What `load_image` reads for one input: a file's path, the bytes of an http(s) URL (at most
    MAX_DOWNLOAD, DOWNLOAD_TIMEOUT seconds in all), or standard input for "-" (at most MAX_DOWNLOAD).
    BadImage says why it cannot."""
    if path == "-":
        data = sys.stdin.buffer.read(MAX_DOWNLOAD + 1)
        if len(data) > MAX_DOWNLOAD:
            raise BadImage(f"over the {MAX_DOWNLOAD >> 20} MB limit for a picture read from standard input")
        return io.BytesIO(data)
    if path.startswith(("http://", "https://")):
        from imgclf.download import DownloadFailed, download

        try:
            data = download(path, max_bytes=MAX_DOWNLOAD, seconds=DOWNLOAD_TIMEOUT)
        except DownloadFailed as err:
            raise BadImage(f"could not fetch it ({err})") from None
        if len(data) > MAX_DOWNLOAD:
            raise BadImage(f"over the {MAX_DOWNLOAD >> 20} MB limit for a picture fetched from a URL")
        return io.BytesIO(data)
    problem = not_regular(path)  # a FIFO or a device is never opened: reading one may never end
    if problem is not None:
        raise BadImage(problem)
    return path


def _fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (in eval mode) with each BatchNorm folded into the convolution that alone feeds it: the same
    function up to float rounding (fp32: about 1e-6), one pass over the activations fewer per convolution
    (about 6% faster for resnet18 at 224 on a CPU). Only exact nn.BatchNorm2d layers are folded (FastNet's
    own norm is not). `model` itself, unchanged, when torch.fx cannot trace it."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model)  # on a copy: a failure half-way leaves `model` intact
    except Exception:  # noqa: BLE001 - data-dependent control flow and the like: run the model as it is
        return model


def expand_paths(paths: list[str]) -> list[str]:
    """Files, URLs and "-" (standard input) as given; folders replaced by the pictures under them, sorted,
    each once however many links lead to it (see sources.PictureWalk). Picture-named entries of a folder
    that are not regular files (a FIFO, a device) come last, to be answered as errors, never opened."""
    out, walk = [], PictureWalk()
    for text in paths:
        if text == "-" or text.startswith(("http://", "https://")):
            out.append(text)
            continue
        is_dir = False
        path = Path(text).expanduser()
        with contextlib.suppress(OSError):  # not there, or unreadable: fetch() says which, for this input alone
            is_dir = stat.S_ISDIR(path.stat().st_mode)
        if is_dir:
            before, skipped = len(out), len(walk.skipped)
            out.extend(map(str, walk.pictures(path)))
            for entry, reason in walk.skipped[skipped:]:  # pictures are answered as errors; folders said here
                if is_image_file(Path(entry)):
                    out.append(entry)
                else:
                    print(f"imgclf: skipping {shown(entry)}: {reason}", file=sys.stderr)
            if len(out) == before:
                raise UserError(f"{shown(path)} holds no pictures (.jpg, .png, ...)")
        else:
            out.append(str(path))
    return out


# torchvision classifier name prefixes -> the torchvision.models module that defines them
_TORCHVISION_FAMILIES = (
    ("resnet", "resnet"), ("resnext", "resnet"), ("wide_resnet", "resnet"), ("vgg", "vgg"), ("alexnet", "alexnet"),
    ("densenet", "densenet"), ("googlenet", "googlenet"), ("inception", "inception"), ("mnasnet", "mnasnet"),
    ("mobilenet_v2", "mobilenetv2"), ("mobilenet_v3", "mobilenetv3"), ("regnet", "regnet"),
    ("shufflenet", "shufflenetv2"), ("squeezenet", "squeezenet"), ("efficientnet", "efficientnet"),
    ("convnext", "convnext"), ("vit_", "vision_transformer"), ("swin", "swin_transformer"), ("maxvit", "maxvit"),
)


def _torchvision_builder_alone(name: str) -> Callable[[], nn.Module] | None:
    """A builder of torchvision classifier `name` (random weights, 1000 classes), imported from its own module
    only, or None. The builder keeps working after the clean-up below (its module's globals stay alive).

    `import torchvision` runs the package's __init__, which imports every model family, the detection ops
    and with them torch._dynamo: over a second, most of `imgclf predict`'s start-up. Here the packages
    torchvision, torchvision.models and torchvision.ops are created without running their __init__, just
    the one module defining `name` is imported, and afterwards every torchvision module is taken out of
    sys.modules again, so that a later `import torchvision` is an ordinary, complete one (the model's
    classes then differ from that import's: isinstance checks against torchvision's classes fail). None,
    and sys.modules as it was, when torchvision is already imported, `name` is of no known family, or
    anything fails; the caller then takes the ordinary path. Not safe while another thread imports torchvision.
    """
    if any(m == "torchvision" or m.startswith("torchvision.") for m in sys.modules):
        return None  # already paid for (or half-imported elsewhere): nothing to save
    family = next((module for prefix, module in _TORCHVISION_FAMILIES if name.startswith(prefix)), None)
    if family is None:
        return None
    try:
        for package in ("torchvision", "torchvision.models", "torchvision.ops"):  # parents first
            spec = importlib.util.find_spec(package)
            sys.modules[package] = importlib.util.module_from_spec(spec)  # not executed: no __init__ imports
        importlib.import_module(f"torchvision.models.{family}")
        builder = sys.modules["torchvision.models._api"].BUILTIN_MODELS.get(name)  # registered classifiers only
        return functools.partial(builder, weights=None) if builder is not None else None
    except Exception:  # noqa: BLE001 - a torchvision whose layout differs: the ordinary import handles it
        return None
    finally:
        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
