"""Using a trained model (note 31): predict on pictures. Needs only the checkpoint."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import io
import json
import os
import stat
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgclf.checkpoint import load_checkpoint
from imgclf.errors import UserError, shown
from imgclf.files import not_regular
from imgclf.models import base_fits, model_from_checkpoint
from imgclf.runtime import autocast_factory, resolve_device, resolve_precision
from imgclf.sources import PictureWalk, is_image_file
from imgclf.transforms import BadImage, BatchTransform, load_image


@dataclass
class Prediction:
    path: str
    labels: list[str] = field(default_factory=list)  # top-k, most probable first
    probs: list[float] = field(default_factory=list)
    error: str | None = None  # why this file could not be predicted


class Predictor:
    """A model with its preprocessing and class names, rebuilt from a checkpoint alone."""

    def __init__(self, ckpt: dict, *, device: str = "auto", precision: str = "fp32"):
        self.device = resolve_device(device)
        name, size = ckpt["model"]["name"], ckpt["input"]["size"]
        builder = _torchvision_builder_alone(name) if base_fits(name, size) else None  # torchvision imported once
        model = _fold_batchnorm(model_from_checkpoint(ckpt, base_builder=builder))
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.classes: list[str] = ckpt["classes"]
        self.model_name: str = name
        inp = ckpt["input"]
        self.size, self.channels = inp["size"], inp["channels"]
        self.transform = BatchTransform(tuple(inp["mean"]), tuple(inp["std"]))
        self.autocast = autocast_factory(self.device, resolve_precision(precision, self.device))

    @classmethod
    def from_checkpoint(cls, path, **kwargs) -> Predictor:
        return cls(load_checkpoint(path), **kwargs)

    @classmethod
    def from_path(cls, path, *, device: str = "auto", precision: str = "fp32", runtime: str = "auto") -> Predictor:
        """A checkpoint, or a model exported by `imgclf export` (.onnx or OpenVINO .xml, run by the fastest
        runtime installed, see `choose_runtime`; TorchScript). `device` is for checkpoints (exported graphs run
        on the CPU)."""
        kind = exported_kind(path)
        if kind is None:
            return cls.from_checkpoint(path, device=device, precision=precision)
        return ExportedPredictor(path, kind, runtime=runtime, precision=precision)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, size, size) -> class probabilities (N, classes)."""
        x = self.transform(images.to(self.device), train=False, memory_format=torch.channels_last)
        with self.autocast():
            return self.model(x).float().softmax(1).cpu()

    def predict(self, paths: list[str], *, topk: int = 5, batch_size: int = 64) -> list[Prediction]:
        """Predict every picture in `paths` (files and folders, in order); unreadable ones carry `error`."""
        return list(self.iter_predict(paths, topk=topk, batch_size=batch_size))

    def iter_predict(self, paths: list[str], *, topk: int = 5, batch_size: int = 64) -> Iterator[Prediction]:
        """As `predict`, yielding each batch's answers as soon as they are computed.

        The first batch is the first picture alone, so that its answer comes at once; the next batch is
        decoded (in threads) while the model runs on the current one."""
        files = expand_paths(paths)
        k = max(1, min(topk, len(self.classes)))
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
                    p, idx = next(rows).topk(k)  # rows come in the order of the decoded pictures
                    yield Prediction(path, [self.classes[j] for j in idx.tolist()], p.tolist())
        finally:  # also when the caller stops early: the prefetched batch is not decoded in vain
            pool.shutdown(wait=True, cancel_futures=True)

    def _decode(self, path: str) -> np.ndarray | str:
        try:
            source = fetch(path)
        except BadImage as err:
            return str(err)
        try:
            return load_image(source, size=self.size, channels=self.channels).transpose(2, 0, 1)
        except BadImage as err:  # Pillow names a file object by its repr: the user knows it as "-" or the URL
            return f"not a readable picture ({str(err).replace(' ' + repr(source), '')})"


