"""Exported graphs are measured before any runtime reads them (formats.MAX_CONSTANTS, MAX_TENSOR): a tiny
hostile .onnx or OpenVINO IR that asks for gigabytes is refused in one line, within a memory bound, and
real exports still load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_class_folder
from PIL import Image

from imgclf import formats
from imgclf.cli import main
from imgclf.errors import UserError

onnx = pytest.importorskip("onnx")
helper, TensorProto = onnx.helper, onnx.TensorProto
META = {"format": "imgclf-export", "model": {"name": "tutorial_cnn"}, "classes": ["a", "b"],
        "input": {"channels": 3, "size": 8}}


def graph_file(path: Path, length: int = 1000, *, extra=(), external: str | None = None) -> Path:
    """A valid imgclf-looking .onnx whose probabilities depend on a ConstantOfShape of `length` floats
    (812 bytes in the report, asking 2 GB): the runtime allocates that tensor on reading or first run."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [length])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=one),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
             helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["f", "axes"], ["m"], keepdims=0),
             helper.make_node("Add", ["m", "s"], ["m2"]),
             helper.make_node("Unsqueeze", ["m2", "ax1"], ["u"]),
             helper.make_node("Concat", ["u", "u"], ["probabilities"], axis=1)]
    inits = [shape, helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
             helper.make_tensor("ax1", TensorProto.INT64, [1], [1]), *extra]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["b", 3, 8, 8])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["b", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    helper.set_model_props(model, {formats.METADATA_KEY: json.dumps(META)})
    path.write_bytes(model.SerializeToString())
    return path


def external_tensor(location: str, length: int = 16) -> object:
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [length // 4], [0.0] * (length // 4))
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def picture(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (9, 99, 199)).save(folder / "x.png")
    return folder / "x.png"


def bounded_child() -> None:
    """argv: PICTURE FILES... predict each file in a process whose address space may grow by 1.5 GiB at most;
    print one JSON line: file -> [exit code, standard error]."""
    import contextlib
    import io
    import resource

    import onnx  # noqa: F401
    import openvino  # noqa: F401

    import imgclf.predict  # noqa: F401 - imported before the limit, as the command would have it

    size = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + (3 << 29), size + (3 << 29)))
    out = {}
    for name in sys.argv[2:]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(["predict", name, sys.argv[1], "--device", "cpu"])
            except BaseException as exc:  # noqa: BLE001 - reported: the test fails on it
                code = f"{type(exc).__name__}: {exc}"[:300]
        out[name] = [code, err.getvalue()]
    print(json.dumps(out))


@pytest.mark.slow  # over a second (a training or a real process): the fast tier stays under a minute
def test_a_tiny_graph_asking_gigabytes_is_refused_in_one_line_within_a_memory_bound(tmp_path):
    pytest.importorskip("openvino")
    image = picture(tmp_path / "pics")
    files = {"2 GB": graph_file(tmp_path / "two.onnx", 540_000_000),  # the report's: 2.1 GB before
             "4 TB": graph_file(tmp_path / "huge.onnx", 10**12)}
    assert all(path.stat().st_size < 1000 for path in files.values())
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_graph_bounds; " \
           f"test_graph_bounds.bounded_child()"
    proc = subprocess.run([sys.executable, "-c", code, str(image), *map(str, files.values())],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for path in files.values():
        code, err = result[str(path)]
        assert code == 2, (path, code, err)
        assert err.count("\n") == 1 and "refused before it is run" in err and "tensor big" in err, err


def test_the_same_graph_of_a_sane_size_runs(tmp_path, capsys):
    """The crafted graph is valid: only its size is refused."""
    image = picture(tmp_path / "pics")
    assert main(["predict", str(graph_file(tmp_path / "small.onnx", 1000)), str(image), "--device", "cpu"]) == 0
    assert "a " in capsys.readouterr().out


def test_constants_are_bounded_by_what_they_declare(tmp_path):
    big = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 29])  # 2 GiB declared, nothing stored
    path = graph_file(tmp_path / "consts.onnx", extra=[big])
    with pytest.raises(UserError, match="for its constants"):
        formats.check_files(formats.FORMATS["onnx"], path)


