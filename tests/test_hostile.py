"""Hostile files (issue 3, point 5): a checkpoint crafted to create a file when unpickled is refused by
`predict`, `eval`, `train --resume` and `train --pretrained`, in one line, and the file is never created.
Checkpoints of torch.compile'd and DDP models (`_orig_mod.`, `module.` prefixes) load cleanly."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from conftest import write_class_folder

from imgclf.checkpoint import load_checkpoint
from imgclf.cli import main
from imgclf.errors import EXIT_USAGE
from imgclf.models import build_model
from imgclf.predict import Predictor

SRC = Path(__file__).resolve().parents[1] / "src"


class CreatesFile:
    """Unpickling this object calls open(path, "w"): it creates `path` (code a loader must never run)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    write_class_folder(root / "data" / "train", ["a", "b"], 6, seed=1)
    write_class_folder(root / "data" / "test", ["a", "b"], 2, seed=2)
    run = root / "run"
    assert main(["train", "--data", str(root / "data"), "--epochs", "1", "--batch-size", "4", "--lr", "0.01",
                 "--device", "cpu", "--out", str(run)]) == 0
    return {"data": root / "data", "ckpt": run / "checkpoints" / "last.pt"}


def hostile(trained: dict, folder: Path, legacy: bool) -> tuple[Path, Path]:
    """A real imgclf checkpoint with one extra entry whose unpickling creates `marker`."""
    marker = folder / "PWNED"
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    ckpt["note"] = CreatesFile(marker)
    path = folder / ("legacy.pt" if legacy else "hostile.pt")
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    return path, marker


def test_the_payload_is_live(tmp_path):
    """Unpickled the unsafe way (plain pickle, here on purpose), the object does create its file."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(CreatesFile(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip-format", "legacy-format"])
@pytest.mark.parametrize("command", ["predict", "eval", "resume", "pretrained"])
def test_hostile_checkpoint_is_refused_and_never_run(trained, tmp_path, capsys, command, legacy):
    path, marker = hostile(trained, tmp_path, legacy)
    data = str(trained["data"])
    if command == "predict":
        argv = ["predict", str(path), str(trained["data"] / "test" / "a"), "--device", "cpu"]
    elif command == "eval":
        argv = ["eval", str(path), "--data", data, "--device", "cpu"]
    elif command == "resume":
        run = tmp_path / "run"
        (run / "checkpoints").mkdir(parents=True)
        path = path.rename(run / "checkpoints" / "last.pt")
        argv = ["train", "--resume", str(run)]
    else:
        argv = ["train", "--data", data, "--pretrained", str(path), "--device", "cpu", "--out", str(tmp_path / "r")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.strip().splitlines() == [
        f"imgclf: error: refused to load {path}: unpickling it would call io.open, and a checkpoint holds only "
        f"tensors and plain values (a hostile file, or one saved from Python objects: save model.state_dict() "
        f"instead); nothing in it was run"]
    assert not marker.exists()
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_no_unsafe_load_in_the_sources():
    unsafe = "weights_only=" + "False"
    sources = sorted(SRC.rglob("*.py"))
    assert sources
    assert [str(p) for p in sources if unsafe in p.read_text()] == []
    calls = [(p.name, m.start()) for p in sources for m in re.finditer(r"torch\.load\(", p.read_text())]
    assert calls, "no torch.load at all: this test looks in the wrong place"
    for p in sources:
        text = p.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            assert "weights_only=True" in text[m.end(): text.index(")", m.end()) + 1], f"{p}: {text[m.start():][:80]}"


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod."])
def test_prefixed_checkpoints_load_and_predict_the_same(trained, tmp_path, prefix):
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    ckpt["state_dict"] = prefixed(ckpt["state_dict"], prefix)
    path = tmp_path / "prefixed.pt"
    torch.save(ckpt, path)
    pictures = [str(p) for p in sorted((trained["data"] / "test").rglob("*.png"))]
    want = Predictor.from_checkpoint(trained["ckpt"], device="cpu").predict(pictures, topk=2)
    got = Predictor.from_checkpoint(path, device="cpu").predict(pictures, topk=2)
    assert [(r.labels, r.probs) for r in got] == [(r.labels, r.probs) for r in want]
    assert load_checkpoint(path)["state_dict"].keys() == load_checkpoint(trained["ckpt"])["state_dict"].keys()


def test_compiled_and_ddp_state_dicts_as_pretrained(trained, tmp_path):
    """--pretrained takes the plain state dict of a torch.compile'd model, or one saved from DDP."""
    source = build_model("tutorial_cnn", num_classes=2, img_size=16)
    compiled = torch.compile(source)  # wrapping only; nothing is compiled until it runs
    state = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in state)
    for name, weights in (("compiled.pt", state), ("ddp.pt", prefixed(source.state_dict(), "module."))):
        torch.save(weights, tmp_path / name)
        model = build_model("tutorial_cnn", num_classes=2, img_size=16, pretrained=str(tmp_path / name))
        for key, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (name, key)
