"""imgclf export: each format runs in a process that cannot import imgclf and agrees with `imgclf predict`."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli, write_class_folder

from imgclf import export
from imgclf.cli import main
from imgclf.errors import UserError

# Runs with only torch / torchvision / onnxruntime / safetensors / numpy / PIL: imgclf is made unimportable first.
STANDALONE = r'''
import json, sys
sys.modules["imgclf"] = None  # any `import imgclf` below would fail: the export must stand alone
import numpy as np
import torch
from PIL import Image, ImageOps

job = json.loads(sys.argv[1])  # {"models": {format: path}, "images": [paths], "out": path}


def load(path, size, channels):
    """The input contract from the README: upright, RGB or L, shorter side to size (bilinear), centre crop."""
    mode = "RGB" if channels == 3 else "L"
    with Image.open(path) as img:
        img.draft(mode, (size, size))
        img = ImageOps.exif_transpose(img).convert(mode)
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8).reshape(size, size, channels).transpose(2, 0, 1)


def tutorial_cnn(num_classes, in_channels, img_size):
    """The architecture the safetensors weights belong to (note 21's network), written out here."""
    nn = torch.nn
    side = img_size // 8
    net = nn.Module()
    net.features = nn.Sequential(nn.Conv2d(in_channels, 32, 5, padding=2), nn.MaxPool2d(2),
                                 nn.Conv2d(32, 32, 5, padding=2), nn.MaxPool2d(2),
                                 nn.Conv2d(32, 64, 5, padding=2), nn.MaxPool2d(2))
    net.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 64), nn.Linear(64, num_classes))
    net.forward = lambda x: net.classifier(net.features(x))
    return net


def open_export(fmt, model_path):
    """-> (metadata, function uint8 batch -> probabilities)."""
    if fmt == "torchscript":
        extra = {"imgclf.json": ""}
        model = torch.jit.load(model_path, _extra_files=extra)
        return json.loads(extra["imgclf.json"]), lambda x: model(torch.from_numpy(x)).numpy()
    if fmt == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        meta = json.loads(session.get_modelmeta().custom_metadata_map["imgclf"])
        return meta, lambda x: session.run(["probabilities"], {"images": x})[0]
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(model_path, "pt") as f:
        meta = json.loads(f.metadata()["imgclf"])
    inp, name = meta["input"], meta["model"]["name"]
    if name == "tutorial_cnn":
        net = tutorial_cnn(len(meta["classes"]), inp["channels"], inp["size"])
    else:
        import torchvision
        net = torchvision.models.get_model(name, weights=None, num_classes=len(meta["classes"]))
    net.load_state_dict(load_file(model_path))
    net.eval()
    mean, std = torch.tensor(inp["mean"]).view(1, -1, 1, 1), torch.tensor(inp["std"]).view(1, -1, 1, 1)
    return meta, lambda x: net((torch.from_numpy(x).float() / 255 - mean) / std).softmax(1).numpy()


results = {}
with torch.inference_mode():
    for fmt, model_path in job["models"].items():
        meta, run = open_export(fmt, model_path)
        inp = meta["input"]
        batch = np.stack([load(p, inp["size"], inp["channels"]) for p in job["images"]])
        results[fmt] = {"classes": meta["classes"], "probs": run(batch).tolist()}
