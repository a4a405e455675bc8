"""Deploying: OpenVINO IR and int8 exports (imgclf export --format openvino, --int8), and predict / eval running
exported graphs in the fastest runtime installed."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
from conftest import write_class_folder

from imgclf import predict
from imgclf.cli import main
from imgclf.errors import UserError
from imgclf.transforms import load_image

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    """tutorial_cnn trained briefly on three classes of 24x24 pictures: (checkpoint, data folder, test pictures)."""
    root = tmp_path_factory.mktemp("deploy")
    write_class_folder(root / "data" / "train", CLASSES, 24, size=24, seed=1)
    write_class_folder(root / "data" / "test", CLASSES, 8, size=24, seed=2, fmt="jpg")
    assert main(["train", "--data", str(root / "data"), "--out", str(root / "run"), "--model", "tutorial_cnn",
                 "--epochs", "2", "--device", "cpu", "--precision", "fp32"]) == 0
    return root / "run" / "checkpoints" / "best.pt", root / "data", sorted((root / "data" / "test").glob("*/*.jpg"))


def cli(*args) -> tuple[int, str]:
    """Run the command in this process; (exit status, standard output)."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main([str(a) for a in args])
    return code, out.getvalue()


def predicted(model: Path, images: list[Path]) -> dict[str, list[dict]]:
    code, out = cli("predict", model, *images, "--json", "--topk", "3", "--device", "cpu")
    assert code == 0
    return {row["path"]: row["top"] for row in map(json.loads, out.splitlines())}


@pytest.mark.slow
def test_openvino_export_predicts_as_the_checkpoint(run, tmp_path, capsys):
    ckpt, data, images = run
    code, out = cli("export", ckpt, "--format", "openvino", "--out", tmp_path / "m.xml")
    assert code == 0 and out.startswith(f"wrote {tmp_path / 'm.xml'} and m.bin (")
    assert float(out.rsplit("checkpoint ", 1)[1]) < 1e-4
    assert (tmp_path / "m.bin").stat().st_size > 100_000  # float32 weights (not compressed to fp16)
    want, got = predicted(ckpt, images), predicted(tmp_path / "m.xml", images)
    for path, top in want.items():
        assert [t["label"] for t in got[path]] == [t["label"] for t in top]
        for g, w in zip(got[path], top, strict=True):
            assert g["probability"] == pytest.approx(w["probability"], abs=1e-5)
    code, out = cli("eval", tmp_path / "m.xml", "--data", data, "--json")
    want_code, want_out = cli("eval", ckpt, "--data", data, "--json", "--device", "cpu")
    assert code == want_code == 0 and json.loads(out)["confusion"] == json.loads(want_out)["confusion"]
    assert cli("export", ckpt, "--format", "openvino", "--out", tmp_path / "m.onnx")[0] == 2
    assert "an OpenVINO model is a .xml file" in capsys.readouterr().err


