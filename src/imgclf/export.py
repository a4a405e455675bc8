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

The torchscript, onnx and openvino graphs include the normalisation and the task's activation (softmax; a
multi-label model's sigmoid, with its per-class "thresholds" in the metadata). Their input contract:
`images`, uint8, shape (N, C, S, S), pixels 0..255, RGB (or one grey channel), prepared exactly as imgclf
prepares a picture (`PREPROCESSING`: decoding, EXIF orientation, 16-bit and transparent pictures, resize,
crop); output `probabilities`, float32, shape (N, classes), in the order of the metadata's `classes`.
`--int8` (onnx, openvino) quantizes the graph after calibrating it on training pictures (imgclf.quantize).
Each format's building, writing, reading and checking is its entry in the table imgclf.formats.FORMATS.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgclf import __version__, bands
from imgclf.errors import UserError, shown
from imgclf.files import not_regular
from imgclf.formats import FORMATS, Format, quiet_deprecations
from imgclf.tasks import DEFAULT, MULTILABEL, checkpoint_task
from imgclf.transforms import INTERPOLATIONS, PLAIN, Decoding, input_decoding

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
    """uint8 pixels (N, C, S, S) -> class probabilities (N, classes): normalisation, network, and the task's
    `activation` of the logits (tasks.Task.activation; single-label: softmax)."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], activation: Callable,
                 full: float = 255.0):
        super().__init__()
        self.model, self.activation, self.full = model, activation, full  # full: 65535 for uint16 input
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The same function as BatchTransform's evaluation path, (x / 255 - mean) / std per channel, written
        # out as three float32 operations; BatchTransform folds it into one multiply-add with constants
        # computed in float64, so the two agree up to float32 rounding, not bit for bit.
        x = images.to(torch.float32) / self.full
        return self.activation(self.model((x - self.mean) / self.std))


def export_metadata(ckpt: dict, fmt: str) -> dict:
    """The document stored inside every export: what the input must be and what the output means."""
    inp = ckpt["input"]
    graph = FORMATS[fmt].graph
    depth = inp.get("depth", 8)
    plain = bands.is_plain(inp["channels"], depth)
    dtype = str(bands.storage_dtype(depth))
    return {
        "format": "imgclf-export", "format_version": 1, "imgclf_version": __version__, "export_format": fmt,
        "model": dict(ckpt["model"]),
        "classes": list(ckpt["classes"]),
        "input": {"name": "images" if graph else None, "dtype": dtype if graph else "float32",
                  "layout": "NCHW", "channels": inp["channels"], "size": inp["size"], "depth": depth,
                  "mean": list(inp["mean"]), "std": list(inp["std"]),
                  **(decoding_entries(inp) if plain else _band_entries(inp)),
                  "normalisation": "inside the graph" if graph else
                  f"x = (pixels / {bands.full_scale(depth):.0f} - mean) / std, per channel"},
        "output": ({"name": "probabilities", "meaning": _output_meaning(ckpt)} if graph
                   else {"meaning": "the network returns logits (N, len(classes))" + _TEMPERATURE_NOTE * (
                       "temperature" in ckpt)}),
        **{key: ckpt[key] for key in ("task", "thresholds") if key in ckpt},  # a multi-label model's
        **{key: ckpt[key] for key in ("temperature", "reject_below") if key in ckpt},  # imgclf.calibration
    }


def decoding_entries(inp: dict) -> dict:
    """The export's words for how a picture is resized and cropped (`resize`, `preprocessing`), and for a
    pretrained network's input contract its entries (interpolation, crop_pct, resize_side) as the
    checkpoint's `inp` holds them; RESIZE_RULE and PREPROCESSING themselves for imgclf's own decoding."""
    decoding = input_decoding(inp)
    if decoding == PLAIN:
        return {"resize": RESIZE_RULE, "preprocessing": list(PREPROCESSING)}
    side, size = decoding.resize_for(inp["size"]), inp["size"]
    how = f"{side} (floor({size} / crop_pct {decoding.crop_pct:g})) with {decoding.interpolation} filtering"
    steps = [_contract_step(step, decoding, side) for step in PREPROCESSING]
    return {"resize": RESIZE_RULE.replace("size with bilinear filtering", how), "preprocessing": steps,
            **decoding.record(size)}


def _band_entries(inp: dict) -> dict:
    """`decoding_entries` for multi-band or 16-bit pictures (imgclf.bands): its words for the resize and its
    steps, and a pretrained network's input contract's entries (`bands.load_bands` follows them)."""
    decoding = input_decoding(inp)
    return {"resize": bands.RESIZE_RULE, "preprocessing": list(bands.PREPROCESSING), **decoding.record(inp["size"])}


def _contract_step(step: str, decoding: Decoding, side: int) -> str:
    """A step of PREPROCESSING as it reads when the shorter side is resized to `side` as `decoding` says."""
    if step.startswith("decode with Pillow"):
        return step.replace("(size, size)", f"({side}, {side})").replace("at least size", f"at least {side}")
    if not step.startswith("resize so that"):
        return step
    name = INTERPOLATIONS[decoding.interpolation].name
    return (f"resize so that the shorter side is {side}: new sides max({side}, round(side * {side} / shorter)), "
            f"img.resize((w, h), Image.{name}, reducing_gap=3.0), skipped when the picture is already "
            f"{side} x {side}")


_TEMPERATURE_NOTE = "; divide them by temperature before the softmax for calibrated probabilities"


def _output_meaning(ckpt: dict) -> str:
    if ckpt.get("task", DEFAULT) == DEFAULT and "temperature" in ckpt:
        return ("softmax over classes of the logits divided by temperature (fitted on the validation split: "
                "calibrated probabilities), (N, len(classes)); with reject_below, a picture whose top "
                "probability is under it is answered unknown")
    return OUTPUT_MEANING[ckpt.get("task", DEFAULT)]


OUTPUT_MEANING = {DEFAULT: "softmax over classes, (N, len(classes))",
                  MULTILABEL: "one sigmoid per class, (N, len(classes)); a picture shows each class whose "
                              "probability reaches its entry of thresholds (chosen on the validation split)"}



def default_output(checkpoint: Path, fmt: str, int8: bool = False) -> Path:
    """runs/x/checkpoints/best.pt -> runs/x/checkpoints/best.onnx (the format's suffix: .torchscript.pt, .xml,
    .safetensors...; best.int8.onnx, best.int8.xml with int8)."""
    return checkpoint.with_name(checkpoint.stem + (".int8" if int8 else "") + FORMATS[fmt].suffix)


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
        fmt = FORMATS[meta["export_format"]]
        shape = f"(N, {inp['channels']}, {inp['size']}, {inp['size']})"
        files = fmt.files(self.path)
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        if not fmt.graph:
            return (f"wrote {self.path} ({size_mb:.1f} MB): weights of {meta['model']['name']} for "
                    f"{len(meta['classes'])} classes, input float32 {shape} normalised; metadata inside the file")
        weights = "".join(f" and {f.name}" for f in files[1:])
        head = (f"wrote {self.path}{weights} ({size_mb:.1f} MB{', int8' if self.int8 else ''}): input {inp['dtype']} {shape} "
                f"-> probabilities (N, {len(meta['classes'])})")
        if self.int8 is not None:
            return f"{head}\n{self.int8.describe()}"
        check = (f"not run ({fmt.check_runtime} absent)" if self.max_diff is None
                 else f"max difference from the checkpoint {self.max_diff:.1e}")
        return f"{head}; {check}"


def export_checkpoint(checkpoint, fmt: str, out=None, *, int8: bool = False, calibration_data=None,
                      eval_data=None, calibration_size: int | None = None, force: bool = False,
                      reject_below: float | None = None) -> Exported:
    """Write `checkpoint` as `fmt` (a name in formats.FORMATS) to `out` (default beside it) and, where the
    format can be run here, run the written file on a random batch to compare it with the checkpoint's own
    model. `int8` (onnx, openvino): quantize the graph, calibrated on `calibration_size` training pictures of
    `calibration_data` (default: the checkpoint's data set), and measure it against the float graph on the
    held-out split of `eval_data` (default: the checkpoint's data set); see imgclf.quantize. An existing file
    at `out` (or beside it, OpenVINO's .bin) is replaced only with `force`, and a checkpoint never.
    `reject_below` (single-label): stored in the metadata, so that predict and serve answer "unknown" for a
    picture whose top probability is under it (imgclf.calibration)."""
    from imgclf.checkpoint import load_checkpoint
    from imgclf.formats import get
    from imgclf.models import model_from_checkpoint

    form = get(fmt)
    _check_options(form, int8, calibration_data or eval_data or calibration_size)
    form.check_requirements(int8=int8)
    checkpoint = Path(checkpoint).expanduser()
    out = Path(out).expanduser() if out else default_output(checkpoint, fmt, int8)
    check_out(out, checkpoint, form, force=force)
    ckpt = with_reject_below(load_checkpoint(checkpoint), reject_below)
    meta = export_metadata(ckpt, fmt)
    sample = _int8_data(ckpt, calibration_data, eval_data, calibration_size) if int8 else None  # fails first
    model = model_from_checkpoint(ckpt).float().cpu()
    activation = checkpoint_task(ckpt).activation
    depth = meta["input"]["depth"]
    module = ExportWrapper(model, meta["input"]["mean"], meta["input"]["std"], activation,
                           bands.full_scale(depth)).eval() if form.graph else model
    c, s = meta["input"]["channels"], meta["input"]["size"]
    example = random_pixels((2, c, s, s), depth, seed=0)
    artefact = form.build(module, example, meta)
    if int8:
        return _export_int8(form, artefact, out, meta, sample)
    form.save(artefact, meta, out)
    return Exported(out, meta, _self_check(module, form, out, c, s, depth) if form.graph else None)


def with_reject_below(ckpt: dict, reject_below: float | None) -> dict:
    """`ckpt` with "reject_below" set (when given); UserError for a multi-label checkpoint."""
    if reject_below is None:
        return ckpt
    if ckpt.get("task", DEFAULT) != DEFAULT:
        raise UserError("--reject-below is for single-label models; a multi-label model's thresholds already "
                        "answer no label")
    return {**ckpt, "reject_below": float(reject_below)}


def _check_options(form: Format, int8: bool, int8_options) -> None:
    if int8 and form.quantize is None:
        names = [f.name for f in FORMATS.values() if f.quantize is not None]
        raise UserError(f"--int8 is for --format {' or '.join(names)}, not {form.name}")
    if not int8 and int8_options:
        raise UserError("--calibration-data, --calibration-size and --eval-data go with --int8")


def check_out(out: Path, checkpoint: Path, form: Format, *, force: bool = False) -> None:
    """UserError unless writing `out` (and its companions) may go ahead: never over the checkpoint nor any
    other checkpoint, nor into a folder or a FIFO; an existing file only with `force`."""
    files = form.files(out)
    if out.exists() and out.resolve() == checkpoint.resolve():
        raise UserError(f"--out {shown(out)} is the checkpoint itself; choose another path")
    if out.is_dir():
        raise UserError(f"--out {shown(out)} is a folder; give a file name")
    if form.companions and out.suffix != form.suffix:
        raise UserError(f"--out {shown(out)}: {form.title} is a {form.suffix} file (its weights go beside it as "
                        f"{', '.join(form.companions)}); give a name ending in {form.suffix}")
    for extra in files[1:]:
        if extra.resolve() == checkpoint.resolve():
            raise UserError(f"--out {shown(out)} would write its weights over the checkpoint {shown(checkpoint)}; "
                            f"choose another name")
    for path in files:
        if not (path.exists() or path.is_symlink()):
            continue
        problem = not_regular(path)
        beside = "" if path == out else f" (written beside {out.name})"
        if problem is not None and problem != "no such file":
            raise UserError(f"{shown(path)}{beside}: {problem}; choose another --out")
        if _is_checkpoint(path):
            raise UserError(f"{shown(path)}{beside} is a checkpoint: an export never replaces one; choose another --out")
        if not force:
            raise UserError(f"{shown(path)}{beside} already exists; choose another --out, or add --force to replace it")


def _is_checkpoint(path: Path) -> bool:
    """Whether `path` is a file torch.save wrote (a zip holding data.pkl), not a TorchScript archive."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, ValueError, EOFError, NotImplementedError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/data.pkl") or n == "data.pkl" for n in names) and not any("/code/" in n for n in names)


def _int8_data(ckpt: dict, calibration_data, eval_data, calibration_size: int | None):
    from imgclf import quantize

    return quantize.int8_data(ckpt, calibration_data, eval_data, calibration_size or quantize.CALIBRATION_SIZE)


def _export_int8(form: Format, floating, out: Path, meta: dict, sample) -> Exported:
    """Quantize the float graph `floating` (calibrated on `sample`, a quantize.Int8Data), compare both on its
    held-out pictures in predict's runtime, write the int8 one."""
    from imgclf import quantize
    from imgclf.formats import choose_runtime

    runtime = choose_runtime(form)
    float_run = form.open(floating, runtime)[0]  # before quantizing: the quantizer may change what it is given
    quantized = form.quantize(floating, sample.calibration)
    check = quantize.compare(float_run, form.open(quantized, runtime)[0], sample, runtime)
    meta = {**meta, "quantization": {"precision": "int8", "method": form.int8_method, **check.as_dict()}}
    form.save(quantized, meta, out)
    return Exported(out, meta, None, int8=check)


def random_pixels(shape: tuple[int, ...], depth: int, *, seed: int) -> torch.Tensor:
    """Random pictures of `depth` bits: uint8, or uint16 for 16 (drawn as int32: torch draws no uint16)."""
    if depth == 8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return torch.randint(0, 65536, shape, dtype=torch.int32, generator=torch.Generator().manual_seed(seed)).to(
        torch.uint16)


def _self_check(wrapper: nn.Module, form: Format, out: Path, channels: int, size: int,
                depth: int = 8) -> float | None:
    """Run the written file in `form.check_runtime` on a fresh random batch of 3 and compare with the
    checkpoint's own model; None when that runtime is not installed here."""
    import importlib.util

    if form.check_runtime is None or importlib.util.find_spec(form.check_runtime) is None:
        return None
    run = form.open(out, form.check_runtime)[0]
    x = random_pixels((3, channels, size, size), depth, seed=1)
    with torch.no_grad():
        want = wrapper(x)
    with quiet_deprecations(), torch.no_grad():
        got = torch.as_tensor(run(x.numpy()))
    return float((got - want).abs().max())
