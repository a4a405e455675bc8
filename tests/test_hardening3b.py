"""The third hardening pass (issue 24), items 7, 8, 9, 13, 14, 16, 17, 18 and three of item 24's messages:
each bad input ends in one line (or is made harmless), never in a traceback, a wrong result or a forged line."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.config import DataConfig
from imgclf.errors import UserError
from imgclf.sources import load_data

pytestmark = pytest.mark.usefixtures("one_thread")


def flat_folder(root: Path, per_class: int = 6) -> Path:
    """root/<c><i>.png for classes a and b: pictures a --labels CSV names."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for c in "ab":
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"{c}{i}.png")
    return root


def rows_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    import csv

    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("filename", "label"), *rows])
    return path


def labelled(tmp_path: Path, rows: list[tuple[str, str]], **kw):
    root = flat_folder(tmp_path / "flat")
    csv_file = rows_csv(tmp_path / "labels.csv", rows)
    return load_data(DataConfig(data=str(root), labels=str(csv_file), cache_dir=str(tmp_path / "cache"), **kw),
                     progress=False)


ALL_ROWS = [(f"{c}{i}.png", c) for c in "ab" for i in range(6)]


# ---------------------------------------------------------------- 13: duplicate and contradictory --labels rows

def test_repeated_labels_rows_never_put_a_picture_in_both_splits(tmp_path, capsys):
    root = flat_folder(tmp_path / "flat")
    rows = ALL_ROWS + [("a0.png", "a"), ("./a1.png", "a"), ("a2.png", "a")]
    csv_file = rows_csv(tmp_path / "labels.csv", rows)
    data = load_data(DataConfig(data=str(root), labels=str(csv_file), cache_dir=str(tmp_path / "cache")))
    train, val = set(map(os.path.realpath, data.train.files)), set(map(os.path.realpath, data.val.files))
    assert not train & val and len(train) + len(val) == 12
    assert "3 repeated row(s)); each file is used once" in capsys.readouterr().err


def test_a_file_with_two_labels_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"row 13 labels .*a0.png 'b' but row 1 labels it 'a'; keep one label"):
        labelled(tmp_path, ALL_ROWS + [("./a0.png", "b")])


def test_labels_rows_naming_a_held_out_picture_are_refused(tmp_path):
    from conftest import write_class_folder

    write_class_folder(tmp_path / "tv" / "train", ["a", "b"], 3, size=8)
    write_class_folder(tmp_path / "tv" / "val", ["a", "b"], 2, size=8, seed=1)
    rows = [(f"train/{c}/{i:04d}.png", c) for c in "ab" for i in range(3)] + [("val/b/0001.png", "b")]
    rows_csv(tmp_path / "labels.csv", rows)
    with pytest.raises(UserError, match=r"names .*val/b/0001.png, a picture of the validation or test folder"):
        load_data(DataConfig(data=str(tmp_path / "tv"), labels=str(tmp_path / "labels.csv"),
                             cache_dir=str(tmp_path / "cache")), progress=False)


# ---------------------------------------------------------------- 17: absolute names beside a relative --data

def test_absolute_labels_rows_beside_a_relative_data_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flat_folder(tmp_path / "flat")
    rows = [(name if i % 2 else str(tmp_path / "flat" / name), c) for i, (name, c) in enumerate(ALL_ROWS)]
    rows_csv(tmp_path / "labels.csv", rows)
    data = load_data(DataConfig(data="flat", labels=str(tmp_path / "labels.csv"), cache_dir="cache"), progress=False)
    assert len(data.train) + len(data.val) == 12


# ---------------------------------------------------------------- 14: class names a checkpoint cannot hold

def test_a_class_name_over_the_checkpoint_limit_is_refused_before_training(tmp_path):
    long = "x" * 1001
    with pytest.raises(UserError, match=r"a class name of 1,001 characters .* over the 1,000 a checkpoint holds"):
        labelled(tmp_path, [(n, long if c == "a" else c) for n, c in ALL_ROWS])


# ---------------------------------------------------------------- 7: control characters in class names

def test_labels_with_control_characters_are_escaped_when_read(tmp_path):
    data = labelled(tmp_path, [(n, "a\x1b[2K\x08imgclf: done" if c == "a" else "b\tc") for n, c in ALL_ROWS])
    assert data.classes == ["a\\x1b[2K\\x08imgclf: done", "b\\tc"]
    assert all(c.isprintable() for c in data.classes)


