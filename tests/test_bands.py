"""Multi-band and 16-bit pictures (imgclf.bands, issue 23): read at full depth into the cache, trained,
predicted, exported and served with the same contract; RGB weights adapted to N channels as timm does; every
misfit one line."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, write_class_folder
from PIL import Image

from imgclf import bands
from imgclf.cli import main
from imgclf.config import DataConfig
from imgclf.errors import UserError
from imgclf.models import build_model
from imgclf.models.adapter import adapt_rgb_filters
from imgclf.sources import load_data

tifffile = pytest.importorskip("tifffile")

SIDE = 12  # small pictures: every test here trains in a second or two


# ---------------------------------------------------------------- writing the pictures


def png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit PNG of `arr` (H, W, C: 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA) written here (Pillow writes none
    in colour), each row with the next of PNG's five filters, so that reading undoes every one of them."""
    h, w, c = arr.shape
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = arr.astype(">u2").tobytes()
    stride, bpp = w * c * 2, c * 2
    rows = np.frombuffer(raw, np.uint8).reshape(h, stride).astype(np.int32)
    out = bytearray()
    for y in range(h):
        kind, x = y % 5, rows[y]
        up = rows[y - 1] if y else np.zeros(stride, np.int32)
        left = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        if kind == 4:
            p = left + up - upleft
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        else:
            pred = [0 * x, left, up, (left + up) // 2][kind]
        out += bytes([kind]) + ((x - pred) & 0xFF).astype(np.uint8).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    path.write_bytes(bands.PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(out)))
                     + chunk(b"IEND", b""))


