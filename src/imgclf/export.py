"""Export a checkpoint for use without imgclf (note 25's "save the whole model", done safely).

Four formats, each carrying the same metadata document (JSON: classes, input size, channels, mean/std,
model name, the exact preprocessing; see `export_metadata`):

- torchscript: a traced module, read by `torch.jit.load` (Python or C++); metadata in the extra file
  `imgclf.json` inside the archive.
- onnx: one self-contained .onnx file, read by onnxruntime (or OpenVINO); metadata under the key `imgclf` of
  the model's `metadata_props`.
- openvino: OpenVINO IR (NAME.xml and its weights NAME.bin), converted by `openvino.convert_model` from the
  ONNX graph; metadata under the key `imgclf` of the model's runtime info (`model.get_rt_info(["imgclf"])`).
- safetensors: the weights alone (no code, no pickle), for rebuilding the network yourself; metadata under the
  key `imgclf` of the header's `__metadata__`.

The torchscript, onnx and openvino graphs include the normalisation and the softmax. Their input contract:
`images`, uint8, shape (N, C, S, S), pixels 0..255, RGB (or one grey channel), prepared exactly as imgclf
prepares a picture (`PREPROCESSING`: decoding, EXIF orientation, 16-bit and transparent pictures, resize,
crop); output `probabilities`, float32, shape (N, classes), in the order of the metadata's `classes`.
`--int8` (onnx, openvino) quantizes the graph after calibrating it on training pictures (imgclf.quantize).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgclf import __version__
from imgclf.errors import UserError, reason_of

FORMATS = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "openvino": ".xml", "safetensors": ".safetensors"}
INT8_FORMATS = ("onnx", "openvino")
METADATA_KEY = "imgclf"  # the key (or extra-file stem) under which every format stores the metadata JSON
# Python packages each format needs beyond torch (module name -> pip name).
REQUIRES = {"torchscript": {}, "onnx": {"onnx": "onnx", "onnxscript": "onnxscript"},
            "openvino": {"onnx": "onnx", "onnxscript": "onnxscript", "openvino": "openvino"},
            "safetensors": {"safetensors": "safetensors"}}
INT8_REQUIRES = {"onnx": {"nncf": "nncf", "onnxruntime": "onnxruntime"}, "openvino": {"nncf": "nncf"}}
RESIZE_RULE = ("EXIF orientation applied; converted to RGB (3 channels) or L (1 channel), 16-bit pictures scaled "
               "to 8 bits and transparent ones composited on white; shorter side resized to size with bilinear "
               "filtering; centre size x size crop (the steps exactly: `preprocessing`)")
# What imgclf.transforms.load_image does to a picture, step by step, in words exact enough to redo it
# elsewhere (tests/test_export.py redoes it from these words on 16-bit, RGBA and palette pictures).
PREPROCESSING = [
    "decode with Pillow; a JPEG is decoded with img.draft(MODE, (size, size)) (MODE: RGB for 3 channels, L for "
    "1), which lets libjpeg scale it by 1/2, 1/4 or 1/8 while both sides stay at least size",
    "apply the EXIF orientation (PIL.ImageOps.exif_transpose)",
    "16-bit or 32-bit grey pictures (Pillow modes I;16, I;16B, I;16L, I, F) become 8-bit L: "
    "v8 = floor(clip(v / M * 255 + 0.5, 0, 255)), with M = 65535 for I;16 modes and for I/F pictures holding a "
    "value over 255, else M = 255; 16-bit-per-channel colour PNGs are opened by Pillow as 8-bit RGB/RGBA "
    "(the high byte of each value, v >> 8)",
    "pictures with transparency (modes P, PA, LA, La, RGBA, or a transparency entry in img.info) are converted "
    "to RGBA and alpha-composited on opaque white (255, 255, 255, 255) with Image.alpha_composite",
    "convert to MODE with Pillow's img.convert (L from RGB: L = R * 299/1000 + G * 587/1000 + B * 114/1000; "
    "CMYK, YCbCr and the rest by Pillow's own conversions)",
    "resize so that the shorter side is size: new sides max(size, round(side * size / shorter)), "
    "img.resize((w, h), Image.BILINEAR, reducing_gap=3.0), skipped when the picture is already size x size",
    "crop the centre size x size, from ((w - size) // 2, (h - size) // 2)",
    "uint8 array (size, size, C), transposed to (C, size, size); pictures over 89,478,485 pixels are refused",
]


class ExportWrapper(nn.Module):
    """uint8 pixels (N, C, S, S) -> class probabilities (N, classes): normalisation, network, softmax."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The same function as BatchTransform's evaluation path, (x / 255 - mean) / std per channel, written
        # out as three float32 operations; BatchTransform folds it into one multiply-add with constants
        # computed in float64, so the two agree up to float32 rounding, not bit for bit.
        x = images.to(torch.float32) / 255.0
        return self.model((x - self.mean) / self.std).softmax(1)


