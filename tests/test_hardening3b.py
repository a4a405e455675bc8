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
