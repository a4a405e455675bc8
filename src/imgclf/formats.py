"""The export formats, as one table: each `Format` says what its file is called, how it is built, written,
read back, checked and quantized, and what it needs installed. `imgclf export` writes through it, and
predict, eval and serve read exported files through it.

Adding a format touches this file and its test: write its `build` and `save` here (and `open` if predict,
eval and serve should read it back, `quantize` for --int8), add its `Format(...)` to `FORMATS`, and teach
tests/test_export.py's standalone reader (`open_export`) to read it, since that test exports every format in
the table. The command line's choices and help, default file names, the overwrite guard, requirement
checks, the self-check after writing and predict's loading all follow from the table.

Every format stores the same metadata document (JSON, see `export.export_metadata`) under the key
`METADATA_KEY`; `check_metadata` is what a reader accepts of it. The graph formats take uint8 pictures
(N, C, S, S) named `images` and give probabilities (N, classes) named `probabilities`.

This module imports neither torch nor any runtime at import time (the command line reads the table)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import shutil
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.errors import UserError, reason_of, shown
from imgclf.files import atomic_write, not_regular

METADATA_KEY = "imgclf"  # the key (or extra-file stem) under which every format stores the metadata JSON
INSTALL = "pip install 'imgclf[export]'"


@dataclass(frozen=True)
class Format:
    """One export format. The callables' contracts:

    build(module, example, meta) -> artefact: the in-memory model; `module` is export.ExportWrapper (uint8 in,
        probabilities out) for a graph format, the bare network otherwise; `example` a uint8 batch to trace.
    save(artefact, meta, out): write `out` (and its `companions`) atomically, `meta` stored inside.
    open(source, runtime, precision) -> (run, meta): `source` a written file (or, for int8 checks, an
        artefact); `run` maps uint8 numpy (N, C, S, S) to numpy probabilities (N, classes); `meta` the stored
        metadata as found ({} when none). None: imgclf does not read the format back.
    quantize(artefact, calibration) -> artefact: int8, calibrated on uint8 numpy pictures; None: no --int8.
    sniff(path) -> bool: whether a file not named with one of `suffixes` is of this format."""

    name: str
    suffix: str  # of the default output: best.pt -> best.onnx (best.int8.onnx with --int8)
    title: str  # "an ONNX model", for messages
    help: str  # one line for `imgclf export --help`
    graph: bool  # True: the graph with normalisation and softmax; False: the weights alone
    build: Callable
    save: Callable
    open: Callable | None = None
    runtimes: tuple[str, ...] = ()  # what can run it (`open`), fastest first
    check_runtime: str | None = None  # what export runs the written file in to compare with the checkpoint
    requires: dict = field(default_factory=dict)  # Python module -> pip name, beyond torch
    quantize: Callable | None = None
    int8_requires: dict = field(default_factory=dict)
    int8_method: str = ""
    companions: tuple[str, ...] = ()  # suffixes of files written beside `out` (OpenVINO's .bin)
    suffixes: tuple[str, ...] = ()  # file names that are this format when read back
    sniff: Callable | None = None
    bound: Callable | None = None  # bound(path): UserError when the file asks for more memory than MAX_CONSTANTS

    def files(self, out: Path) -> list[Path]:
        """Every file writing `out` creates or replaces."""
        return [out, *(out.with_suffix(s) for s in self.companions)]

    def check_requirements(self, command: str = "imgclf export", int8: bool = False) -> None:
        """UserError naming the missing packages and the install line."""
        needed = {**self.requires, **(self.int8_requires if int8 else {})}
        missing = [pip for module, pip in needed.items() if importlib.util.find_spec(module) is None]
        if missing:
            raise UserError(f"{command} --format {self.name}{' --int8' if int8 else ''} needs the package(s) "
                            f"{', '.join(missing)}: {INSTALL}")


# ---------------------------------------------------------------- reading any format

def get(name: str) -> Format:
    if name not in FORMATS:
        raise UserError(f"unknown export format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def format_of(path) -> Format | None:
    """The readable format of a file `imgclf export` wrote, by its name or content; None for anything else
    (a checkpoint, or not a model)."""
    path = Path(path).expanduser()
    readable = [f for f in FORMATS.values() if f.open is not None]
    by_name = next((f for f in readable if path.suffix.lower() in f.suffixes), None)
    if by_name is not None:
        return by_name
    if not_regular(path) is not None:  # never opened: reading a FIFO may never end
        return None
    return next((f for f in readable if f.sniff is not None and f.sniff(path)), None)


def choose_runtime(fmt: Format, requested: str = "auto", path=None) -> str:
    """The runtime that runs `fmt`'s files: `requested`, or for "auto" the first of `fmt.runtimes` installed."""
    if requested != "auto" and requested not in fmt.runtimes:
        raise UserError(f"unknown runtime {requested!r} for {fmt.name}; choose one of auto, {', '.join(fmt.runtimes)}")
    wanted = fmt.runtimes if requested == "auto" else (requested,)
    for runtime in wanted:
        if importlib.util.find_spec(runtime) is not None:
            return runtime
    raise UserError(f"{path or 'this'} is {fmt.title}; running it needs {' or '.join(wanted)}: {INSTALL}")


