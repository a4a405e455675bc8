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
pytestmark = pytest.mark.filterwarnings("error")


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
