"""Export a checkpoint for use without imgclf (note 25's "save the whole model", done safely).

Three formats, each carrying the same metadata document (JSON: classes, input size, channels, mean/std,
model name; see `export_metadata`):

- torchscript: a traced module, read by `torch.jit.load` (Python or C++); metadata in the extra file
  `imgclf.json` inside the archive.
- onnx: one self-contained .onnx file, read by onnxruntime; metadata under the key `imgclf` of the model's
  `metadata_props`.
- safetensors: the weights alone (no code, no pickle), for rebuilding the network yourself; metadata under the
  key `imgclf` of the header's `__metadata__`.

The torchscript and onnx graphs include the normalisation and the softmax. Their input contract:
`images`, uint8, shape (N, C, S, S), pixels 0..255, RGB (or one grey channel), already resized the way
imgclf does it (EXIF orientation applied, shorter side resized to S with bilinear filtering, centre S x S
crop); output `probabilities`, float32, shape (N, classes), in the order of the metadata's `classes`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgclf import __version__
from imgclf.errors import UserError

FORMATS = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "safetensors": ".safetensors"}
METADATA_KEY = "imgclf"  # the key (or extra-file stem) under which every format stores the metadata JSON
# Python packages each format needs beyond torch (module name -> pip name).
REQUIRES = {"torchscript": {}, "onnx": {"onnx": "onnx", "onnxscript": "onnxscript"},
            "safetensors": {"safetensors": "safetensors"}}
RESIZE_RULE = ("EXIF orientation applied; converted to RGB (3 channels) or L (1 channel); shorter side resized "
               "to size with bilinear filtering; centre size x size crop")


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
                  "normalisation": "inside the graph" if graph else "x = (pixels / 255 - mean) / std, per channel"},
        "output": ({"name": "probabilities", "meaning": "softmax over classes, (N, len(classes))"} if graph
                   else {"meaning": "the network returns logits (N, len(classes))"}),
    }


def default_output(checkpoint: Path, fmt: str) -> Path:
    """runs/x/checkpoints/best.pt -> runs/x/checkpoints/best.onnx (or .torchscript.pt, .safetensors)."""
    return checkpoint.with_name(checkpoint.stem + FORMATS[fmt])


def check_requirements(fmt: str, command: str = "imgclf export") -> None:
    missing = [pip for module, pip in REQUIRES[fmt].items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"{command} --format {fmt} needs the package(s) {', '.join(missing)}: "
                        f"pip install 'imgclf[export]'")


@dataclass(frozen=True)
class Exported:
    path: Path
    metadata: dict
    max_diff: float | None  # export vs checkpoint probabilities on a random batch; None: not checked

    def describe(self) -> str:
        """One line for the user: the file, its size, what goes in and out, and the self-check."""
        meta, inp = self.metadata, self.metadata["input"]
        shape = f"(N, {inp['channels']}, {inp['size']}, {inp['size']})"
        size_mb = self.path.stat().st_size / 1e6
        if meta["export_format"] == "safetensors":
            return (f"wrote {self.path} ({size_mb:.1f} MB): weights of {meta['model']['name']} for "
                    f"{len(meta['classes'])} classes, input float32 {shape} normalised; metadata in the header")
        check = ("not run (onnxruntime absent)" if self.max_diff is None
                 else f"max difference from the checkpoint {self.max_diff:.1e}")
        return (f"wrote {self.path} ({size_mb:.1f} MB): input uint8 {shape} -> probabilities "
                f"(N, {len(meta['classes'])}); {check}")


def export_checkpoint(checkpoint, fmt: str, out=None) -> Exported:
    """Write `checkpoint` as `fmt` to `out` (default beside it) and, for the graph formats, run the written
    file on a random batch to compare it with the checkpoint's own model."""
    from imgclf.checkpoint import load_checkpoint
    from imgclf.files import atomic_write
    from imgclf.models import model_from_checkpoint

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_requirements(fmt)
    checkpoint = Path(checkpoint).expanduser()
    out = Path(out).expanduser() if out else default_output(checkpoint, fmt)
    if out.exists() and out.resolve() == checkpoint.resolve():
        raise UserError(f"--out {out} is the checkpoint itself; choose another path")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name")
    ckpt = load_checkpoint(checkpoint)
    meta = export_metadata(ckpt, fmt)
    model = model_from_checkpoint(ckpt).float().cpu()
    if fmt == "safetensors":
        atomic_write(out, lambda tmp: _save_safetensors(model, meta, tmp))
        return Exported(out, meta, None)
    wrapper = ExportWrapper(model, meta["input"]["mean"], meta["input"]["std"]).eval()
    c, s = meta["input"]["channels"], meta["input"]["size"]
    example = torch.randint(0, 256, (2, c, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = _torchscript_bytes(wrapper, example, meta) if fmt == "torchscript" else _onnx_bytes(wrapper, example, meta)
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
    return Exported(out, meta, _self_check(wrapper, data, fmt, c, s))


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


def _self_check(wrapper: nn.Module, data: bytes, fmt: str, channels: int, size: int) -> float | None:
    """Run the written bytes on a fresh random batch of 3 and compare with the checkpoint's own model."""
    x = torch.randint(0, 256, (3, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = wrapper(x)
    if fmt == "torchscript":
        with _quiet_deprecations(), torch.no_grad():
            got = torch.jit.load(io.BytesIO(data))(x)
    else:
        if importlib.util.find_spec("onnxruntime") is None:
            return None  # nothing to run it with here; the file is still valid ONNX
        import onnxruntime

        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    return float((got - want).abs().max())