@pytest.mark.slow
def test_onnx_runs_in_openvino_where_installed_and_agrees_with_onnxruntime(run, tmp_path, monkeypatch):
    import numpy as np
    import torch

    ckpt, _, images = run
    assert cli("export", ckpt, "--format", "onnx", "--out", tmp_path / "m.onnx")[0] == 0
    fastest = predict.Predictor.from_path(tmp_path / "m.onnx")
    plain = predict.Predictor.from_path(tmp_path / "m.onnx", runtime="onnxruntime")
    assert (fastest.runtime, plain.runtime) == ("openvino", "onnxruntime")
    x = torch.from_numpy(np.stack([load_image(p, size=24, channels=3).transpose(2, 0, 1) for p in images]))
    assert torch.allclose(fastest.probabilities(x), plain.probabilities(x), atol=1e-5)
    real = predict.importlib.util.find_spec
    monkeypatch.setattr(predict.importlib.util, "find_spec", lambda name: None if name == "openvino" else real(name))
    assert predict.Predictor.from_path(tmp_path / "m.onnx").runtime == "onnxruntime"
    (tmp_path / "m.xml").write_text("<net/>")  # never read: the missing runtime is said first
    with pytest.raises(UserError, match=r"is an OpenVINO model; running it needs openvino: pip install 'imgclf\[export\]'"):
        predict.ExportedPredictor(tmp_path / "m.xml", "openvino")
    with pytest.raises(UserError, match="unknown runtime 'tvm' for onnx; choose one of auto, openvino, onnxruntime"):
        predict.choose_runtime("onnx", "tvm")
    with pytest.raises(UserError, match=f"no such file: {tmp_path / 'missing.xml'}"):
        predict.Predictor.from_path(tmp_path / "missing.xml")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_int8_export_reports_its_accuracy_and_runs_in_predict_and_eval(run, fmt):
    ckpt, data, images = run
    code, out = cli("export", ckpt, "--format", fmt, "--int8")
    path = ckpt.with_name(f"best.int8.{'onnx' if fmt == 'onnx' else 'xml'}")
    assert code == 0 and out.startswith(f"wrote {path}")
    assert f"on 24 pictures of the test split of {data}" in out  # the checkpoint's data set, found by itself
    assert f"calibrated on 72 training pictures of {data}" in out  # all of them: fewer than 300
    meta = predict.ExportedPredictor(path, fmt).metadata
    q = meta["quantization"]
    assert q["precision"] == "int8" and q["pictures"] == 24
    assert f"int8 accuracy {q['int8_accuracy']:.2%} against float {q['float_accuracy']:.2%}" in out
    assert q["float_accuracy"] - q["int8_accuracy"] <= 0.01 + 1e-9  # these pictures are easy: no loss allowed
    assert _int8_ops(path, fmt)  # really quantized
    code, out = cli("eval", path, "--data", data, "--json")
    assert code == 0 and json.loads(out)["accuracy"] == pytest.approx(q["int8_accuracy"])  # what export said
    answers = predicted(path, images)
    assert len(answers) == len(images) and all(top[0]["label"] in CLASSES for top in answers.values())


def _int8_ops(path: Path, fmt: str) -> bool:
    if fmt == "onnx":
        import onnx

        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        return {"QuantizeLinear", "DequantizeLinear"} <= ops
    import openvino

    return any(op.get_type_name() == "FakeQuantize" for op in openvino.Core().read_model(str(path)).get_ops())


@pytest.mark.slow
def test_int8_needs_reachable_calibration_pictures_and_says_so_in_one_line(run, tmp_path, capsys):
    ckpt, data, _ = run
    moved = tmp_path / "elsewhere"
    shutil.copytree(data, moved)
    copy = tmp_path / "model.pt"
    shutil.copy(ckpt, copy)
    # the recorded data set is gone: a checkpoint taken to another machine
    recorded = tmp_path / "gone"
    import torch

    saved = torch.load(copy, weights_only=True)
    saved["config"]["data"]["data"] = str(recorded)
    torch.save(saved, copy)
    assert cli("export", copy, "--format", "onnx", "--int8")[0] == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"its data set '{recorded}' is not reachable here" in err
    assert "give --calibration-data FOLDER" in err
    code, out = cli("export", copy, "--format", "onnx", "--int8", "--calibration-data", moved, "--calibration-size", "20")
    assert code == 0 and f"calibrated on 20 training pictures of {moved}" in out
    assert f"pictures of the test split of {moved}" in out  # held-out pictures from there too
    other = write_class_folder(tmp_path / "other", ["cat", "dog"], 4, size=24)
    assert cli("export", copy, "--format", "onnx", "--int8", "--calibration-data", moved, "--eval-data", other,
               "--out", tmp_path / "other.onnx")[0] == 2
    assert "give --eval-data a data set of the checkpoint's classes" in capsys.readouterr().err


def test_int8_flags_are_checked(run, capsys):
    ckpt, data, _ = run
    assert cli("export", ckpt, "--format", "torchscript", "--int8")[0] == 2
    assert "--int8 is for --format onnx or openvino, not torchscript" in capsys.readouterr().err
    assert cli("export", ckpt, "--format", "onnx", "--calibration-data", data)[0] == 2
    assert "go with --int8" in capsys.readouterr().err
    assert cli("export", ckpt, "--format", "onnx", "--int8", "--calibration-size", "0")[0] == 2
    assert "--calibration-size" in capsys.readouterr().err


