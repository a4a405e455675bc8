"""Use exported models and pictures from anywhere (issue 13.6): predict and eval take an exported .onnx or
TorchScript file as well as a checkpoint; predict takes http(s) URLs (size limit, timeout, one line on failure)
and "-" for a picture on standard input."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading

import pytest
import torch
from conftest import write_class_folder

from imgclf.checkpoint import build_checkpoint, save_checkpoint
from imgclf.cli import main
from imgclf.config import TrainConfig
from imgclf.models import TutorialCNN

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow  # two exports and a subprocess: about 11 s


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A checkpoint of a (random) TutorialCNN for 16x16 pictures of three classes, its ONNX and TorchScript
    exports, and a folder of test pictures."""
    root = tmp_path_factory.mktemp("use")
    data = write_class_folder(root / "data", ["a", "b", "c"], 4, size=16)
    torch.manual_seed(0)
    ckpt = build_checkpoint(model_name="tutorial_cnn", classes=["a", "b", "c"], channels=3, size=16,
                            mean=[0.5] * 3, std=[0.25] * 3, config=TrainConfig().to_dict(),
                            state={"state_dict": TutorialCNN(num_classes=3, img_size=16).state_dict()})
    save_checkpoint(root / "m.pt", ckpt)
    for fmt in ("onnx", "torchscript"):
        assert main(["export", str(root / "m.pt"), "--format", fmt]) == 0
    return {"root": root, "data": data, "pt": root / "m.pt", "onnx": root / "m.onnx",
            "torchscript": root / "m.torchscript.pt"}


def predictions(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["predict", *map(str, argv), "--json", "--device", "cpu"]) == 0
    return {r["path"]: r["top"] for r in map(json.loads, capsys.readouterr().out.splitlines())}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_predict_and_eval_take_exported_models(exported, capsys, fmt):
    want = predictions(capsys, exported["pt"], exported["data"])
    got = predictions(capsys, exported[fmt], exported["data"])
    assert got.keys() == want.keys()
    for path in want:
        assert got[path][0]["label"] == want[path][0]["label"]
        assert got[path][0]["probability"] == pytest.approx(want[path][0]["probability"], abs=1e-4)
    evals = []
    for model in (exported["pt"], exported[fmt]):
        assert main(["eval", str(model), "--data", str(exported["data"]), "--json", "--device", "cpu"]) == 0
        evals.append(json.loads(capsys.readouterr().out))
    assert evals[0]["count"] == evals[1]["count"] == 12 and evals[0]["split"] == evals[1]["split"] == "all"
    assert evals[1]["accuracy"] == pytest.approx(evals[0]["accuracy"])
    assert evals[1]["loss"] == pytest.approx(evals[0]["loss"], abs=1e-4)


class Pictures(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass


def test_urls_and_standard_input(exported, capsys):
    folder = exported["data"] / "a"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a: Pictures(*a, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/0000.png"
        local = predictions(capsys, exported["pt"], folder / "0000.png")
        remote = predictions(capsys, exported["pt"], url)
        assert remote[url] == local[str(folder / "0000.png")]
        capsys.readouterr()
        code = main(["predict", str(exported["pt"]), f"http://127.0.0.1:{server.server_port}/none.png",
                     "http://127.0.0.1:9/x.png", "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 2 and all("could not fetch it" in line for line in err), err
    finally:
        server.shutdown()
    piped = subprocess.run([sys.executable, "-m", "imgclf", "predict", str(exported["pt"]), "-", "--json"],
                           input=(folder / "0000.png").read_bytes(), capture_output=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["top"] == local[str(folder / "0000.png")]
