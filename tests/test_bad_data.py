"""Bad images and bad folders (issue 3, point 4).

Each kind of picture from the wild either loads correctly (checked pixel by pixel where it matters) or is
refused with a clear reason; a folder holding bad files trains on, reporting each once and counting them;
--strict-data lists them all; a folder that cannot make a data set fails before any training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, write_class_folder
from PIL import Image

from imgclf.cli import main
from imgclf.config import DataConfig
from imgclf.errors import EXIT_USAGE
from imgclf.sources import load_data
from imgclf.transforms import BadImage, load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


pytestmark = pytest.mark.usefixtures("one_thread")


def two_tone(size: int = 32) -> Image.Image:
    """Top half red, bottom half blue: any rotation or mirror shows."""
    a = np.zeros((size, size, 3), np.uint8)
    a[: size // 2], a[size // 2 :] = RED, BLUE
    return Image.fromarray(a)


def png_bytes(img: Image.Image, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def write_bad_files(folder: Path) -> dict[str, str]:
    """Broken files of every kind under `folder`; returns {name: words its reason must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    good = png_bytes(two_tone())
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "truncated.jpg").write_bytes(png_bytes(two_tone(), format="JPEG")[:300])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("these are my notes, not a picture\n")
    (folder / "random.png").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    Image.new("1", (10_000, 10_000)).save(folder / "bomb.png")  # 100 Mpixels in 12 kB
    return {"truncated.png": "truncated", "truncated.jpg": "runcated", "zero.jpg": "cannot identify image file",
            "notes.jpg": "cannot identify image file", "random.png": "cannot identify image file",
            "bomb.png": "exceeds limit of 89478485 pixels"}


def test_exif_orientation_is_turned_upright(tmp_path):
    stored = two_tone().transpose(Image.Transpose.ROTATE_90)  # as a sideways camera stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    stored.save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    arr = load_image(tmp_path / "sideways.jpg", size=16, channels=3).astype(int)
    assert np.abs(arr[:6] - RED).max() < 12 and np.abs(arr[-6:] - BLUE).max() < 12
    stored.save(tmp_path / "no-tag.jpg", quality=95)  # the control: without the tag it stays sideways
    assert np.abs(load_image(tmp_path / "no-tag.jpg", size=16, channels=3)[:6].astype(int) - RED).max() > 100


def test_sixteen_bit_cmyk_palette_alpha_and_mislabelled_load_correctly(tmp_path):
    Image.fromarray(np.full((20, 30), 32768, np.uint16)).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    assert np.array_equal(np.unique(load_image(tmp_path / "gray16.png", size=16, channels=3)), [128])
    assert np.array_equal(np.unique(load_image(tmp_path / "gray16.png", size=16, channels=1)), [128])
    for ext in ("tif", "jpg"):
        Image.new("CMYK", (20, 20), (255, 0, 0, 0)).save(tmp_path / f"cyan.{ext}")  # pure cyan ink
        arr = load_image(tmp_path / f"cyan.{ext}", size=16, channels=3).astype(int)
        assert np.abs(arr - (0, 255, 255)).max() < 8, ext
    index = np.zeros((20, 20), np.uint8)
    index[:, 10:] = 1  # left half: colour 0, transparent; right half: colour 1, red
    pal = Image.fromarray(index, "P")
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "palette.png", transparency=0)
    arr = load_image(tmp_path / "palette.png", size=20, channels=3)
    assert (arr[:, :10] == WHITE).all() and (arr[:, 10:] == RED).all()  # transparent shows as white
    (tmp_path / "really-a-jpeg.png").write_bytes(png_bytes(two_tone(), format="JPEG"))
    arr = load_image(tmp_path / "really-a-jpeg.png", size=16, channels=3).astype(int)
    assert np.abs(arr[:6] - RED).max() < 12