assert not any(name == "imgclf" or name.startswith("imgclf.") for name, m in sys.modules.items() if m is not None)
json.dump(results, open(job["out"], "w"))
'''


def train(data: Path, out: Path, *extra: str) -> Path:
    assert main(["train", "--data", str(data), "--out", str(out), "--device", "cpu", *extra]) == 0
    return out / "checkpoints" / "best.pt"


def predict_json(ckpt: Path, images: list[Path]) -> list[dict]:
    """What `imgclf predict --json` prints (run in this process: the same code path, without a torch start-up)."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["predict", str(ckpt), *map(str, images), "--json", "--topk", "1000", "--device", "cpu"]) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def run_standalone(tmp: Path, models: dict[str, Path], images: list[Path]) -> dict:
    """Run every export in `models` on `images` in one fresh process that cannot import imgclf."""
    script, out = tmp / "standalone.py", tmp / "standalone.json"
    script.write_text(STANDALONE)
    job = {"models": {f: str(p) for f, p in models.items()}, "images": list(map(str, images)), "out": str(out)}
    done = subprocess.run([sys.executable, str(script), json.dumps(job)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def assert_agrees(exported: dict, predicted: list[dict]) -> None:
    """Same top-1 as `imgclf predict` (unless predict itself has a near tie) and the same probabilities."""
    classes = exported["classes"]
    assert len(exported["probs"]) == len(predicted)
    for probs, pred in zip(exported["probs"], predicted, strict=True):
        top = pred["top"]
        for entry in top:
            assert probs[classes.index(entry["label"])] == pytest.approx(entry["probability"], abs=1e-4)
        if top[0]["probability"] - top[1]["probability"] > 1e-3:
            assert classes[max(range(len(probs)), key=probs.__getitem__)] == top[0]["label"], pred["path"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, list[Path], list[dict]]:
    """tutorial_cnn trained briefly on three classes of 24x24 pictures; held-out JPEGs; `imgclf predict` on them."""
    root = tmp_path_factory.mktemp("export-tiny")
    classes = ["circle", "square", "triangle"]
    write_class_folder(root / "data" / "train", classes, 16, size=24, seed=1)
    write_class_folder(root / "data" / "test", classes, 4, size=24, seed=2, fmt="jpg")
    ckpt = train(root / "data", root / "run", "--model", "tutorial_cnn", "--epochs", "2")
    images = sorted((root / "data" / "test").glob("*/*.jpg"))
    return ckpt, images, predict_json(ckpt, images)


@pytest.mark.slow
def test_every_format_runs_without_imgclf_and_agrees_with_predict(tiny_run, tmp_path, capsys):
    ckpt, images, predicted = tiny_run
    models = {}
    for fmt, suffix in export.FORMATS.items():
        models[fmt] = tmp_path / f"model{suffix}"
        assert main(["export", str(ckpt), "--format", fmt, "--out", str(models[fmt])]) == 0
        printed = capsys.readouterr().out
        assert printed.startswith(f"wrote {models[fmt]} (")
        if fmt != "safetensors":
            assert "input uint8 (N, 3, 24, 24) -> probabilities (N, 3)" in printed
            assert float(printed.rsplit("checkpoint ", 1)[1]) < 1e-4  # the exporter's own check ran
    exported = run_standalone(tmp_path, models, images)
    for fmt in export.FORMATS:
        assert_agrees(exported[fmt], predicted)


@pytest.mark.slow
def test_export_command_as_a_user_runs_it(tiny_run):
    """The installed command, in its own process, with the default output path beside the checkpoint."""
    ckpt, _, _ = tiny_run
    done = run_cli("export", ckpt, "--format", "torchscript")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {ckpt.parent / 'best.torchscript.pt'} (")
    assert done.stderr == ""  # torch.jit's deprecation warnings are not the user's concern
    assert (ckpt.parent / "best.torchscript.pt").is_file()


def test_metadata_records_classes_and_preprocessing(tiny_run, tmp_path):
    import torch
    from safetensors import safe_open

    ckpt, _, _ = tiny_run
    saved = torch.load(ckpt, weights_only=True)
    out = export.export_checkpoint(ckpt, "safetensors", tmp_path / "w.safetensors")
    with safe_open(str(out.path), "pt") as f:
        meta = json.loads(f.metadata()["imgclf"])
        keys = set(f.keys())
    assert meta["classes"] == ["circle", "square", "triangle"]
    assert meta["input"]["size"] == 24 and meta["input"]["channels"] == 3
    assert meta["input"]["mean"] == saved["input"]["mean"] and meta["input"]["std"] == saved["input"]["std"]
    assert meta["model"]["name"] == "tutorial_cnn"
    assert keys == set(saved["state_dict"])


def test_bad_inputs_are_one_line_errors(tiny_run, tmp_path, capsys):
    ckpt, _, _ = tiny_run
    assert main(["export", str(tmp_path / "missing.pt"), "--format", "onnx"]) == 2
    assert capsys.readouterr().err == f"imgclf: error: no such file: {tmp_path / 'missing.pt'}\n"
    assert main(["export", str(ckpt), "--format", "torchscript", "--out", str(ckpt)]) == 2
    assert capsys.readouterr().err == f"imgclf: error: --out {ckpt} is the checkpoint itself; choose another path\n"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(ckpt), "--format", "keras"])
    assert "invalid choice: 'keras'" in capsys.readouterr().err


def test_missing_packages_name_the_extra(monkeypatch):
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"needs the package\(s\) onnx, onnxscript: pip install 'imgclf\[export\]'"):
        export.check_requirements("onnx")
    export.check_requirements("torchscript")  # needs nothing beyond torch


@pytest.mark.slow
def test_torchvision_weights_load_into_torchvision_itself(tmp_path):
    """safetensors of a torchvision network load into torchvision's own constructor and agree with predict."""
    write_class_folder(tmp_path / "data", ["a", "b"], 8, size=32, seed=3)
    ckpt = train(tmp_path / "data", tmp_path / "run", "--model", "resnet18", "--epochs", "1", "--batch-size", "8",
                 "--val-fraction", "0.25")
    images = sorted((tmp_path / "data").glob("*/*.png"))[::3]
    out = export.export_checkpoint(ckpt, "safetensors", tmp_path / "r18.safetensors")
    assert_agrees(run_standalone(tmp_path, {"safetensors": out.path}, images)["safetensors"],
                  predict_json(ckpt, images))


@pytest.mark.slow
def test_hymenoptera_exports_agree_with_predict(hymenoptera_dir, tmp_path):
    """The ants/bees photos: a quickly trained tutorial_cnn at 64 px, every format, a dozen val photos."""
    ckpt = train(hymenoptera_dir, tmp_path / "run", "--model", "tutorial_cnn", "--img-size", "64", "--epochs", "1")
    images = sorted((hymenoptera_dir / "val" / "ants").glob("*.jpg"))[:6]
    images += sorted((hymenoptera_dir / "val" / "bees").glob("*.jpg"))[:6]
    models = {f: export.export_checkpoint(ckpt, f, tmp_path / f"hym{s}").path for f, s in export.FORMATS.items()}
    exported = run_standalone(tmp_path, models, images)
    predicted = predict_json(ckpt, images)
    for fmt in export.FORMATS:
        assert_agrees(exported[fmt], predicted)