def test_checkpoint_class_names_with_control_characters_are_escaped_on_load(tmp_path):
    from imgclf.checkpoint import build_checkpoint, load_checkpoint, save_checkpoint

    ckpt = build_checkpoint(model_name="tutorial_cnn", classes=["cat\x1b[31m", "dog\rforged"], channels=3, size=8,
                            mean=[0.5] * 3, std=[0.5] * 3, config={}, state={"state_dict": {"w": torch.zeros(1)}})
    save_checkpoint(tmp_path / "m.pt", ckpt)
    assert load_checkpoint(tmp_path / "m.pt")["classes"] == ["cat\\x1b[31m", "dog\\rforged"]


# ---------------------------------------------------------------- 16: IDX pictures too small, or not square

def idx_folder(folder: Path, height: int, width: int) -> Path:
    import struct

    def idx(a: np.ndarray) -> bytes:
        return struct.pack(">HBB", 0, 8, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 4)):
        (folder / f"{split}-images-idx3-ubyte").write_bytes(idx(rng.integers(0, 255, (n, height, width))))
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(idx(np.arange(n) % 2))
    return folder


def test_idx_pictures_under_the_smallest_side_are_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"are 2x2 pixels, under the smallest side a network takes \(8\); give "
                                        r"--img-size 8 or more"):
        load_data(DataConfig(data=str(idx_folder(tmp_path / "idx", 2, 2))))
    assert load_data(DataConfig(data=str(tmp_path / "idx"), img_size=8)).img_size == 8


def test_a_folder_of_tiny_pictures_is_refused_in_one_line(tmp_path):
    from conftest import write_class_folder

    write_class_folder(tmp_path / "tiny", ["a", "b"], 4, size=2)
    with pytest.raises(UserError, match=r"are 2x2 pixels, under the smallest side"):
        load_data(DataConfig(data=str(tmp_path / "tiny"), cache_dir=str(tmp_path / "cache")), progress=False)


def test_idx_pictures_that_are_not_square_are_made_square(tmp_path):
    data = load_data(DataConfig(data=str(idx_folder(tmp_path / "idx", 28, 10))))
    assert data.img_size == 28 and tuple(data.train.images.shape[1:]) == tuple(data.val.images.shape[1:]) == (1, 28, 28)


# ---------------------------------------------------------------- 8: a run's config.yaml and its FILE.py network

NET = """import torch.nn as nn


class Net(nn.Module):
    def __init__(self, num_classes=2, in_channels=3, img_size=8):
        super().__init__()
        self.f = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * img_size * img_size, num_classes))

    def forward(self, x):
        return self.f(x)
"""