def test_external_data_outside_the_folder_or_not_a_file_is_refused(tmp_path):
    (tmp_path / "outside.bin").write_bytes(bytes(16))
    (tmp_path / "model").mkdir()
    for location, words in (("../outside.bin", "outside the model's folder"), ("/etc/passwd", "outside"),
                            ("fifo.bin", "not a regular file")):
        if location == "fifo.bin":
            os.mkfifo(tmp_path / "model" / "fifo.bin")
        path = graph_file(tmp_path / "model" / "m.onnx", extra=[external_tensor(location)])
        with pytest.raises(UserError, match=words):
            formats.check_files(formats.FORMATS["onnx"], path)
    (tmp_path / "model" / "w.bin").write_bytes(bytes(16))
    formats.check_files(formats.FORMATS["onnx"], graph_file(tmp_path / "model" / "m.onnx",
                                                            extra=[external_tensor("w.bin")]))


def ir_file(path: Path, length: int) -> Path:
    """The same graph as `graph_file` as an OpenVINO IR: a Broadcast of one float to `length` values."""
    import numpy as np
    import openvino
    import openvino.opset13 as ops

    def const(*values):
        return ops.constant(np.array(values, np.int64))

    images = ops.parameter([-1, 3, 8, 8], openvino.Type.u8, name="images")
    mean = ops.reduce_mean(ops.convert(images, "f32"), const(1, 2, 3), False)
    total = ops.reduce_sum(ops.broadcast(ops.constant(np.float32(1)), const(length)), const(0), False)
    both = ops.unsqueeze(ops.add(mean, total), const(1))
    model = openvino.Model([ops.concat([both, both], 1)], [images])
    model.set_rt_info(json.dumps(META), [formats.METADATA_KEY])
    openvino.serialize(model, str(path))  # as built: no constant folding
    return path


def test_an_ir_declaring_more_than_its_weights_or_a_huge_tensor_is_refused(tmp_path, capsys):
    pytest.importorskip("openvino")
    image = picture(tmp_path / "pics")
    xml = ir_file(tmp_path / "m.xml", 1000).read_text()
    assert main(["predict", str(tmp_path / "m.xml"), str(image), "--device", "cpu"]) == 0
    for name, text, words in (
            ("far", xml.replace('offset="0"', 'offset="99999999"', 1), "declares constants up to byte"),
            ("wide", xml.replace("<dim>1000</dim>", "<dim>540000000</dim>"), "refused before it is run"),
            # dims that lie: the Broadcast's target still asks 2 GB once OpenVINO infers its shape
            ("liar", ir_file(tmp_path / "liar.xml", 540_000_000).read_text().replace(
                "<dim>540000000</dim>", "<dim>1000</dim>"), "tensor Broadcast")):
        assert text != xml or name == "liar"
        (tmp_path / f"{name}.xml").write_text(text)
        if name != "liar":  # its own weights: the target shape
            (tmp_path / f"{name}.bin").write_bytes((tmp_path / "m.bin").read_bytes())
        capsys.readouterr()
        assert main(["predict", str(tmp_path / f"{name}.xml"), str(image), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (name, err)


@pytest.mark.slow
def test_real_exports_still_load(tmp_path, capsys):
    pytest.importorskip("openvino")
    classes = ["circle", "square"]
    write_class_folder(tmp_path / "data" / "train", classes, 8, size=16, seed=1)
    write_class_folder(tmp_path / "data" / "test", classes, 2, size=16, seed=2)
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--device", "cpu",
                 "--model", "tutorial_cnn", "--epochs", "1"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    for fmt, name in (("onnx", "m.onnx"), ("openvino", "m.xml")):
        assert main(["export", str(ckpt), "--format", fmt, "--out", str(tmp_path / name)]) == 0
        formats.check_files(formats.FORMATS[fmt], tmp_path / name)
        capsys.readouterr()
        assert main(["predict", str(tmp_path / name), str(tmp_path / "data" / "test"), "--device", "cpu"]) == 0
        assert capsys.readouterr().out.count("\n") == 4


def test_a_url_with_control_characters_is_a_failed_download_not_a_traceback():
    """http.client's InvalidURL is neither OSError nor ValueError: it escaped download() as a traceback."""
    from imgclf.download import DownloadFailed, download

    with pytest.raises(DownloadFailed, match="control characters"):
        download("http://127.0.0.1:9/\x1b[31m\nx.png", max_bytes=10, seconds=5)