def check_files(fmt: Format, path: Path) -> None:
    """UserError unless `path` and the companions beside it are regular files (a FIFO would hang the reader)
    and, for a graph, what it asks the runtime to allocate is within bounds (`Format.bound`): checked before
    any runtime reads the file, as a checkpoint's sizes are checked before it is unpickled."""
    problem = not_regular(path)
    if problem is not None:
        raise UserError(f"no such file: {shown(path)}" if problem == "no such file" else f"{shown(path)}: {problem}")
    for companion in fmt.files(path)[1:]:
        problem = not_regular(companion)
        if problem is not None and problem != "no such file":  # a missing one is the runtime's to report
            raise UserError(f"{shown(companion)} (beside {shown(path.name)}): {problem}")
    if fmt.bound is not None:
        fmt.bound(path)


def check_metadata(meta: dict, where) -> None:
    """UserError in one line unless `meta` is imgclf export metadata a reader can trust: model, classes,
    input channels, depth (8 or 16 bits) and size within the bounds a checkpoint has."""
    if meta.get("format") != "imgclf-export":
        raise UserError(f"{shown(where)} is not a model exported by imgclf (it has no imgclf metadata)")
    problem = _metadata_problem(meta)
    if problem is not None:
        raise UserError(f"{shown(where)}: its imgclf metadata is damaged: {problem}")


def _metadata_problem(meta: dict) -> str | None:
    from imgclf.checkpoint import MAX_CLASSES, MAX_NAME
    from imgclf.config import MAX_CHANNELS, MAX_SIDE

    def text(value) -> bool:
        return isinstance(value, str) and 0 < len(value) <= MAX_NAME

    model, classes, inp = meta.get("model"), meta.get("classes"), meta.get("input")
    if not isinstance(model, dict) or not text(model.get("name")):
        return f"model is {_brief(model)}, not a description with a name"
    if not isinstance(classes, list) or not 0 < len(classes) <= MAX_CLASSES or not all(map(text, classes)):
        return f"classes is {_brief(classes)}, not a list of 1 to {MAX_CLASSES:,} names of at most {MAX_NAME} characters"
    if not isinstance(inp, dict):
        return f"input is {_brief(inp)}, not a description of the input"
    channels, size = inp.get("channels"), inp.get("size")
    if type(channels) is not int or not 1 <= channels <= MAX_CHANNELS:
        return f"input channels is {_brief(channels)}, not a number of 1 to {MAX_CHANNELS}"
    if inp.get("depth", 8) not in (8, 16) or type(inp.get("depth", 8)) is not int:
        return f"input depth is {_brief(inp.get('depth'))}, not 8 or 16 bits"
    if type(size) is not int or not 1 <= size <= MAX_SIDE:
        return f"input size is {_brief(size)}, not a number of 1 to {MAX_SIDE}"
    from imgclf.transforms import decoding_problem  # a pretrained network's resize and crop, when it has one

    return decoding_problem(inp) or _calibration_problem(meta)


def _calibration_problem(meta: dict) -> str | None:
    """What is wrong with the optional "temperature" and "reject_below" entries (imgclf.calibration)."""
    from imgclf.calibration import stored_reject_below, stored_temperature

    try:
        stored_temperature(meta, "it")
        stored_reject_below(meta, "it")
    except UserError as err:
        return str(err).removeprefix("it's ")
    return None


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def read_metadata(text: str) -> dict:
    """The metadata JSON as stored; {} when it is not a JSON object."""
    try:
        meta = json.loads(text or "{}")
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


# ---------------------------------------------------------------- TorchScript