def export_metadata(ckpt: dict, fmt: str) -> dict:
    """The document stored inside every export: what the input must be and what the output means."""
    inp = ckpt["input"]
    graph = fmt != "safetensors"
    return {
        "format": "imgclf-export", "format_version": 1, "imgclf_version": __version__, "export_format": fmt,
        "model": dict(ckpt["model"]),
        "classes": list(ckpt["classes"]),
        "input": {"name": "images" if graph else None, "dtype": "uint8" if graph else "float32",
                  "layout": "NCHW", "channels": inp["channels"], "size": inp["size"],
                  "mean": list(inp["mean"]), "std": list(inp["std"]), "resize": RESIZE_RULE,
                  "preprocessing": list(PREPROCESSING),
                  "normalisation": "inside the graph" if graph else "x = (pixels / 255 - mean) / std, per channel"},
        "output": ({"name": "probabilities", "meaning": "softmax over classes, (N, len(classes))"} if graph
                   else {"meaning": "the network returns logits (N, len(classes))"}),
    }


def default_output(checkpoint: Path, fmt: str, int8: bool = False) -> Path:
    """runs/x/checkpoints/best.pt -> runs/x/checkpoints/best.onnx (or .torchscript.pt, .xml, .safetensors;
    best.int8.onnx, best.int8.xml with int8)."""
    return checkpoint.with_name(checkpoint.stem + (".int8" if int8 else "") + FORMATS[fmt])


def check_requirements(fmt: str, command: str = "imgclf export", int8: bool = False) -> None:
    needed = {**REQUIRES[fmt], **(INT8_REQUIRES[fmt] if int8 else {})}
    missing = [pip for module, pip in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"{command} --format {fmt}{' --int8' if int8 else ''} needs the package(s) "
                        f"{', '.join(missing)}: pip install 'imgclf[export]'")


@dataclass(frozen=True)
class Exported:
    path: Path
    metadata: dict
    max_diff: float | None  # export vs checkpoint probabilities on a random batch; None: not checked
    int8: object = None  # quantize.Int8Check of an int8 export: its accuracy next to the float graph's

    def describe(self) -> str:
        """For the user: the file, its size, what goes in and out, and the self-check (or, for int8, the
        accuracy of the int8 model next to the float one's, on held-out pictures)."""
        meta, inp = self.metadata, self.metadata["input"]
        shape = f"(N, {inp['channels']}, {inp['size']}, {inp['size']})"
        files = [self.path, self.path.with_suffix(".bin")] if meta["export_format"] == "openvino" else [self.path]
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        if meta["export_format"] == "safetensors":
            return (f"wrote {self.path} ({size_mb:.1f} MB): weights of {meta['model']['name']} for "
                    f"{len(meta['classes'])} classes, input float32 {shape} normalised; metadata in the header")
        weights = f" and {files[1].name}" if len(files) > 1 else ""
        head = (f"wrote {self.path}{weights} ({size_mb:.1f} MB{', int8' if self.int8 else ''}): input uint8 {shape} "
                f"-> probabilities (N, {len(meta['classes'])})")
        if self.int8 is not None:
            return f"{head}\n{self.int8.describe()}"
        check = ("not run (onnxruntime absent)" if self.max_diff is None
                 else f"max difference from the checkpoint {self.max_diff:.1e}")
        return f"{head}; {check}"


