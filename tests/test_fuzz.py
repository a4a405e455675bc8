"""Fuzzing (issue 3, point 4): random and mutated picture bytes through `load_image`, the folder data set and
`Predictor.predict`. Nothing may crash (only BadImage, with a reason), hang, or go unnamed when rejected.

Hypothesis runs derandomized (the same examples every run, so the suite never flakes) with no per-example
deadline (a loaded machine is slow, not wrong); a watchdog ends the process with tracebacks if one example
hangs. More examples: IMGCLF_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py.
"""

from __future__ import annotations

import faulthandler
import io
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgclf.config import DataConfig
from imgclf.models import build_model
from imgclf.predict import Predictor
from imgclf.sources import load_data
from imgclf.transforms import BadImage, load_image

EXAMPLES = int(os.environ.get("IMGCLF_FUZZ_EXAMPLES", "250"))
HANG_SECONDS = 120  # far beyond any decode of these small files: only a real hang gets there
SIZE = 16
# Nothing but BadImage comes out: a warning (Pillow's notes on broken metadata) would be noise on the console.
pytestmark = [pytest.mark.filterwarnings("error"), pytest.mark.usefixtures("one_thread")]


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@contextmanager
def watchdog():
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _seeds() -> list[bytes]:
    """Small valid files in the formats people put in data set folders, as starting points for mutation."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    pal = rgb.convert("P")
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], transparency=0)
    return [
        _encode(rgb, "PNG"), _encode(pal, "PNG", transparency=3), _encode(rgb.convert("LA"), "PNG"),
        _encode(Image.fromarray(rng.integers(0, 65536, (9, 7), dtype=np.uint16)), "PNG"),
        _encode(rgb, "JPEG", quality=80), _encode(rgb, "JPEG", progressive=True, exif=exif),
        _encode(rgb.convert("CMYK"), "JPEG"), gif.getvalue(), _encode(rgb, "BMP"),
        _encode(rgb, "TIFF", compression="tiff_lzw"), _encode(rgb, "WEBP"), _encode(rgb, "PPM"),
        _encode(rgb.convert("L"), "TIFF"),
    ]


SEEDS = _seeds()


@st.composite
def picture_bytes(draw) -> bytes:
    """Random bytes, or a valid file with bytes overwritten, inserted, deleted or cut off (headers favoured)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["set", "set-header", "insert", "delete", "dimension"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "set-header":
            pos = draw(st.integers(0, min(63, len(data) - 1)))
        if op in ("set", "set-header") and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "dimension" and len(data) > pos + 4:  # the kind of change that claims a huge picture
            data[pos : pos + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\xff\xff", b"\x7f\xff\x00\x00"]))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def decode(path, channels: int):
    """load_image's contract: an array of the asked shape, or BadImage with a reason. Anything else fails."""
    try:
        arr = load_image(path, size=SIZE, channels=channels)
    except BadImage as err:
        assert str(err).strip(), "BadImage without a reason"
        return None
    assert arr.dtype == np.uint8 and arr.shape == (SIZE, SIZE, channels)
    return arr


def test_the_seeds_are_valid_pictures(tmp_path):
    for i, blob in enumerate(SEEDS):
        (tmp_path / f"{i}.img").write_bytes(blob)
        assert decode(tmp_path / f"{i}.img", 3) is not None, i


@pytest.mark.slow
@fuzz_settings(EXAMPLES)
@given(blob=picture_bytes(), channels=st.sampled_from([1, 3]))
def test_load_image_never_crashes(blob, channels):
    with watchdog():
        decode(io.BytesIO(blob), channels)


def _write_folder(root: Path, blobs: list[bytes]) -> list[Path]:
    """train/{a,b} and test/{a,b}, one good picture each, plus the fuzzed files spread over train/a, train/b."""
    good = SEEDS[0]
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            (root / split / cls / "good.png").write_bytes(good)
    fuzzed = []
    for i, blob in enumerate(blobs):
        path = root / "train" / "ab"[i % 2] / f"f{i:02d}{['.jpg', '.png', '.gif', '.webp'][i % 4]}"
        path.write_bytes(blob)
        fuzzed.append(path)
    return fuzzed


@pytest.mark.slow
@fuzz_settings(max(10, EXAMPLES // 20))
@given(blobs=st.lists(picture_bytes(), min_size=1, max_size=6))
def test_folder_data_set_keeps_good_files_and_names_every_rejected_one(blobs):
    root = Path(tempfile.mkdtemp(prefix="imgclf-fuzz-"))
    try:
        fuzzed = _write_folder(root / "data", blobs)
        with watchdog():
            data = load_data(DataConfig(data=str(root / "data"), cache_dir=str(root / "cache"), img_size=SIZE),
                             progress=False)
        kept = set(data.train.files)
        skipped = {f: reason for f, reason in data.skipped}
        for path in fuzzed:
            accepted = decode(path, 3) is not None
            assert (str(path) in kept) == accepted and (str(path) in skipped) != accepted, path
            if not accepted:
                assert skipped[str(path)].strip()
        assert len(data.train) == len(kept) == 2 + sum(str(p) in kept for p in fuzzed)
        assert len(data.val) == 2
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    model = build_model("tutorial_cnn", num_classes=3, img_size=SIZE)
    ckpt = {"model": {"name": "tutorial_cnn"}, "classes": ["x", "y", "z"],
            "input": {"channels": 3, "size": SIZE, "mean": [0.5] * 3, "std": [0.25] * 3},
            "state_dict": model.state_dict()}
    return Predictor(ckpt, device="cpu")


# predict decodes in threads, and warnings.catch_warnings (in load_image) is not thread-safe before Python
# 3.14: a Pillow note may escape as a printed warning there, which is noise, not a failure.
@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz_settings(max(10, EXAMPLES // 20))
@given(blobs=st.lists(picture_bytes(), min_size=1, max_size=6))
def test_predict_answers_every_file_and_names_the_rejected(predictor, blobs):
    root = Path(tempfile.mkdtemp(prefix="imgclf-fuzz-"))
    try:
        paths = []
        for i, blob in enumerate(blobs):
            paths.append(root / f"p{i}.jpg")
            paths[-1].write_bytes(blob)
        with watchdog():
            results = predictor.predict([str(p) for p in paths], topk=2, batch_size=4)
        assert [r.path for r in results] == [str(p) for p in paths]
        for path, r in zip(paths, results, strict=True):
            if decode(path, 3) is None:
                assert r.error and r.error.startswith("not a readable picture (") and not r.labels, r
            else:
                assert r.error is None and len(r.labels) == 2 and all(0.0 <= p <= 1.0 for p in r.probs), r
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- damaged and foreign checkpoints (issue 14, point 5)

CKPT_FILES = int(os.environ.get("IMGCLF_FUZZ_CHECKPOINTS", "1000"))
TINY_NET = '''
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes, in_channels=3, img_size=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    def forward(self, x):
        return self.body(x)
'''


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> dict:
    """A real checkpoint of a small run (a 4-filter network of the user's, 8x8 pictures): a few kilobytes."""
    from conftest import write_class_folder

    from imgclf.cli import main

    root = tmp_path_factory.mktemp("fuzz-ckpt")
    write_class_folder(root / "data" / "train", ["a", "b"], 4, size=8, seed=1)
    write_class_folder(root / "data" / "test", ["a", "b"], 2, size=8, seed=2)
    (root / "net.py").write_text(TINY_NET)
    assert main(["train", "--data", str(root / "data"), "--model", f"{root / 'net.py'}:Net", "--epochs", "1",
                 "--batch-size", "4", "--device", "cpu", "--out", str(root / "run")]) == 0
    return {"root": root, "ckpt": root / "run" / "checkpoints" / "last.pt", "net": str(root / "net.py")}


def _rezip(original: bytes, pickle_bytes: bytes) -> bytes:
    """`original` (a zip-format checkpoint) with its data.pkl replaced."""
    import zipfile

    source, out = zipfile.ZipFile(io.BytesIO(original)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            target.writestr(info.filename, pickle_bytes if info.filename.endswith("/data.pkl") else source.read(info))
    return out.getvalue()


def _pickle_of(original: bytes) -> tuple[bytes, int]:
    """The data.pkl of a zip-format checkpoint, and where its bytes start in the file."""
    import zipfile

    archive = zipfile.ZipFile(io.BytesIO(original))
    info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
    data = archive.read(info)
    return data, original.index(data, info.header_offset)


FOREIGN_VALUES = [None, 0, -1, 2**70, 1.5, float("nan"), float("inf"), "", "x" * 2000, "a\nb", [], {}, [1, 2],
                  {"a": 1}, b"bytes", (1,), {1, 2}, True, torch.zeros(3), torch.zeros(2, 2, dtype=torch.int64),
                  torch.tensor(float("nan")), torch.zeros(0), torch.ones(5, 4), ["a"] * 3, [["a"]], [1.0, float("nan")]]


def _damage_structure(ckpt: dict, rng) -> dict:
    """A key somewhere in `ckpt` (up to three levels down) deleted or given a value of another kind."""
    import copy

    ckpt = copy.copy(ckpt)
    parent = ckpt
    for _ in range(rng.randrange(1, 4)):
        keys = list(parent)
        if not keys:
            break
        key = rng.choice(keys)
        if isinstance(parent[key], dict) and parent[key] and rng.random() < 0.6:
            parent[key] = copy.copy(parent[key])
            parent = parent[key]
            continue
        break
    else:
        key = rng.choice(list(parent)) if parent else None
    if key is None:
        return ckpt
    if rng.random() < 0.3:
        del parent[key]
    else:
        parent[key] = rng.choice(FOREIGN_VALUES)
    return ckpt


def _foreign(rng) -> bytes:
    """A file that is no checkpoint: text, picture headers, random bytes, pickles of plain values, other zips."""
    import pickle
    import zipfile

    kind = rng.randrange(7)
    if kind == 0:
        return rng.choice([b"these are my notes\n", b"", b"(t", b"\x80\x02", b"}q\x00.", b"c__builtin__\neval\n"])
    if kind == 1:
        heads = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"GIF89a", b"PK\x03\x04",
                 b"\x93NUMPY\x01\x00"]
        return rng.choice(heads) + rng.randbytes(rng.randrange(0, 200))
    if kind == 2:
        return rng.randbytes(rng.randrange(1, 300))
    if kind == 3:
        value = rng.choice(FOREIGN_VALUES[:18] + [{"format": "imgclf-checkpoint"}, {"format": "imgclf-checkpoint",
                                                                                      "format_version": "1"}])
        return pickle.dumps(value, protocol=rng.randrange(0, 6))
    if kind == 4:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            archive.writestr(rng.choice(["a/data.pkl", "data.pkl", "notes.txt", "a/data/0"]), rng.randbytes(50))
        return out.getvalue()
    if kind == 5:
        buffer = io.BytesIO()
        torch.save(rng.choice(FOREIGN_VALUES), buffer)
        return buffer.getvalue()
    return pickle.dumps({"format": "imgclf-checkpoint", "classes": ["a"]}, protocol=2)[: rng.randrange(1, 40)]


def damaged_checkpoints(original: bytes, count: int, seed: int = 14):
    """`count` damaged or foreign files (name of the damage, bytes), from the checkpoint `original`."""
    import random

    rng = random.Random(seed)
    ckpt = torch.load(io.BytesIO(original), weights_only=True)
    legacy = io.BytesIO()
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
    legacy = legacy.getvalue()
    pkl, at = _pickle_of(original)
    for i in range(count):
        kind = ["truncated", "flipped", "flipped-pickle", "mutated-pickle", "structure", "legacy", "foreign"][i % 7]
        if kind == "truncated":
            yield kind, original[: rng.randrange(len(original))]
        elif kind in ("flipped", "flipped-pickle", "legacy"):
            data = bytearray(legacy if kind == "legacy" else original)
            low, high = (at, at + len(pkl)) if kind == "flipped-pickle" else (0, len(data))
            for _ in range(rng.randrange(1, 9)):
                data[rng.randrange(low, high)] = rng.randrange(256)
            yield kind, bytes(data[: rng.randrange(len(data)) if kind == "legacy" and rng.random() < 0.3 else None])
        elif kind == "mutated-pickle":
            data = bytearray(pkl)
            for _ in range(rng.randrange(1, 5)):
                pos = rng.randrange(len(data))
                op = rng.randrange(3)
                if op == 0:
                    data[pos] = rng.randrange(256)
                elif op == 1:
                    data[pos:pos] = rng.randbytes(rng.randrange(1, 6))
                else:
                    del data[pos : pos + rng.randrange(1, 6)]
            yield kind, _rezip(original, bytes(data))
        elif kind == "structure":
            buffer = io.BytesIO()
            torch.save(_damage_structure(ckpt, rng), buffer)
            yield kind, buffer.getvalue()
        else:
            yield kind, _foreign(rng)


@pytest.mark.slow
def test_damaged_and_foreign_checkpoints_are_one_line_each(small_run, tmp_path):
    """1,000 damaged or foreign files given as a checkpoint (IMGCLF_FUZZ_CHECKPOINTS more; the slow tier
    tries 10,000): each is one UserError line, or loads."""
    fuzz_checkpoints(small_run, tmp_path, CKPT_FILES)


@pytest.mark.slow
def test_ten_thousand_damaged_and_foreign_checkpoints(small_run, tmp_path):
    fuzz_checkpoints(small_run, tmp_path, max(CKPT_FILES, 10_000), seed=1014)


def fuzz_checkpoints(small_run: dict, folder: Path, count: int, seed: int = 14) -> None:
    """`count` damaged or foreign files given as a checkpoint: each is an imgclf checkpoint that loads (and
    builds its network or says in one line why not), or one UserError line naming the file. Nothing else
    escapes."""
    from imgclf.checkpoint import load_checkpoint
    from imgclf.errors import UserError
    from imgclf.models import model_from_checkpoint

    original = small_run["ckpt"].read_bytes()
    assert len(original) < 40_000
    shm = Path("/dev/shm")  # thousands of small writes: in memory where there is such a folder
    path = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else folder)) / "damaged.pt"
    escaped, outcomes, kinds = {}, {}, set()
    with watchdog():
        for kind, data in damaged_checkpoints(original, count, seed):
            kinds.add(kind)
            path.write_bytes(data)
            try:
                ckpt = load_checkpoint(path)
                model_from_checkpoint(ckpt, model_code=small_run["net"])
                outcome = "loaded"
            except UserError as err:
                assert "\n" not in str(err), str(err)
                outcome = "refused" if str(path) in str(err) else "does not fit"
            except Exception as err:  # noqa: BLE001 - what escapes is the finding
                escaped.setdefault(f"{kind} {type(err).__name__}: {str(err)[:100]}", data[:40])
                continue
            outcomes[kind, outcome] = outcomes.get((kind, outcome), 0) + 1
    shutil.rmtree(path.parent)
    assert escaped == {}, "\n".join(escaped)
    assert sum(outcomes.values()) == count and len(kinds) == 7
    # the damage reached every stage: the reader, the checks of structure and weights, the network's build
    assert outcomes.get(("structure", "refused"), 0) > count // 30, outcomes
    assert outcomes.get(("structure", "loaded"), 0) > 0 and outcomes.get(("flipped", "loaded"), 0) > 0, outcomes
    assert outcomes.get(("mutated-pickle", "refused"), 0) > count // 30, outcomes


@pytest.mark.slow
def test_damaged_checkpoints_through_predict_eval_and_resume(small_run, tmp_path, capsys):
    """A sample of the damaged files through the commands: exit 0 with answers, or 2 with one line."""
    from imgclf.cli import main

    original = small_run["ckpt"].read_bytes()
    data, net = small_run["root"] / "data", small_run["net"]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    path = run / "checkpoints" / "last.pt"
    for i, (kind, blob) in enumerate(damaged_checkpoints(original, 420, seed=15)):
        path.write_bytes(blob)
        argv = [["predict", str(path), str(data / "test"), "--model-code", net],
                ["eval", str(path), "--data", str(data), "--model-code", net],
                ["train", "--resume", str(run), "--epochs", "2", "--model-code", net]][i % 3]
        code = main([*argv, "--device", "cpu"] if argv[0] != "train" else argv)
        err = capsys.readouterr().err
        if code == 3 and argv[0] == "train":  # resumed weights flipped so that training diverges: said as for any run
            assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("try a lower --lr"), (kind, err)
        elif code != 0:
            assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (kind, argv, err)
        for leftover in run.iterdir():  # a resumed run that worked: back to one checkpoint for the next
            if leftover.name != "checkpoints":
                leftover.unlink() if leftover.is_file() else None