@contextlib.contextmanager
def quiet_deprecations():
    """torch.jit is deprecated in favour of torch.export but remains the format C++ and mobile runtimes read."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # ViTs' size checks, traced as constants
        yield


def _torchscript_build(module, example, meta: dict):
    import torch

    with quiet_deprecations(), torch.no_grad():
        return torch.jit.trace(module, example)


def _torchscript_save(traced, meta: dict, out: Path) -> None:
    import torch

    buffer = io.BytesIO()
    with quiet_deprecations():
        torch.jit.save(traced, buffer, _extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})
    _write_bytes(buffer.getvalue(), out)


def _torchscript_open(path, runtime: str, precision: str = "fp32"):
    import torch

    files = {f"{METADATA_KEY}.json": ""}
    with quiet_deprecations():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=files).eval()

    def run(x):
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    return run, read_metadata(files[f"{METADATA_KEY}.json"])


def _torchscript_sniff(path: Path) -> bool:
    """A TorchScript archive with imgclf's metadata (a zip holding code/ and extra/imgclf.json)."""
    if not zipfile.is_zipfile(path):
        return False
    # a damaged zip can fail in many ways (names that are not UTF-8...): then it is not an export
    with contextlib.suppress(zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError), \
            zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        return any(n.endswith(f"/extra/{METADATA_KEY}.json") for n in names) and any("/code/" in n for n in names)
    return False


# ---------------------------------------------------------------- ONNX

def _onnx_build(module, example, meta: dict):
    """The ONNX ModelProto of `module` (batch dimension dynamic), without metadata."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with quiet_deprecations(), torch.no_grad():
            program = torch.onnx.export(module, (example,), None, input_names=["images"],
                                        output_names=["probabilities"], dynamic_shapes={"images": {0: batch}},
                                        dynamo=True, external_data=False, verbose=False)
    except Exception as err:  # the exporter raises many types; the user needs one line and the model name
        raise UserError(f"ONNX export of {meta['model']['name']} failed: {reason_of(err)}") from None
    return program.model_proto


def _onnx_with_metadata(proto, meta: dict) -> bytes:
    import onnx

    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta)})
    return proto.SerializeToString()


def _onnx_save(proto, meta: dict, out: Path) -> None:
    _write_bytes(_onnx_with_metadata(proto, meta), out)


def _onnx_open(source, runtime: str, precision: str = "fp32"):
    """A .onnx file (or a ModelProto) in ONNX Runtime or OpenVINO."""
    if not isinstance(source, str | Path):
        source = source.SerializeToString()
    return open_graph(source, runtime, precision)


def _onnx_quantize(proto, calibration):
    """NNCF's post-training quantization, ONNX backend: a QDQ graph (QuantizeLinear / DequantizeLinear pairs
    that ONNX Runtime and OpenVINO run as int8 kernels). Not ONNX Runtime's own `quantize_static`: on resnet18
    (ants/bees, from scratch) its int8 graphs gave the float graph's top-1 on only 74-88% of the held-out
    pictures whatever its settings, where NNCF's, with its bias correction, gave it on 99-100%
    (benchmarks/RESULTS.md)."""
    with _quiet_quantizer():
        import nncf

        dataset = nncf.Dataset([{"images": calibration[i : i + 1]} for i in range(len(calibration))])
        return nncf.quantize(proto, dataset, subset_size=len(calibration))


# ---------------------------------------------------------------- OpenVINO IR

def _openvino_build(module, example, meta: dict):
    """The ONNX graph converted to an openvino.Model by `openvino.convert_model`."""
    import openvino

    data = _onnx_build(module, example, meta).SerializeToString()
    try:
        return openvino.convert_model(io.BytesIO(data))
    except Exception as err:  # noqa: BLE001 - the converter raises its own kinds
        raise UserError(f"OpenVINO conversion of {meta['model']['name']} failed: {reason_of(err)}") from None


def _openvino_save(model, meta: dict, out: Path) -> None:
    """NAME.xml and its weights NAME.bin, each atomically; the weights first: the .xml, which reads NAME.bin,
    completes the pair. A failure to write (a full disk) is one line."""
    import openvino

    model.set_rt_info(json.dumps(meta), [METADATA_KEY])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent) as tmp:
        try:
            openvino.save_model(model, str(Path(tmp) / "model.xml"), compress_to_fp16=False)  # float32 stays so
        except Exception as err:  # noqa: BLE001 - OpenVINO raises RuntimeError for a failed write
            raise UserError(f"could not write {shown(out)}: {reason_of(err)}; check the free space and try "
                            f"again (any previous version of the files is kept)") from None
        for suffix in (".bin", ".xml"):
            written = Path(tmp) / f"model{suffix}"
            atomic_write(out.with_suffix(suffix), lambda dst, src=written: shutil.copyfile(src, dst))


def _openvino_open(source, runtime: str, precision: str = "fp32"):
    return open_graph(source, runtime, precision)


def _openvino_quantize(model, calibration):
    """NNCF's post-training quantization, OpenVINO backend."""
    with _quiet_quantizer():
        import nncf

        dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
        return nncf.quantize(model, dataset, subset_size=len(calibration))