def export_checkpoint(checkpoint, fmt: str, out=None, *, int8: bool = False, calibration_data=None,
                      eval_data=None, calibration_size: int | None = None) -> Exported:
    """Write `checkpoint` as `fmt` to `out` (default beside it) and, for the graph formats, run the written
    file on a random batch to compare it with the checkpoint's own model. `int8` (onnx, openvino): quantize
    the graph, calibrated on `calibration_size` training pictures of `calibration_data` (default: the
    checkpoint's data set), and measure it against the float graph on the held-out split of `eval_data`
    (default: the checkpoint's data set); see imgclf.quantize."""
    from imgclf.checkpoint import load_checkpoint
    from imgclf.files import atomic_write
    from imgclf.models import model_from_checkpoint

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if int8 and fmt not in INT8_FORMATS:
        raise UserError(f"--int8 is for --format {' or '.join(INT8_FORMATS)}, not {fmt}")
    if not int8 and (calibration_data or eval_data or calibration_size):
        raise UserError("--calibration-data, --calibration-size and --eval-data go with --int8")
    check_requirements(fmt, int8=int8)
    checkpoint = Path(checkpoint).expanduser()
    out = Path(out).expanduser() if out else default_output(checkpoint, fmt, int8)
    _check_out(out, checkpoint, fmt)
    ckpt = load_checkpoint(checkpoint)
    meta = export_metadata(ckpt, fmt)
    sample = _int8_data(ckpt, calibration_data, eval_data, calibration_size) if int8 else None  # fails first
    model = model_from_checkpoint(ckpt).float().cpu()
    if fmt == "safetensors":
        atomic_write(out, lambda tmp: _save_safetensors(model, meta, tmp))
        return Exported(out, meta, None)
    wrapper = ExportWrapper(model, meta["input"]["mean"], meta["input"]["std"]).eval()
    c, s = meta["input"]["channels"], meta["input"]["size"]
    example = torch.randint(0, 256, (2, c, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if fmt == "torchscript":
        data = _torchscript_bytes(wrapper, example, meta)
        atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
        return Exported(out, meta, _self_check(wrapper, _torchscript_runner(data), c, s))
    data = _onnx_bytes(wrapper, example, meta)
    if int8:
        return _export_int8(data, fmt, out, meta, sample)
    _write_graph(data if fmt == "onnx" else _openvino_model(data, meta), out)
    return Exported(out, meta, _self_check(wrapper, _graph_runner(out, fmt), c, s))


def _check_out(out: Path, checkpoint: Path, fmt: str) -> None:
    if out.exists() and out.resolve() == checkpoint.resolve():
        raise UserError(f"--out {out} is the checkpoint itself; choose another path")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name")
    if fmt == "openvino" and out.suffix != ".xml":
        raise UserError(f"--out {out}: an OpenVINO model is a .xml file (its weights go beside it as .bin); "
                        f"give a name ending in .xml")
    if fmt == "openvino" and out.with_suffix(".bin").resolve() == checkpoint.resolve():
        raise UserError(f"--out {out} would write its weights over the checkpoint {checkpoint}; choose another name")


def _int8_data(ckpt: dict, calibration_data, eval_data, calibration_size: int | None):
    from imgclf import quantize

    return quantize.int8_data(ckpt, calibration_data, eval_data, calibration_size or quantize.CALIBRATION_SIZE)


def _export_int8(data: bytes, fmt: str, out: Path, meta: dict, sample) -> Exported:
    """Quantize the float graph `data` (calibrated on `sample`, a quantize.Int8Data), compare both on its
    held-out pictures in predict's runtime, write the int8 one."""
    from imgclf import quantize
    from imgclf.predict import choose_runtime, open_graph

    runtime = choose_runtime(fmt)
    if fmt == "onnx":
        floating, method = data, "NNCF post-training quantization, ONNX backend (QDQ)"
        quantized = quantize.quantize_onnx(data, sample.calibration)
    else:
        floating, method = _openvino_model(data, meta), "NNCF post-training quantization, OpenVINO backend"
        quantized = quantize.quantize_openvino(floating, sample.calibration)
    check = quantize.compare(open_graph(floating, runtime)[0], open_graph(quantized, runtime)[0], sample, runtime)
    meta = {**meta, "quantization": {"precision": "int8", "method": method, **check.as_dict()}}
    _write_graph(_with_metadata(quantized, meta), out)
    return Exported(out, meta, None, int8=check)


def _openvino_model(onnx_data: bytes, meta: dict):
    """The ONNX graph converted to an openvino.Model (`openvino.convert_model`), with the metadata on top."""
    import openvino

    try:
        model = openvino.convert_model(io.BytesIO(onnx_data))
    except Exception as err:  # noqa: BLE001 - the converter raises its own kinds
        raise UserError(f"OpenVINO conversion of {meta['model']['name']} failed: {reason_of(err)}") from None
    return _with_metadata(model, meta)


def _with_metadata(graph, meta: dict):
    """ONNX bytes or an openvino.Model, with `meta` stored as its imgclf metadata."""
    if isinstance(graph, bytes):
        import onnx

        proto = onnx.load_from_string(graph)
        onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta)})
        return proto.SerializeToString()
    graph.set_rt_info(json.dumps(meta), [METADATA_KEY])
    return graph