def run_config_with_code(tmp_path: Path, monkeypatch) -> Path:
    """proj/net.py and proj/run/config.yaml as a run started in proj/ with --model net.py:Net writes it."""
    from imgclf.configfile import RUN_HEADER, config_yaml
    from imgclf.resolve import resolve

    (tmp_path / "proj" / "run").mkdir(parents=True)
    (tmp_path / "proj" / "net.py").write_text(NET)
    monkeypatch.chdir(tmp_path / "proj")
    cfg = resolve({("model", "name"): "net.py:Net", ("data", "data"): "flat", ("run", "out"): "run"})
    (tmp_path / "proj" / "run" / "config.yaml").write_text(config_yaml(cfg, RUN_HEADER, folder="run"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "proj" / "run" / "config.yaml"


def test_a_runs_config_names_its_network_file_relative_to_itself(tmp_path, monkeypatch):
    from imgclf.resolve import user_values

    config = run_config_with_code(tmp_path, monkeypatch)
    assert "model: ../net.py:Net\nmodel_sha256: " in config.read_text()
    name = user_values(config, {})["model", "name"]
    assert Path(name.rpartition(":")[0]).samefile(tmp_path / "proj" / "net.py")


def test_a_runs_config_refuses_a_changed_network_file_unless_trusted(tmp_path, monkeypatch):
    from imgclf.resolve import user_values

    config = run_config_with_code(tmp_path, monkeypatch)
    (tmp_path / "proj" / "net.py").write_text(NET + "# changed\n")
    with pytest.raises(UserError, match=r"refused .*net.py: its sha256 .* differs from the .* that .*config.yaml "
                                        r"records .*; pass --trust-changed-code"):
        user_values(config, {})
    assert user_values(config, {}, trust_changed_code=True)["model", "name"].endswith("net.py:Net")
    assert user_values(config, {("model", "name"): "tutorial_cnn"})["model", "name"] == "tutorial_cnn"


@pytest.mark.slow
def test_rerunning_a_runs_config_from_elsewhere_checks_its_network(tmp_path):
    from conftest import run_cli, write_class_folder

    proj = tmp_path / "proj"
    write_class_folder(proj / "data", ["a", "b"], 4, size=8)
    (proj / "net.py").write_text(NET)
    first = run_cli("train", "--data", "data", "--model", "net.py:Net", "--epochs", "1", "--out", "run", cwd=proj)
    assert first.returncode == 0, first.stderr
    again = run_cli("train", "--config", "proj/run/config.yaml", "--data", "proj/data", "--out", "again",
                    cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    (proj / "net.py").write_text(NET + "# changed\n")
    changed = run_cli("train", "--config", "proj/run/config.yaml", "--data", "proj/data", "--out", "third",
                      cwd=tmp_path)
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1, changed.stderr
    assert "pass --trust-changed-code" in changed.stderr and not (tmp_path / "third").exists()


# ---------------------------------------------------------------- 18: YAML values JSON cannot hold

@pytest.mark.parametrize("value, words", [
    ("{drop_rate: !!binary aGVsbG8=}", "Object of type bytes is not JSON serializable"),
    ("{when: 2024-01-01}", "Object of type date is not JSON serializable"),
    ("{x: [1, {at: 2024-01-01T10:00:00}]}", "Object of type datetime is not JSON serializable"),
    ("{2024-01-01: 1}", "keys must be str, int, float, bool or None, not datetime.date"),
    ("!!binary aGVsbG8=", "model_args: b'hello' is not a string"),
    ("2024-01-01", "model_args: datetime.date(2024, 1, 1) is not a string"),
    ("!!set {a: null}", "model_args: {'a'} is not a string"),
])
def test_model_args_that_json_cannot_hold_are_one_line(tmp_path, value, words):
    from imgclf.resolve import user_values

    (tmp_path / "c.yaml").write_text(f"model: timm/resnet18\nmodel_args: {value}\n")
    with pytest.raises(UserError, match=r"c.yaml: model_args: ") as err:
        user_values(tmp_path / "c.yaml", {})
    assert words in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- 9: a huge network named by a small checkpoint

@pytest.mark.slow
def test_a_checkpoint_naming_a_huge_regnet_is_refused_on_the_meta_device():
    from imgclf.models.rebuild import check_fits

    ckpt = {"model": {"name": "regnet_y_128gf"}, "classes": ["a", "b"], "input": {"channels": 3, "size": 32},
            "state_dict": {"w": torch.zeros(1)}}
    with pytest.raises(UserError, match=r"do not fit regnet_y_128gf: the network's stem.0.weight \(and 625 more\) "
                                        r"is missing"):
        check_fits(ckpt)


@pytest.mark.slow
def test_every_torchvision_classifier_builds_on_the_meta_device():
    import torchvision

    from imgclf.models import build_model, on_meta

    for name in torchvision.models.list_models(module=torchvision.models):
        with on_meta():
            model = build_model(name, num_classes=2, in_channels=3, img_size=224)
        assert all(p.is_meta for p in model.parameters()), name


# ---------------------------------------------------------------- 24: libtiff's own lines on stderr

def test_a_damaged_tiff_is_refused_without_libtiffs_own_line(tmp_path, capfd):
    from imgclf.transforms import BadImage, load_image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "p.tif",
                                                                             compression="tiff_deflate")
    data = bytearray((tmp_path / "p.tif").read_bytes())
    data[100:3000] = bytes(b ^ 0x55 for b in data[100:3000])  # the compressed strip, not the header
    (tmp_path / "p.tif").write_bytes(data)
    capfd.readouterr()
    with pytest.raises(BadImage):
        load_image(tmp_path / "p.tif", size=16, channels=3)
    assert capfd.readouterr().err == ""  # libtiff wrote "ZIPDecode: Decoding error at scanline 0, ..." here


# ---------------------------------------------------------------- 24: OpenVINO's reason, not its source locations

def test_reason_of_leaves_out_a_native_librarys_source_locations():
    from imgclf.errors import reason_of

    err = RuntimeError("Exception from src/inference/src/cpp/core.cpp:84:\nException from src/inference/src/"
                       "model_reader.cpp:148:\nUnable to read the model: \"m.xml\"\n\n")
    assert reason_of(err) == 'Unable to read the model: "m.xml"'
    check = RuntimeError("Check 'res.status == pugi::status_ok' failed at src/frontends/ir/src/input_model.cpp:219:\n"
                         "No document element found at offset 14\n")
    assert reason_of(check) == "No document element found at offset 14"
    assert reason_of(RuntimeError("Exception from src/a.cpp:1:")) == "Exception from src/a.cpp:1:"
    assert reason_of(ValueError("")) == "ValueError" and reason_of(ValueError("a\x1b[2Kb")) == "a\\x1b[2Kb"


@pytest.mark.slow
@pytest.mark.parametrize("name, words", [("m.xml", "No document element found"), ("m.onnx", "can't be parsed")])
def test_a_damaged_exported_model_says_why_in_one_line_and_nothing_else(tmp_path, capfd, name, words):
    pytest.importorskip("openvino")
    from imgclf.formats import open_graph

    (tmp_path / name).write_text("not a model at all")
    capfd.readouterr()
    with pytest.raises(UserError, match=words) as err:
        open_graph(tmp_path / name, "openvino", "fp32")
    assert "Exception from" not in str(err.value) and "\n" not in str(err.value)
    assert capfd.readouterr().err == ""  # OpenVINO's TensorFlow frontend printed its parse errors here


# ---------------------------------------------------------------- 24: a weights name for a network that has none

@pytest.mark.parametrize("name", ["tutorial_cnn", "fastnet"])
def test_a_weights_name_for_imgclfs_own_networks_says_they_have_none(tmp_path, monkeypatch, name):
    from imgclf.models import build_model

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=rf"--pretrained IMAGENET1K_V1: no such file, and {name} has no named "
                                        r"weights such as IMAGENET1K_V1 \(torchvision classifiers and timm/NAME"):
        build_model(name, num_classes=2, in_channels=3, img_size=32, pretrained="IMAGENET1K_V1")


def test_a_weights_name_for_the_users_network_says_it_has_none(tmp_path, monkeypatch):
    from imgclf.models import build_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(NET)
    with pytest.raises(UserError, match=r"no such file, and net.py:Net has no named weights"):
        build_model("net.py:Net", num_classes=2, in_channels=3, img_size=8, pretrained="DEFAULT")


# ---------------------------------------------------------------- 7: class names of an exported model, printed

@pytest.mark.slow
def test_predict_escapes_the_class_names_of_a_hand_made_exported_model(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    import json

    from imgclf.checkpoint import build_checkpoint, save_checkpoint
    from imgclf.cli import main
    from imgclf.export import export_checkpoint
    from imgclf.models import build_model

    model = build_model("tutorial_cnn", num_classes=2, in_channels=3, img_size=8)
    save_checkpoint(tmp_path / "m.pt", build_checkpoint(
        model_name="tutorial_cnn", classes=["a", "b"], channels=3, size=8, mean=[0.5] * 3, std=[0.5] * 3,
        config={}, state={"state_dict": model.state_dict()}))
    export_checkpoint(tmp_path / "m.pt", "onnx", tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    meta = json.loads(proto.metadata_props[0].value)
    meta["classes"] = ["a\x1b[2K\rforged: 100%", "b\n"]
    proto.metadata_props[0].value = json.dumps(meta)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    Image.new("RGB", (8, 8)).save(tmp_path / "p.png")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "m.onnx"), str(tmp_path / "p.png"), "--topk", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "\x1b" not in out and "\r" not in out and "a\\x1b[2K\\rforged" in out


# ---------------------------------------------------------------- a fresh probe: a huge --img-size on a built-in

def test_a_built_in_data_set_at_a_huge_size_is_refused_before_allocating():
    from imgclf.transforms import resize_batch

    with pytest.raises(UserError, match=r"^10000 pictures of 1x4096x4096 take 167\.8 GB in memory, over half of "
                                        r"this machine's .* GB; give a smaller --img-size$"):
        resize_batch(torch.zeros(10000, 1, 28, 28, dtype=torch.uint8), 4096)
    small = resize_batch(torch.full((3, 1, 28, 28), 7, dtype=torch.uint8), 56)
    assert small.shape == (3, 1, 56, 56) and bool((small == 7).all())