# ---------------------------------------------------------------- safetensors

def _safetensors_build(model, example, meta: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _safetensors_save(state: dict, meta: dict, out: Path) -> None:
    from safetensors.torch import save

    _write_bytes(save(state, metadata={METADATA_KEY: json.dumps(meta)}), out)


# ---------------------------------------------------------------- shared by the graph formats

def _write_bytes(data: bytes, out: Path) -> None:
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))


def open_graph(source, runtime: str, precision: str):
    """(run, meta) for an ONNX or OpenVINO graph: a file, ONNX bytes or an openvino.Model."""
    where = shown(source) if isinstance(source, str | Path) else "the model"
    try:
        if runtime == "onnxruntime":
            return _onnxruntime_graph(source)
        return _openvino_graph(source, precision)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - both runtimes raise their own kinds for every bad file
        raise UserError(f"cannot read {where}: not an exported model, or damaged ({reason_of(err, 160)})") from None


def _onnxruntime_graph(source):
    import onnxruntime

    session = onnxruntime.InferenceSession(source if isinstance(source, bytes) else str(source),
                                           providers=["CPUExecutionProvider"])
    meta = read_metadata(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, ""))
    output = session.get_outputs()[0].name
    return (lambda x: session.run([output], {"images": x})[0]), meta


def _openvino_graph(model, precision: str):
    import openvino

    core = openvino.Core()
    if isinstance(model, bytes):
        model = openvino.convert_model(io.BytesIO(model))
    elif not isinstance(model, openvino.Model):
        path = Path(model)
        model = _read_graph(path)
        _openvino_shapes_bound(model, path)  # as OpenVINO infers them: an IR's own dims may lie
    # An IR written by imgclf export keeps its metadata at the top; an ONNX graph's lands under "framework".
    key = next((k for k in ([METADATA_KEY], ["framework", METADATA_KEY]) if model.has_rt_info(k)), None)
    meta = read_metadata(model.get_rt_info(key).astype(str) if key else "")
    config = {"PERFORMANCE_HINT": "LATENCY"}  # one request at a time, all cores on it: predict's batches
    if precision == "fp32":
        config["INFERENCE_PRECISION_HINT"] = "f32"  # OpenVINO would compute bf16 on CPUs that have it
    compiled = core.compile_model(model, "CPU", config)
    return (lambda x: compiled(x)[0]), meta


def _read_graph(path: Path):
    """An OpenVINO IR (.xml and its .bin) or an ONNX file, read by the frontend of its kind alone:
    `Core.read_model` tries every frontend on a damaged file, TensorFlow's printing its own parse errors on
    stderr, and then says only that no frontend could read it."""
    from openvino.frontend import FrontEndManager

    frontend = FrontEndManager().load_by_framework("ir" if path.suffix.lower() == ".xml" else "onnx")
    return frontend.convert(frontend.load(str(path)))