def _write_graph(graph, out: Path) -> None:
    """ONNX bytes to `out`; an openvino.Model to `out` (.xml) and its weights beside it (.bin), each atomically."""
    from imgclf.files import atomic_write

    if isinstance(graph, bytes):
        atomic_write(out, lambda tmp: Path(tmp).write_bytes(graph))
        return
    import openvino

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent) as tmp:
        openvino.save_model(graph, str(Path(tmp) / "model.xml"), compress_to_fp16=False)  # float32 weights stay so
        for suffix in (".bin", ".xml"):  # the weights first: the .xml, which reads NAME.bin, completes the pair
            written = Path(tmp) / f"model{suffix}"
            atomic_write(out.with_suffix(suffix), lambda dst, src=written: shutil.copyfile(src, dst))


def _graph_runner(path: Path, fmt: str):
    """The written graph as a function of uint8 numpy pictures, run by ONNX Runtime (ONNX: what most programs
    load it with) or OpenVINO; None for ONNX without onnxruntime installed."""
    from imgclf.predict import open_graph

    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        return None
    return open_graph(path, "onnxruntime" if fmt == "onnx" else "openvino")[0]


def _torchscript_runner(data: bytes):
    with _quiet_deprecations(), torch.no_grad():
        module = torch.jit.load(io.BytesIO(data))
    return lambda x: module(torch.from_numpy(x)).numpy()


def _save_safetensors(model: nn.Module, meta: dict, path: str) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={METADATA_KEY: json.dumps(meta)})


@contextlib.contextmanager
def _quiet_deprecations():
    # torch.jit is deprecated in favour of torch.export but remains the format C++ and mobile runtimes read.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # ViTs' size checks, traced as constants
        yield


def _torchscript_bytes(wrapper: nn.Module, example: torch.Tensor, meta: dict) -> bytes:
    buffer = io.BytesIO()
    with _quiet_deprecations(), torch.no_grad():
        traced = torch.jit.trace(wrapper, example)
        torch.jit.save(traced, buffer, _extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})
    return buffer.getvalue()


def _onnx_bytes(wrapper: nn.Module, example: torch.Tensor, meta: dict) -> bytes:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with _quiet_deprecations(), torch.no_grad():
            program = torch.onnx.export(wrapper, (example,), None, input_names=["images"],
                                        output_names=["probabilities"], dynamic_shapes={"images": {0: batch}},
                                        dynamo=True, external_data=False, verbose=False)
    except Exception as err:  # the exporter raises many types; the user needs one line and the model name
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise UserError(f"ONNX export of {meta['model']['name']} failed: {first}") from None
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta)})
    return proto.SerializeToString()


def _self_check(wrapper: nn.Module, run, channels: int, size: int) -> float | None:
    """Run the written model (`run`: uint8 numpy -> probabilities; None: nothing to run it with here) on a fresh
    random batch of 3 and compare with the checkpoint's own model."""
    if run is None:
        return None
    x = torch.randint(0, 256, (3, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = wrapper(x)
    with _quiet_deprecations(), torch.no_grad():
        got = torch.as_tensor(run(x.numpy()))
    return float((got - want).abs().max())