def test_bad_files_raise_bad_image_with_a_reason(tmp_path):
    expected = write_bad_files(tmp_path)
    for name, words in expected.items():
        with pytest.raises(BadImage, match=words):
            load_image(tmp_path / name, size=16, channels=3)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> dict:
    """A split folder whose train/a, train/b and test/b also hold broken files."""
    root = tmp_path_factory.mktemp("bad-data")
    write_class_folder(root / "train", ["a", "b"], 6, seed=1)
    write_class_folder(root / "test", ["a", "b"], 3, seed=2)
    bad = write_bad_files(root / "train" / "a")
    (root / "train" / "b" / "empty.png").write_bytes(b"")
    (root / "test" / "b" / "half.png").write_bytes(png_bytes(two_tone())[:40])
    (root / "train" / "b" / "really-a-jpeg.png").write_bytes(png_bytes(two_tone(), format="JPEG"))
    files = [root / "train" / "a" / n for n in bad] + [root / "train" / "b" / "empty.png",
                                                      root / "test" / "b" / "half.png"]
    return {"root": root, "bad": files}


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")  # the bomb: reported once, as a skip
def test_bad_files_are_skipped_reported_once_and_counted(seeded, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--data", str(seeded["root"]), "--epochs", "2", "--batch-size", "4", "--lr", "0.01",
                 "--device", "cpu", "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 0, err
    for path in seeded["bad"]:
        assert err.count(f"imgclf: skipping {path}: ") == 1, (path, err)
    assert err.count("imgclf: skipping ") == len(seeded["bad"])
    assert "really-a-jpeg" not in err  # a JPEG named .png is a picture all the same
    summaries = [line for line in err.splitlines() if line.startswith("epoch ") and "val loss" in line]
    assert len(summaries) == 2 and all(f"skipped files {len(seeded['bad'])}" in s for s in summaries)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_files"] for r in records] == [len(seeded["bad"])] * 2
    data = load_data(DataConfig(data=str(seeded["root"])), progress=False)
    assert len(data.train) == 6 + 6 + 1 and len(data.val) == 6
    assert sorted(f for f, _ in data.skipped) == sorted(map(str, seeded["bad"]))


def test_strict_data_lists_every_bad_file_before_training(seeded, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--data", str(seeded["root"]), "--strict-data", "--device", "cpu", "--out", str(run)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE and len(lines) == 1
    assert lines[0].startswith(f"imgclf: error: --strict-data: {len(seeded['bad'])} unreadable file(s): ")
    for path in seeded["bad"]:
        assert f"{path}: " in lines[0]
    assert not run.exists()


def folder_error(tmp_path: Path, capsys) -> str:
    run = tmp_path / "run"
    code = main(["train", "--data", str(tmp_path / "data"), "--device", "cpu", "--out", str(run)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE and len(lines) == 1, lines
    assert not run.exists()  # failed before any training
    return lines[0]


def test_empty_class_folder(tmp_path, capsys):
    write_class_folder(tmp_path / "data" / "train", ["a", "b"], 3)
    write_class_folder(tmp_path / "data" / "test", ["a", "b", "c"], 2)
    (tmp_path / "data" / "train" / "c").mkdir()
    assert f"class folder {tmp_path / 'data' / 'train' / 'c'} holds no pictures" in folder_error(tmp_path, capsys)


def test_class_folder_of_unreadable_files_only(tmp_path, capsys):
    write_class_folder(tmp_path / "data" / "train", ["a", "b"], 3)
    write_class_folder(tmp_path / "data" / "test", ["a", "b"], 2)
    for p in (tmp_path / "data" / "train" / "b").iterdir():
        p.write_bytes(b"")
    run = tmp_path / "run"
    code = main(["train", "--data", str(tmp_path / "data"), "--device", "cpu", "--out", str(run)])
    *skipped, line = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE and not run.exists()
    assert len(skipped) == 3 and all(s.startswith("imgclf: skipping ") for s in skipped)
    assert line == f"imgclf: error: class folder {tmp_path / 'data' / 'train' / 'b'} holds no readable pictures; " \
                   f"fix or remove them"


def test_folder_without_pictures(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "readme.txt").write_text("no pictures here")
    assert "holds no pictures" in folder_error(tmp_path, capsys)
    for p in (tmp_path / "data").rglob("*.txt"):
        p.unlink()
    for p in list((tmp_path / "data").iterdir()):
        p.rmdir()
    two_tone().save(tmp_path / "data" / "loose.png")  # pictures, but no class folders
    assert f"{tmp_path / 'data'} has no class folders" in folder_error(tmp_path, capsys)


def test_test_classes_that_differ_from_train(tmp_path, capsys):
    write_class_folder(tmp_path / "data" / "train", ["a", "b"], 3)
    write_class_folder(tmp_path / "data" / "test", ["a", "c"], 2)
    assert "the classes in" in folder_error(tmp_path, capsys) and "differ from train's (a, b)" in \
        folder_error(tmp_path, capsys)


# ---------------------------------------------------------------- the ants and bees (real data)

@pytest.mark.slow
def test_ants_and_bees_train_to_the_end(hymenoptera_dir, tmp_path, capsys):
    """Among the ants sits imageNotFound.gif, a web placeholder: a valid GIF, so it loads like any picture."""
    assert (hymenoptera_dir / "train" / "ants" / "imageNotFound.gif").is_file()
    code = main(["train", "--data", str(hymenoptera_dir), "--img-size", "32", "--epochs", "1", "--batch-size", "32",
                 "--lr", "0.01", "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "245 train / 153 val" in err and "skipping" not in err
    data = load_data(DataConfig(data=str(hymenoptera_dir), img_size=32), progress=False)  # the cache just made
    assert str(hymenoptera_dir / "train" / "ants" / "imageNotFound.gif") in data.train.files


@pytest.mark.slow
def test_ants_and_bees_seeded_with_broken_files(hymenoptera_dir, tmp_path):
    """A copy (of links) with broken files added trains to the end in a real process, listing each one."""
    copy = tmp_path / "hymenoptera"
    for src in sorted(hymenoptera_dir.rglob("*")):
        if src.is_file():
            dst = copy / src.relative_to(hymenoptera_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
    bad = [copy / "train" / "ants" / n for n in write_bad_files(copy / "train" / "ants")]
    (copy / "val" / "bees" / "cut-short.jpg").write_bytes((hymenoptera_dir / "train" / "ants" / "0013035.jpg")
                                                         .read_bytes()[:2000])
    bad.append(copy / "val" / "bees" / "cut-short.jpg")
    r = run_cli("train", "--data", copy, "--img-size", 32, "--epochs", 1, "--batch-size", 32, "--lr", 0.01,
                "--device", "cpu", "--out", tmp_path / "run", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    for path in bad:
        assert r.stderr.count(f"imgclf: skipping {path}: ") == 1, (path, r.stderr)
    assert f"skipped files {len(bad)}" in r.stderr
    assert "245 train / 153 val" in r.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert os.path.islink(copy / "train" / "ants" / "imageNotFound.gif")


# ---------------------------------------------------------------- IDX folders (issue 14.5, 14.7)

def idx_bytes(array: np.ndarray) -> bytes:
    import struct

    return struct.pack(f">HBB{array.ndim}I", 0, 8, array.ndim, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, labels: dict[str, list[int]], *, side: int = 8, gz: bool = True) -> Path:
    """An IDX folder (MNIST's four files) with pictures of `side` pixels and the labels given per split."""
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, values in labels.items():
        for kind, array in (("images-idx3", rng.integers(0, 255, (len(values), side, side))),
                            ("labels-idx1", np.array(values))):
            data = idx_bytes(array)
            name = f"{split}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


def test_an_idx_folder_loads(tmp_path):
    data = load_data(DataConfig(data=str(write_idx(tmp_path / "idx", {"train": [0, 1, 2] * 4, "t10k": [0, 1, 2]}))))
    assert len(data.train) == 12 and data.classes == ["0", "1", "2"] and data.channels == 1


@pytest.mark.parametrize("labels, message", [
    ({"train": [0, 1, 2, 255] * 3, "t10k": [0, 1, 2]}, "train-labels-idx1-ubyte.gz has label value(s) 255 beyond a gap"),
    ({"train": [0, 1, 2] * 3, "t10k": [0, 1, 7]}, "t10k-labels-idx1-ubyte.gz has label value(s) 7 beyond a gap"),
    ({"train": [1, 2] * 3, "t10k": [1, 2]}, "has label value(s) 1, 2 beyond a gap: labels must be 0..N-1"),
    ({"train": [0] * 6, "t10k": [0]}, "train-labels-idx1-ubyte.gz has a single class (0); a classifier needs"),
])
def test_idx_labels_with_gaps_or_one_class_are_named(tmp_path, capsys, labels, message):
    write_idx(tmp_path / "data", labels)
    err = folder_error(tmp_path, capsys)
    assert message in err, err


@pytest.mark.parametrize("damage, message", [
    ("truncated", "bytes of data where its header announces 4x8x8 = 256 (truncated or damaged)"),
    ("text", "not an unsigned-byte IDX file"),
    ("empty", "cannot read IDX file"),
    ("not gzip", "cannot read IDX file"),
    ("bomb header", "more than any data set"),
    ("sparse, uncompressed", "is 1,073,741,824 bytes long where its header announces 4x8x8 = 256 bytes"),
    ("labels of two dimensions", "holds an array of shape (4, 1), not one label per picture"),
    ("images of one dimension", "holds an array of shape (4,), not pictures (count, height, width)"),
    ("sizes differ", "the train pictures are (8, 8) pixels but the t10k ones (6, 6)"),
    ("counts differ", "t10k has 4 images (t10k-images-idx3-ubyte.gz) but 3 labels"),
])
def test_malformed_idx_folders_are_one_line(tmp_path, capsys, damage, message):
    import gzip

    folder = write_idx(tmp_path / "data", {"train": [0, 1, 0, 1], "t10k": [0, 1, 0, 1]})
    images, labels = folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"
    if damage == "truncated":
        images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:100]))
    elif damage == "text":
        images.write_bytes(gzip.compress(b"hello, this is not IDX"))
    elif damage == "empty":
        images.write_bytes(b"")
    elif damage == "not gzip":
        images.write_bytes(b"\x00\x00\x08\x03garbage")
    elif damage == "bomb header":
        images.write_bytes(gzip.compress(idx_bytes(np.zeros((0, 0, 0)))[:4] + b"\xff\xff\xff\xff" * 3))
    elif damage == "sparse, uncompressed":  # 1 GB on paper, never read
        images.unlink()
        images = folder / "t10k-images-idx3-ubyte"
        images.write_bytes(idx_bytes(np.zeros((4, 8, 8))))
        os.truncate(images, 1 << 30)
    elif damage == "labels of two dimensions":
        labels.write_bytes(gzip.compress(idx_bytes(np.array([[0], [1], [0], [1]]))))
    elif damage == "images of one dimension":
        images.write_bytes(gzip.compress(idx_bytes(np.array([0, 1, 2, 3]))))
    elif damage == "sizes differ":
        images.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 6, 6)))))
    else:
        labels.write_bytes(gzip.compress(idx_bytes(np.array([0, 1, 0]))))
    err = folder_error(tmp_path, capsys)
    assert message in err, err
    assert str(folder) in err