class ExportedPredictor(Predictor):
    """A model exported by `imgclf export` (ONNX, OpenVINO IR or TorchScript): preprocessing and class names are
    inside it (its `imgclf` metadata), so it needs neither the checkpoint nor the network's code. ONNX files
    and OpenVINO IR run in the fastest runtime installed (`choose_runtime`); TorchScript archives in torch (a
    TorchScript archive is a program: load only your own). `precision` "fp32" keeps OpenVINO in float32 even
    where the CPU has bf16 (probabilities as exported); "auto" lets it choose."""

    def __init__(self, path, kind: str, *, runtime: str = "auto", precision: str = "fp32"):
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"no such file: {path}")
        if kind == "torchscript":
            files = {"imgclf.json": ""}
            with warnings.catch_warnings():  # torch.jit is deprecated for torch.export, but this is its format
                warnings.simplefilter("ignore", FutureWarning)
                self._module = torch.jit.load(str(path), map_location="cpu", _extra_files=files).eval()
            meta, self.runtime = _json_or_empty(files["imgclf.json"]), "torch"
        else:
            self.runtime = choose_runtime(kind, runtime, path)
            self._run, meta = open_graph(path, self.runtime, precision=precision)
        if meta.get("format") != "imgclf-export":
            raise UserError(f"{path} is not a model exported by imgclf (it has no imgclf metadata)")
        self.kind, self.classes, self.metadata = kind, meta["classes"], meta
        self.model_name = meta["model"]["name"]
        self.size, self.channels = meta["input"]["size"], meta["input"]["channels"]

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, size, size) -> class probabilities (N, classes), computed by the exported graph."""
        if self.kind == "torchscript":
            with torch.inference_mode():
                return self._module(images).float()
        return torch.from_numpy(self._run(np.ascontiguousarray(images.numpy())))


def exported_kind(path) -> str | None:
    """"onnx", "openvino" (an IR .xml) or "torchscript" for a file `imgclf export` wrote, else None (a
    checkpoint, or not a model)."""
    path = Path(path).expanduser()
    if path.suffix.lower() in GRAPH_SUFFIXES:
        return GRAPH_SUFFIXES[path.suffix.lower()]
    if path.is_file() and zipfile.is_zipfile(path):
        # a damaged zip can fail in many ways (names that are not UTF-8...): then it is not an export
        with contextlib.suppress(zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError), \
                zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if any(n.endswith("/extra/imgclf.json") for n in names) and any(n.endswith("/code/") or "/code/" in n
                                                                              for n in names):
                return "torchscript"
    return None


GRAPH_SUFFIXES = {".onnx": "onnx", ".xml": "openvino"}
RUNTIMES = ("auto", "openvino", "onnxruntime")


def choose_runtime(kind: str, requested: str = "auto", path=None) -> str:
    """The runtime that runs an exported graph of `kind` ("onnx" or "openvino"): `requested`, or for "auto"
    the fastest installed. OpenVINO IR needs OpenVINO. An ONNX graph runs in OpenVINO where it is installed,
    else in ONNX Runtime: on an AVX512-VNNI Xeon, in two runs, OpenVINO ran the same .onnx files 1.3-2x as
    fast at batch 64 (resnet18 at 224 int8, tutorial_cnn fp32 and int8), tied on resnet18 fp32 (0.96-1.09x),
    and answered resnet18's single pictures sooner (1.1-1.4x); only the tiny tutorial_cnn's single pictures
    came sooner from ONNX Runtime, by 0.1-0.2 ms (benchmarks/RESULTS.md)."""
    what = f"{path or 'this'} is an {'OpenVINO' if kind == 'openvino' else 'ONNX'} model"
    allowed = ["openvino"] if kind == "openvino" else ["openvino", "onnxruntime"]
    if requested != "auto" and requested not in allowed:
        raise UserError(f"unknown runtime {requested!r} for {kind}; choose one of auto, {', '.join(allowed)}")
    wanted = allowed if requested == "auto" else [requested]
    for runtime in wanted:
        if importlib.util.find_spec(runtime) is not None:
            return runtime
    raise UserError(f"{what}; running it needs {' or '.join(wanted)}: pip install 'imgclf[export]'")


def open_graph(model, runtime: str, *, precision: str = "fp32"):
    """(run, metadata) for an exported graph: `model` is a file (.onnx, OpenVINO .xml), the bytes of an ONNX
    graph, or an openvino.Model; `run` maps uint8 (N, C, S, S) numpy pictures to probabilities (N, classes)."""
    where = model if isinstance(model, str | Path) else "the model"
    try:
        if runtime == "onnxruntime":
            return _onnxruntime_graph(model)
        return _openvino_graph(model, precision)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - both runtimes raise their own kinds for every bad file
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read {where}: not an exported model, or damaged ({first})") from None


def _onnxruntime_graph(model):
    import onnxruntime

    source = model if isinstance(model, bytes) else str(model)
    session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    meta = _json_or_empty(session.get_modelmeta().custom_metadata_map.get("imgclf", ""))
    output = session.get_outputs()[0].name
    return (lambda x: session.run([output], {"images": x})[0]), meta


def _openvino_graph(model, precision: str):
    import openvino

    core = openvino.Core()
    if isinstance(model, bytes):
        model = openvino.convert_model(io.BytesIO(model))
    elif not isinstance(model, openvino.Model):
        model = core.read_model(str(model))
    # An IR written by imgclf export keeps its metadata at the top; an ONNX graph's lands under "framework".
    key = next((k for k in (["imgclf"], ["framework", "imgclf"]) if model.has_rt_info(k)), None)
    meta = _json_or_empty(model.get_rt_info(key).astype(str) if key else "")
    config = {"PERFORMANCE_HINT": "LATENCY"}  # one request at a time, all cores on it: predict's batches
    if precision == "fp32":
        config["INFERENCE_PRECISION_HINT"] = "f32"  # OpenVINO would compute bf16 on CPUs that have it
    compiled = core.compile_model(model, "CPU", config)
    return (lambda x: compiled(x)[0]), meta


def _json_or_empty(text: str) -> dict:
    try:
        meta = json.loads(text or "{}")
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


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