@contextlib.contextmanager
def _quiet_quantizer():
    """The quantizers' progress bars and notes go to standard error (standard output is the export's report),
    and their INFO logs and torch's note on a missing CUDA (printed when NNCF imports torch's extensions) not at all."""
    loggers = [logging.getLogger(name) for name in ("nncf", "torch.utils.cpp_extension", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ---------------------------------------------------------------- bounds before a runtime reads a graph
# A runtime allocates what a graph declares before it runs anything: an 812-byte ONNX file whose
# ConstantOfShape asks for 2**40 floats takes the memory it asks for. So the constants a graph holds and every
# tensor whose size its constants fix are measured first, from the file alone. imgclf writes each graph as
# one protobuf, which cannot exceed 2 GiB, so no graph it exported holds more constants than MAX_CONSTANTS;
# no classifier's single tensor at one picture comes near MAX_TENSOR (resnet50's largest activation is 3 MB,
# vit_h_14's largest weight 26 MB).

MAX_CONSTANTS = 2 << 30  # bytes of weights and constants in an exported graph
MAX_TENSOR = 1 << 30  # bytes of any one tensor the graph fixes the size of, at one picture
MAX_IR_XML = 256 << 20  # bytes of an OpenVINO IR's .xml (the graph's description, its weights are in the .bin)


def _too_big(path: Path, what: str, size: int, limit: int) -> UserError:
    return UserError(f"{shown(path)} asks for {size:,} bytes for {what}, over the {limit:,} an exported "
                     f"classifier could need: refused before it is run (a damaged or hostile file)")


def _onnx_bound(path: Path) -> None:
    """UserError unless the ONNX file's constants (initializers, Constant nodes, external data within its own
    folder) total at most MAX_CONSTANTS bytes and no tensor whose size shape inference can fix from them (a
    ConstantOfShape, Expand, Tile, Range, Resize...) at one picture exceeds MAX_TENSOR."""
    import onnx

    if path.stat().st_size > MAX_CONSTANTS + MAX_IR_XML:
        raise _too_big(path, "the file itself", path.stat().st_size, MAX_CONSTANTS + MAX_IR_XML)
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf's decode errors have several types
        raise UserError(f"cannot read {shown(path)}: not an ONNX model, or damaged ({reason_of(err, 160)})") from None
    total = 0
    for tensor in _onnx_constants(model.graph):
        size = _onnx_tensor_bytes(tensor)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external(path, tensor)
        total += size
        if total > MAX_CONSTANTS:
            raise _too_big(path, "its constants", total, MAX_CONSTANTS)
    for name, size in _onnx_inferred_sizes(path, model):
        if size > MAX_TENSOR:
            raise _too_big(path, f"the tensor {shown(name)}", size, MAX_TENSOR)


def _onnx_constants(graph):
    """Every TensorProto a graph and its subgraphs hold: initializers and Constant nodes' values."""
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield attr.sparse_tensor.values
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _onnx_constants(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _onnx_constants(sub)


def _onnx_tensor_bytes(tensor) -> int:
    """The bytes `tensor` declares: its dimensions' product times its element size (not what is stored)."""
    elements = 1
    for dim in tensor.dims:
        elements *= max(dim, 0)
    return elements * _onnx_item_size(tensor.data_type) + sum(map(len, tensor.string_data))


def _onnx_item_size(data_type: int) -> int:
    import onnx

    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize or 1
    except (KeyError, ValueError, TypeError):
        return 8


def _check_external(path: Path, tensor) -> None:
    """UserError unless an external-data entry names a regular file inside the model's own folder."""
    entry = {e.key: e.value for e in tensor.external_data}
    folder = path.resolve().parent
    target = (folder / entry.get("location", "")).resolve()
    if not target.is_relative_to(folder) or target == folder:
        raise UserError(f"{shown(path)}: its tensor {shown(tensor.name)} reads {shown(entry.get('location'))}, "
                        f"outside the model's folder: refused")
    problem = not_regular(target)
    if problem is not None:
        raise UserError(f"{shown(path)}: its tensor {shown(tensor.name)} reads {shown(target)}: {problem}")


def _onnx_inferred_sizes(path: Path, model):
    """(name, bytes) of every tensor whose shape ONNX shape inference fixes with the inputs at one picture.
    Inference runs on a light copy: large initializers become inputs of their type and shape."""
    import onnx

    graph = model.graph
    small = [t for t in graph.initializer if _onnx_tensor_bytes(t) <= 4096]  # shape data inference may need
    large = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
             for t in graph.initializer if _onnx_tensor_bytes(t) > 4096]
    inputs = [onnx.ValueInfoProto() for _ in graph.input]
    for copy, original in zip(inputs, graph.input, strict=True):
        copy.CopyFrom(original)
        for dim in copy.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = 1  # the batch: one picture
    light = onnx.helper.make_model(
        onnx.helper.make_graph(graph.node, graph.name, inputs + large, graph.output, small),
        opset_imports=model.opset_import, ir_version=model.ir_version)
    light.functions.extend(model.functions)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True).graph
    except Exception as err:  # noqa: BLE001 - onnx raises its own kinds for inconsistent graphs
        raise UserError(f"cannot read {shown(path)}: its graph is inconsistent ({reason_of(err, 160)})") from None
    for info in [*inferred.value_info, *inferred.output]:
        dims = info.type.tensor_type.shape.dim
        if info.type.HasField("tensor_type") and all(d.HasField("dim_value") for d in dims):
            elements = 1
            for d in dims:
                elements *= max(d.dim_value, 0)
            yield info.name, elements * _onnx_item_size(info.type.tensor_type.elem_type)


def _openvino_bound(path: Path) -> None:
    """UserError unless the IR's .xml is of a sane size, its .bin within MAX_CONSTANTS, every constant it
    declares lies inside the .bin, and no port it declares holds over MAX_TENSOR bytes at one picture."""
    import xml.etree.ElementTree as ET

    weights = path.with_suffix(".bin")
    if path.stat().st_size > MAX_IR_XML:
        raise _too_big(path, "its graph description", path.stat().st_size, MAX_IR_XML)
    if weights.exists() and weights.stat().st_size > MAX_CONSTANTS:
        raise _too_big(weights, "its constants", weights.stat().st_size, MAX_CONSTANTS)
    available = weights.stat().st_size if weights.exists() else 0
    try:
        root = ET.parse(path).getroot()  # expat bounds entity expansion (billion laughs) itself
    except (ET.ParseError, ValueError) as err:
        raise UserError(f"cannot read {shown(path)}: not an OpenVINO model, or damaged ({err})") from None
    for data in root.iter("data"):
        if "offset" in data.attrib and "size" in data.attrib:
            end = _number(data.get("offset")) + _number(data.get("size"))
            if end > available:
                raise UserError(f"{shown(path)} declares constants up to byte {end:,} of {shown(weights.name)}, "
                                f"which holds {available:,}: damaged, or not its weights")
    for port in root.iter("port"):
        elements = 1
        for dim in port.iter("dim"):
            elements *= max(_number(dim.text), 1)  # a dynamic dimension (-1, ?): one picture
        if elements * 4 > MAX_TENSOR:
            raise _too_big(path, f"a tensor of {elements:,} values", elements * 4, MAX_TENSOR)


def _openvino_shapes_bound(model, path: Path) -> None:
    """UserError when a tensor of the read (not yet compiled) model, its shapes as OpenVINO inferred them,
    holds over MAX_TENSOR bytes at one picture."""
    for op in model.get_ordered_ops():
        for output in op.outputs():
            elements = 1
            for dim in output.get_partial_shape():
                elements *= max(dim.get_length(), 0) if dim.is_static else 1
            size = elements * max(output.get_element_type().size, 1)
            if size > MAX_TENSOR:
                raise _too_big(path, f"the tensor {shown(op.get_friendly_name())}", size, MAX_TENSOR)


def _number(text) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        return -1


# ---------------------------------------------------------------- the table

_ONNX = {"onnx": "onnx", "onnxscript": "onnxscript"}
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", ".onnx", "an ONNX model", "onnx (onnxruntime or OpenVINO, any language)", True,
           _onnx_build, _onnx_save, _onnx_open, runtimes=("openvino", "onnxruntime"), check_runtime="onnxruntime",
           requires=_ONNX, quantize=_onnx_quantize, int8_requires={"nncf": "nncf", "onnxruntime": "onnxruntime"},
           int8_method="NNCF post-training quantization, ONNX backend (QDQ)", suffixes=(".onnx",),
           bound=_onnx_bound),
    Format("openvino", ".xml", "an OpenVINO model", "openvino (OpenVINO IR: NAME.xml + NAME.bin)", True,
           _openvino_build, _openvino_save, _openvino_open, runtimes=("openvino",), check_runtime="openvino",
           requires={**_ONNX, "openvino": "openvino"}, quantize=_openvino_quantize, int8_requires={"nncf": "nncf"},
           int8_method="NNCF post-training quantization, OpenVINO backend", companions=(".bin",),
           suffixes=(".xml",), bound=_openvino_bound),
    Format("safetensors", ".safetensors", "a safetensors file", "safetensors (the weights alone)", False,
           _safetensors_build, _safetensors_save, requires={"safetensors": "safetensors"}),
    Format("torchscript", ".torchscript.pt", "a TorchScript model", "torchscript (torch.jit.load, Python or C++)",
           True, _torchscript_build, _torchscript_save, _torchscript_open, runtimes=("torch",),
           check_runtime="torch", sniff=_torchscript_sniff),
)}
