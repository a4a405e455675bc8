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

from imgclf import export, formats
from imgclf.cli import main
from imgclf.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process trainings: one intra-op thread (conftest)

# The input contract as the export's metadata states it (`input.preprocessing`), redone step by step with Pillow
# and numpy alone: run inside the standalone process, and in this one to compare with imgclf's own decoding.
LOAD = r'''
def load(path, size, channels):
    """The documented preprocessing: draft, upright, 16-bit scaled to 8 bits, transparency on white, RGB or
    L, shorter side to size (bilinear), centre crop."""
    mode = "RGB" if channels == 3 else "L"
    with Image.open(path) as img:
        img.draft(mode, (size, size))
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            v = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or v.max() > 255 else 255.0
            img = Image.fromarray(np.floor(np.clip(v / top * 255 + 0.5, 0, 255)).astype(np.uint8), "L")
        if img.mode in ("P", "PA", "LA", "La", "RGBA") or "transparency" in img.info:
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, img.convert("RGBA"))
        img = img.convert(mode)
        w, h = img.size
        if (w, h) != (size, size):
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8).reshape(size, size, channels).transpose(2, 0, 1)
'''

# Runs with only torch / torchvision / onnxruntime / safetensors / numpy / PIL: imgclf is made unimportable first.
STANDALONE = r'''
import json, sys
sys.modules["imgclf"] = None  # any `import imgclf` below would fail: the export must stand alone
import numpy as np
import torch
from PIL import Image, ImageOps

job = json.loads(sys.argv[1])  # {"models": {format: path}, "images": [paths], "out": path}
''' + LOAD + r'''

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
    if fmt == "openvino":
        import openvino
        model = openvino.Core().read_model(model_path)
        compiled = openvino.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return json.loads(model.get_rt_info(["imgclf"]).astype(str)), lambda x: compiled(x)[0]
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
    t = meta.get("temperature", 1.0)  # as its output's meaning says: logits / temperature before the softmax
    return meta, lambda x: (net((torch.from_numpy(x).float() / 255 - mean) / std) / t).softmax(1).numpy()


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
    """What `imgclf predict --json --precision fp32` prints (run in this process: the same code path, without a
    torch start-up). fp32, as the exports compute: a checkpoint's default, bf16 where the CPU has it, gives the
    same labels but probabilities off by bf16's rounding (3e-4 on a trained network's confident answers)."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["predict", str(ckpt), *map(str, images), "--json", "--topk", "1000", "--device", "cpu",
                     "--precision", "fp32"]) == 0
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
    for fmt, form in formats.FORMATS.items():
        models[fmt] = tmp_path / f"model{form.suffix}"
        assert main(["export", str(ckpt), "--format", fmt, "--out", str(models[fmt])]) == 0
        printed = capsys.readouterr().out
        weights = " and model.bin" if fmt == "openvino" else ""
        assert printed.startswith(f"wrote {models[fmt]}{weights} (")
        if form.graph:  # a weights-alone format prints its own line
            assert "input uint8 (N, 3, 24, 24) -> probabilities (N, 3)" in printed
            assert float(printed.rsplit("checkpoint ", 1)[1]) < 1e-4  # the exporter's own check ran
    exported = run_standalone(tmp_path, models, images)
    for fmt in formats.FORMATS:
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
    monkeypatch.setattr(formats.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"needs the package\(s\) onnx, onnxscript: pip install 'imgclf\[export\]'"):
        formats.FORMATS["onnx"].check_requirements()
    formats.FORMATS["torchscript"].check_requirements()  # needs nothing beyond torch


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
    models = {f: export.export_checkpoint(ckpt, f, tmp_path / f"hym{form.suffix}").path
              for f, form in formats.FORMATS.items()}
    exported = run_standalone(tmp_path, models, images)
    predicted = predict_json(ckpt, images)
    for fmt in formats.FORMATS:
        assert_agrees(exported[fmt], predicted)


def png_16bit(path: Path, values) -> Path:
    """A PNG of 16 bits per channel (grey, RGB or RGBA by the last axis), written by hand: Pillow cannot save
    16-bit colour."""
    import struct
    import zlib

    import numpy as np

    arr = np.asarray(values, dtype=">u2")
    h, w, c = arr.shape
    raw = b"".join(b"\0" + arr[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def awkward_pictures(folder: Path) -> list[Path]:
    """Pictures imgclf converts before the model sees them: 16-bit grey and colour, RGBA with graded alpha, a
    palette with a transparent entry, grey with alpha; 40x30, with the classes' colours and stripes in them."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:30, 0:40]
    rgb = np.stack([60 + 0 * xx, 200 - 70 * (xx // 20), 40 + (yy // 2 % 2) * 60], -1) + rng.normal(0, 20, (30, 40, 3))
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    alpha = np.clip(xx * 7, 0, 255).astype(np.uint8)
    grey16 = (rgb.mean(-1) * 257 * 0.9 + 3000).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")  # mode I;16
    png_16bit(folder / "rgb48.png", rgb.astype(np.uint16) * 257 + rng.integers(0, 257, rgb.shape))
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / "rgba.png")
    palette = Image.fromarray(rgb).quantize(16)
    palette.save(folder / "palette.png", transparency=int(np.asarray(palette)[0, 0]))
    Image.fromarray(np.dstack([rgb[..., 1], alpha]), "LA").save(folder / "grey_alpha.png")
    return sorted(folder.glob("*.png"))


@pytest.mark.slow
def test_documented_preprocessing_is_what_predict_does_on_16bit_and_transparent_pictures(tiny_run, tmp_path):
    """Issue 14.8: the steps written into the export (metadata `input.preprocessing`), redone by hand, give
    imgclf's own pixels on 16-bit and transparent pictures, and the exported ONNX graph fed those pixels gives
    predict's probabilities on the checkpoint."""
    import numpy as np
    import onnxruntime
    from PIL import Image, ImageOps

    from imgclf.transforms import load_image

    ckpt, _, _ = tiny_run
    pictures = awkward_pictures(tmp_path / "awkward")
    out = export.export_checkpoint(ckpt, "onnx", tmp_path / "m.onnx")
    steps = out.metadata["input"]["preprocessing"]
    assert any("16-bit" in s and "65535" in s for s in steps) and any("white" in s for s in steps)
    namespace = {"np": np, "Image": Image, "ImageOps": ImageOps}
    exec(LOAD, namespace)  # the test's own reading of the documented steps
    documented = np.stack([namespace["load"](p, 24, 3) for p in pictures])
    imgclf = np.stack([load_image(p, size=24, channels=3).transpose(2, 0, 1) for p in pictures])
    assert np.array_equal(documented, imgclf)
    naive = []  # what a deployment that skipped the documented steps would feed the model
    for p in pictures:
        with Image.open(p) as img:
            naive.append(np.asarray(img.convert("RGB").resize((32, 24), Image.BILINEAR).crop((4, 0, 28, 24))))
    differs = [not np.array_equal(n.transpose(2, 0, 1), d) for n, d in zip(naive, documented, strict=True)]
    assert sum(differs) >= 4, differs  # the pictures do exercise the 16-bit and transparency steps
    session = onnxruntime.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    probs = session.run(["probabilities"], {"images": documented})[0]
    exported = {"classes": json.loads(session.get_modelmeta().custom_metadata_map["imgclf"])["classes"],
                "probs": probs.tolist()}
    assert_agrees(exported, predict_json(ckpt, pictures))


# ---------------------------------------------------------------- issue 24: nothing overwritten, no tracebacks


def test_an_existing_file_is_replaced_only_with_force_and_a_checkpoint_never(tiny_run, tmp_path, capsys):
    """Issue 24.2: `--out FILE` refuses an existing file in one line unless --force; another checkpoint of the
    run (last.pt) is refused even with --force, and stays as it was."""
    ckpt, _, _ = tiny_run
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"the user's own file")
    assert main(["export", str(ckpt), "--format", "safetensors", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"imgclf: error: {out} already exists; choose another --out, or add --force to replace it\n"
    assert out.read_bytes() == b"the user's own file"
    assert main(["export", str(ckpt), "--format", "safetensors", "--out", str(out), "--force"]) == 0
    assert out.read_bytes() != b"the user's own file" and capsys.readouterr().out.startswith(f"wrote {out} (")
    last = ckpt.with_name("last.pt")
    before = last.read_bytes()
    for extra in ([], ["--force"]):
        assert main(["export", str(ckpt), "--format", "safetensors", "--out", str(last), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{last} is a checkpoint: an export never replaces one" in err
    assert last.read_bytes() == before
    with pytest.raises(UserError, match="already exists"):  # the Python API refuses the same way
        export.export_checkpoint(ckpt, "safetensors", out)


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript",
                                 pytest.param("onnx", marks=pytest.mark.slow),
                                 pytest.param("openvino", marks=pytest.mark.slow)])
def test_a_write_that_fails_for_lack_of_room_is_one_line(tiny_run, tmp_path, capsys, fmt):
    """Issue 24.20: a write that fails half-way (here: a 50 kB file size limit, as a full disk would) ends in one
    line for every format, and leaves no part of a file behind."""
    import resource
    import signal

    form = formats.FORMATS[fmt]
    pytest.importorskip(next(iter(form.requires), "torch"))
    ckpt, _, _ = tiny_run
    folder = tmp_path / "out"
    folder.mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write over the limit fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
    try:
        code = main(["export", str(ckpt), "--format", fmt, "--out", str(folder / f"m{form.suffix}")])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("imgclf: error: "), err
    assert list(folder.iterdir()) == []


@pytest.fixture(scope="module")
def torchscript_export(tiny_run, tmp_path_factory) -> Path:
    ckpt, _, _ = tiny_run
    return export.export_checkpoint(ckpt, "torchscript", tmp_path_factory.mktemp("ts") / "m.torchscript.pt").path


def with_metadata(source: Path, out: Path, change: dict) -> Path:
    """A copy of the TorchScript export `source` whose imgclf metadata has `change` applied (top-level keys)."""
    import warnings

    import torch

    files = {"imgclf.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation
        module = torch.jit.load(str(source), _extra_files=files)
        meta = {**json.loads(files["imgclf.json"]), **change}
        torch.jit.save(module, str(out), _extra_files={"imgclf.json": json.dumps(meta)})
    return out


@pytest.mark.parametrize(("change", "words"), [
    ({"input": {"size": 60000, "channels": 3}}, "input size is 60000, not a number of 1 to 4096"),
    ({"input": None}, "input is None, not a description of the input"),
    ({"model": 5}, "model is 5, not a description with a name"),
    ({"input": {"size": 24, "channels": 0}}, "input channels is 0, not a number of 1 to 64"),
    ({"classes": []}, "classes is [], not a list of 1 to"),
    ({"classes": "xy"}, "classes is 'xy', not a list of 1 to"),
    ({"classes": ["circle", "square"]}, "gives outputs of shape (3,) per picture, but its metadata names 2 classes"),
    ({"format": "other"}, "is not a model exported by imgclf"),
])
def test_damaged_export_metadata_is_refused_in_one_line(tiny_run, torchscript_export, tmp_path, capsys, change, words):
    """Issue 24.5: metadata that does not describe the graph is refused by predict and eval, never turned
    into a traceback, a huge allocation or wrong labels with exit 0."""
    _, images, _ = tiny_run
    model = with_metadata(torchscript_export, tmp_path / "m.torchscript.pt", change)
    data = images[0].parent.parent
    if isinstance(change.get("classes"), list) and change["classes"]:  # eval on the classes the metadata names
        for name in change["classes"]:
            (tmp_path / "data" / name).mkdir(parents=True)
            (tmp_path / "data" / name / "0.jpg").symlink_to(next((data / name).glob("*.jpg")))
        data = tmp_path / "data"
    for argv in (["predict", str(model), str(images[0])], ["eval", str(model), "--data", str(data)]):
        capsys.readouterr()
        code = main([*argv, "--device", "cpu"])
        captured = capsys.readouterr()
        assert code == 2 and captured.out == "", (argv[0], captured)
        assert captured.err.count("\n") == 1 and words in captured.err, (argv[0], captured.err)


def test_the_exported_graph_ends_with_the_tasks_activation(tiny_run, tmp_path, monkeypatch):
    import torch

    from imgclf.tasks import SingleLabel

    ckpt = tiny_run[0]
    x = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    outputs = []
    for activation in (SingleLabel.activation, lambda self, logits: logits.sigmoid()):
        monkeypatch.setattr(SingleLabel, "activation", activation)
        out = export.export_checkpoint(ckpt, "torchscript", tmp_path / f"m{len(outputs)}.torchscript.pt")
        outputs.append(torch.jit.load(str(out.path))(x))
        assert out.max_diff < 1e-5  # its self-check compares with the same task's activation
    assert torch.allclose(outputs[0].sum(1), torch.ones(4))  # softmax: the single-label task's
    assert torch.allclose(outputs[1], outputs[1].clamp(0, 1)) and not torch.allclose(outputs[1].sum(1), torch.ones(4))