def band_picture(label: int, channels: int, rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """uint16 (side, side, channels): noise over the whole 16-bit range, one band bright for class 1, so a
    small network tells the classes apart; low bytes random, so 8 bits would lose most of each value."""
    arr = rng.integers(0, 40000, (side, side, channels), dtype=np.uint16)
    arr[:, :, label % channels] += 25000
    return arr


def write_folder(root: Path, channels: int, kind: str, *, per_class: int = 10, seed: int = 0) -> Path:
    """root/<a|b>/ pictures of `channels` bands, 16 bits: `kind` tiff (bands last), tiff-pages (one page a band)
    or png."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = band_picture(label, channels, rng)
            path = root / name / f"{i:02d}.{'png' if kind == 'png' else 'tif'}"
            if kind == "png":
                png16(path, arr)
            elif kind == "tiff-pages":
                tifffile.imwrite(path, np.moveaxis(arr, -1, 0), photometric="minisblack")
            else:
                tifffile.imwrite(path, arr, photometric="minisblack", planarconfig="contig")
    return root


def cli(*args) -> str:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main([*map(str, args)]) == 0
    return out.getvalue()


# ---------------------------------------------------------------- reading at full depth


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_a_16_bit_png_is_read_at_full_depth_through_every_filter(tmp_path, channels):
    arr = np.random.default_rng(channels).integers(0, 65536, (SIDE, SIDE, channels), dtype=np.uint16)
    png16(tmp_path / "x.png", arr)
    got = bands.load_bands(tmp_path / "x.png", size=SIDE, channels=channels, depth=16)
    assert got.dtype == np.uint16 and np.array_equal(got, arr)
    assert bands.probe(tmp_path / "x.png") == bands.Probe(channels, channels in (2, 4), 16, SIDE, SIDE)


@pytest.mark.parametrize("layout", ["tiff", "tiff-pages"])
def test_tiff_bands_are_read_whatever_their_layout(tmp_path, layout):
    write_folder(tmp_path, 13, layout, per_class=1)
    path = tmp_path / "b" / "00.tif"
    rng = np.random.default_rng(0)
    band_picture(0, 13, rng)
    want = band_picture(1, 13, rng)
    got = bands.load_bands(path, size=SIDE, channels=13, depth=16)
    assert np.array_equal(got, want)
    assert bands.probe(path) == bands.Probe(13, False, 16, SIDE, SIDE)


def test_pictures_differing_below_8_bits_stay_different_in_the_cache(tmp_path):
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        (tmp_path / "d" / name).mkdir(parents=True)
    base = rng.integers(0, 60000, (SIDE, SIDE, 4), dtype=np.uint16) & 0xFF00  # low bytes 0
    for i in range(3):
        for name in ("a", "b"):
            tifffile.imwrite(tmp_path / "d" / name / f"{i}.tif", base + i, photometric="minisblack",
                             planarconfig="contig")  # the same high bytes: only the low ones differ
    data = load_data(DataConfig(data=str(tmp_path / "d"), cache_dir=str(tmp_path / "cache"), val_fraction=0.34),
                     progress=False)
    images = torch.as_tensor(np.asarray(data.train.images))
    assert images.dtype == torch.uint16 and (data.channels, data.depth, data.img_size) == (4, 16, SIDE)
    kept = {int(images[k].to(torch.int32).max() - int(base.max())) for k in range(len(images))}
    assert len(kept) > 1  # at 8 bits the pictures would all be one
    assert {tuple(images[k].to(torch.int32).flatten().tolist()) for k in range(len(images))} <= {
        tuple(torch.from_numpy((base + i).astype(np.int32)).permute(2, 0, 1).flatten().tolist()) for i in range(3)}
    assert all(0.0 < m < 1.0 for m in data.mean) and len(data.std) == 4  # per band, of v / 65535


def test_resizing_keeps_16_bits_and_an_8_bit_picture_is_scaled_up(tmp_path):
    arr = np.full((SIDE * 2, SIDE * 3, 1), 40000, dtype=np.uint16)
    arr[:, :, 0] += np.arange(SIDE * 3, dtype=np.uint16)[None, :]
    png16(tmp_path / "wide.png", arr)
    got = bands.load_bands(tmp_path / "wide.png", size=SIDE, channels=1, depth=16)
    assert got.shape == (SIDE, SIDE, 1) and got.dtype == np.uint16
    assert 40000 < int(got.min()) < int(got.max()) < 40000 + SIDE * 3  # a smooth ramp at full depth
    Image.fromarray(np.full((SIDE, SIDE, 3), 200, np.uint8)).save(tmp_path / "rgb.png")
    assert (bands.load_bands(tmp_path / "rgb.png", size=SIDE, channels=3, depth=16) == 200 * 257).all()


# ---------------------------------------------------------------- one line for every misfit


def test_every_misfit_is_one_line(tmp_path):
    write_folder(tmp_path / "mixed", 4, "tiff", per_class=2)
    tifffile.imwrite(tmp_path / "mixed" / "a" / "z.tif", np.zeros((SIDE, SIDE, 5), np.uint16),
                     photometric="minisblack", planarconfig="contig")
    with pytest.raises(UserError, match=r"mix channel counts|z.tif has 5 channels, not 4, the channels of this run"):
        load_data(DataConfig(data=str(tmp_path / "mixed"), cache_dir=str(tmp_path / "c")), progress=False)

    write_class_folder(tmp_path / "rgb", ["x", "y"], 3, size=SIDE, fmt="jpg")
    with pytest.raises(UserError, match=r"--channels 4: .*has 3 channels; give --channels 3"):
        load_data(DataConfig(data=str(tmp_path / "rgb"), channels=4, cache_dir=str(tmp_path / "c")), progress=False)

    # past the pictures the run looks at first: a 5-band TIFF in a colour run is found when decoded
    write_class_folder(tmp_path / "late", ["x", "y"], 20, size=SIDE)
    tifffile.imwrite(tmp_path / "late" / "y" / "zz.tif", np.zeros((SIDE, SIDE, 5), np.uint16),
                     photometric="minisblack", planarconfig="contig")
    with pytest.raises(UserError, match=r"zz.tif has 5 channels, not the 3 of this run's pictures"):
        load_data(DataConfig(data=str(tmp_path / "late"), cache_dir=str(tmp_path / "c")), progress=False)


def test_an_ordinary_colour_folder_is_read_as_always(tmp_path):
    write_class_folder(tmp_path / "rgb", ["x", "y"], 3, size=SIDE)
    data = load_data(DataConfig(data=str(tmp_path / "rgb"), cache_dir=str(tmp_path / "c")), progress=False)
    assert (data.channels, data.depth) == (3, 8) and data.train.images.dtype == torch.uint8


# ---------------------------------------------------------------- pretrained RGB weights for N channels


def test_the_first_convolution_follows_timms_rule():
    w = torch.randn(8, 3, 3, 3)
    four = adapt_rgb_filters(w, 4)
    assert torch.equal(four, torch.cat([w, w[:, :1]], dim=1) * 0.75)
    assert torch.equal(adapt_rgb_filters(w, 13), w.repeat(1, 5, 1, 1)[:, :13] * (3 / 13))
    assert torch.equal(adapt_rgb_filters(w, 1), w.sum(dim=1, keepdim=True))


@pytest.mark.slow
def test_the_rule_is_timms():
    pytest.importorskip("timm")
    from timm.models import adapt_input_conv

    w = torch.randn(8, 3, 3, 3)
    for n in (1, 2, 4, 13):
        assert torch.allclose(adapt_rgb_filters(w, n), adapt_input_conv(n, w.clone()))


@pytest.mark.parametrize("name", [pytest.param("resnet18", marks=pytest.mark.slow),
                                  pytest.param("timm/resnet18", marks=pytest.mark.slow), "tutorial_cnn"])
def test_a_weights_file_of_an_rgb_network_is_adapted_to_4_channels(tmp_path, name):
    if name.startswith("timm/"):
        pytest.importorskip("timm")
    rgb = build_model(name, num_classes=10, in_channels=3, img_size=32)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    first = next(k for k, v in rgb.state_dict().items() if v.ndim == 4)
    model = build_model(name, num_classes=2, in_channels=4, img_size=32, pretrained=str(tmp_path / "rgb.pth"),
                        say=lambda line: None)
    assert torch.equal(model.state_dict()[first], adapt_rgb_filters(rgb.state_dict()[first], 4))


@pytest.mark.slow
def test_a_pretrained_rgb_network_adapted_to_4_channels_trains(tmp_path):
    rgb = build_model("resnet18", num_classes=1000, in_channels=3, img_size=32)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    write_folder(tmp_path / "d", 4, "tiff")
    cli("train", "--data", tmp_path / "d", "--model", "resnet18", "--pretrained", tmp_path / "rgb.pth",
        "--epochs", "1", "--freeze-epochs", "0", "--batch-size", "8", "--device", "cpu", "--precision", "fp32",
        "--img-size", "32",
        "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["input"]["channels"] == 4 and ckpt["input"]["depth"] == 16
    assert ckpt["state_dict"]["conv1.weight"].shape == (64, 4, 7, 7)
    started = adapt_rgb_filters(rgb.state_dict()["conv1.weight"], 4)
    assert not torch.equal(ckpt["state_dict"]["conv1.weight"], started)  # it trained from there
    assert torch.allclose(ckpt["state_dict"]["conv1.weight"], started, atol=0.05)


@pytest.mark.slow
def test_real_imagenet_weights_adapted_to_4_channels(tmp_path):
    weights = SHARED_DATA / "pretrained" / "tf_efficientnet_lite0_imagenet.pth"
    if not weights.exists():
        pytest.skip("../shared/data/pretrained is absent")
    pytest.importorskip("timm")
    model = build_model("timm/tf_efficientnet_lite0", num_classes=2, in_channels=4, img_size=64,
                        pretrained=str(weights), say=lambda line: None)
    stem = torch.load(weights, weights_only=True)["conv_stem.weight"]
    assert torch.equal(model.conv_stem.weight.detach(), adapt_rgb_filters(stem, 4))


# ---------------------------------------------------------------- train, predict, export, serve


@pytest.mark.slow
@pytest.mark.parametrize("channels, kind", [(4, "tiff"), (13, "tiff-pages"), (3, "png"), (1, "png")])
def test_train_predict_export_and_serve_keep_the_contract(tmp_path, channels, kind):
    data = write_folder(tmp_path / "d", channels, kind)
    cli("train", "--data", data, "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--precision", "fp32",
        "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run")
    ckpt_path = tmp_path / "run" / "checkpoints" / "best.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert {k: ckpt["input"][k] for k in ("channels", "size", "depth")} == {"channels": channels, "size": SIDE,
                                                                            "depth": 16}
    pictures = sorted(data.glob("*/*.*"))[:4]
    rows = [json.loads(line) for line in cli("predict", ckpt_path, *pictures, "--json", "--device", "cpu",
                                              "--topk", "2").splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in pictures] and all("error" not in r for r in rows)

    from imgclf.predict import Predictor

    predictor = Predictor.from_checkpoint(ckpt_path, device="cpu")
    pixels = torch.from_numpy(np.stack([predictor._decode(str(p)) for p in pictures]))
    assert pixels.dtype == torch.uint16  # predict decodes at the checkpoint's depth
    want = predictor.probabilities(pixels)

    pytest.importorskip("onnxruntime")
    out = cli("export", ckpt_path, "--format", "onnx")
    assert f"input uint16 (N, {channels}, {SIDE}, {SIDE})" in out
    exported = Predictor.from_path(ckpt_path.with_suffix(".onnx"), runtime="onnxruntime")
    assert exported.metadata["input"]["depth"] == 16 and exported.metadata["input"]["dtype"] == "uint16"
    assert exported.metadata["input"]["preprocessing"] == bands.PREPROCESSING
    assert torch.allclose(exported.probabilities(pixels), want, atol=1e-5)
    assert torch.equal(torch.from_numpy(np.stack([exported._decode(str(p)) for p in pictures])), pixels)
    if channels == 4 and importlib.util.find_spec("openvino") is not None:
        cli("export", ckpt_path, "--format", "openvino")
        openvino = Predictor.from_path(ckpt_path.with_suffix(".xml"), runtime="openvino")
        assert torch.allclose(openvino.probabilities(pixels), want, atol=1e-5)

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from test_serve import serving_in_this_process

    from imgclf.serve import create_app

    with serving_in_this_process(create_app(predictor, model_name="tutorial_cnn")) as url:
        answers = [httpx.post(f"{url}/predict", content=p.read_bytes(), timeout=60).json() for p in pictures]
    for answer, row in zip(answers, want, strict=True):
        assert abs(answer["top"][0]["probability"] - float(row.max())) < 1e-4


@pytest.mark.slow
def test_predict_answers_a_misfit_picture_with_its_error(tmp_path):
    data = write_folder(tmp_path / "d", 4, "tiff")
    cli("train", "--data", data, "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--precision", "fp32",
        "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run")
    tifffile.imwrite(tmp_path / "five.tif", np.zeros((SIDE, SIDE, 5), np.uint16), photometric="minisblack",
                     planarconfig="contig")
    from imgclf.predict import Predictor

    (row,) = Predictor.from_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", device="cpu").predict(
        [str(tmp_path / "five.tif")])
    assert "5 channels, not 4" in row.error


def test_a_contract_decoding_reaches_band_pictures_and_beyond_rgb_auto_runs_decode_plain():
    """The merge with the input contract: `bands.load_bands` follows a Decoding (its resize side, then the
    centre crop; bicubic), PLAIN leaves a picture of the side as it is, and a run of bands beyond RGB under
    --normalize auto (normalised by its own statistics) is decoded as imgclf's own whatever it was asked."""
    from imgclf.sources import _folder_roles, _role_decodings
    from imgclf.transforms import PLAIN, Decoding

    arr = np.random.default_rng(0).integers(0, 65535, (40, 60, 4)).astype(np.uint16)
    contract = Decoding("bicubic", 0.875)
    plain, cut = (bands._resize_crop(arr, 16, 16, d) for d in (PLAIN, contract))
    assert plain.shape == cut.shape == (16, 16, 4) and plain.dtype == cut.dtype == np.uint16
    assert (plain != cut).any()  # resized to 18 then cropped, not to 16
    assert (bands._resize_crop(arr[:16, :16], 16, 16) == arr[:16, :16]).all()
    asked = _role_decodings(contract, False)
    assert _folder_roles(asked, 4, "auto") == _role_decodings(PLAIN, False)
    assert _folder_roles(asked, 3, "auto") == asked and _folder_roles(asked, 4, "weights") == asked