@pytest.mark.slow
def test_int8_on_ants_and_bees_photos_loses_at_most_a_point(hymenoptera_dir, tmp_path):
    """Real photos: tutorial_cnn at 64 px trained briefly; each int8 export within a point of its float graph."""
    assert main(["train", "--data", str(hymenoptera_dir), "--out", str(tmp_path / "run"), "--model", "tutorial_cnn",
                 "--img-size", "64", "--epochs", "4", "--device", "cpu"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    for fmt in ("onnx", "openvino"):
        code, out = cli("export", ckpt, "--format", fmt, "--int8")
        assert code == 0, out
        meta = predict.Predictor.from_path(ckpt.with_name(f"best.int8.{'onnx' if fmt == 'onnx' else 'xml'}")).metadata
        q = meta["quantization"]
        assert q["pictures"] == 153 and q["float_accuracy"] > 0.55, q
        assert q["float_accuracy"] - q["int8_accuracy"] <= 0.01 + 1e-9, q


@pytest.mark.slow  # an OpenVINO conversion: several seconds
def test_openvino_never_replaces_a_bin_it_was_not_asked_to(run, tmp_path, capsys):
    """Issue 24.2: `--out NAME.xml` also writes NAME.bin: an existing one (the user's, or a checkpoint) is
    refused in one line unless --force, and a checkpoint named NAME.bin even with it."""
    ckpt, _, _ = run
    (tmp_path / "m.bin").write_bytes(b"the user's data")
    assert cli("export", ckpt, "--format", "openvino", "--out", tmp_path / "m.xml")[0] == 2
    err = capsys.readouterr().err
    assert err == (f"imgclf: error: {tmp_path / 'm.bin'} (written beside m.xml) already exists; choose another "
                   f"--out, or add --force to replace it\n")
    assert (tmp_path / "m.bin").read_bytes() == b"the user's data" and not (tmp_path / "m.xml").exists()
    shutil.copy(ckpt, tmp_path / "w.bin")  # a checkpoint under another name
    assert cli("export", ckpt, "--format", "openvino", "--out", tmp_path / "w.xml", "--force")[0] == 2
    assert "w.bin (written beside w.xml) is a checkpoint: an export never replaces one" in capsys.readouterr().err
    assert (tmp_path / "w.bin").read_bytes() == ckpt.read_bytes()
    code, out = cli("export", ckpt, "--format", "openvino", "--out", tmp_path / "m.xml", "--force")
    assert code == 0 and out.startswith(f"wrote {tmp_path / 'm.xml'} and m.bin (")


@pytest.mark.slow  # an OpenVINO conversion: several seconds
def test_a_fifo_beside_an_openvino_model_is_refused_not_read(run, tmp_path, capsys):
    """Issue 24.11: NAME.bin a FIFO beside NAME.xml: predict and eval say so in one line instead of waiting
    for ever on it (serve loads through the same Predictor.from_path)."""
    import os
    import threading

    ckpt, data, images = run
    assert cli("export", ckpt, "--format", "openvino", "--out", tmp_path / "m.xml")[0] == 0
    (tmp_path / "m.bin").unlink()
    os.mkfifo(tmp_path / "m.bin")
    results = []
    for argv in (["predict", tmp_path / "m.xml", images[0]], ["eval", tmp_path / "m.xml", "--data", data]):
        worker = threading.Thread(target=lambda a=argv: results.append(cli(*a)[0]), daemon=True)
        worker.start()
        worker.join(120)
        assert not worker.is_alive(), f"{argv[0]} waits on the FIFO"
        err = capsys.readouterr().err
        assert err == f"imgclf: error: {tmp_path / 'm.bin'} (beside m.xml): not a regular file (a FIFO)\n"
    assert results == [2, 2]
    os.mkfifo(tmp_path / "x.xml")
    assert cli("predict", tmp_path / "x.xml", images[0])[0] == 2
    assert capsys.readouterr().err == f"imgclf: error: {tmp_path / 'x.xml'}: not a regular file (a FIFO)\n"
