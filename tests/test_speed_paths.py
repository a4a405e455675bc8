"""The fast paths give the same answers as the plain ones: layouts, precisions, the decode cache, batch
augmentation, the fast network's whitening layer and the `fast` recipe. Correctness only; timings live in
benchmarks/."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, write_class_folder
from PIL import Image

from imgclf import cache as cache_mod
from imgclf.cache import Split, cached_split
from imgclf.config import DataConfig, TrainConfig
from imgclf.configfile import RECIPES
from imgclf.errors import UserError
from imgclf.loader import BatchLoader
from imgclf.models import FastNet, build_model
from imgclf.runtime import autocast_factory, cpu_has_native_bf16
from imgclf.sources import list_images
from imgclf.transforms import BatchTransform, augment_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process trainings: one intra-op thread (conftest)

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _images(n: int = 32, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def _trained_like(name: str) -> torch.nn.Module:
    """A model in eval mode whose BatchNorm statistics and whitening come from data, as after training."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10)
    x = BatchTransform(MEAN, STD)(_images(64, seed=1), train=False)
    if isinstance(model, FastNet):
        model.init_whitening(x)
        model.train()
        with torch.no_grad():
            model(x)  # fill the running statistics
    return model.eval()


# ---------------------------------------------------------------- layouts and precisions

@pytest.mark.parametrize("name", ["tutorial_cnn", pytest.param("fastnet", marks=pytest.mark.slow)])
def test_channels_last_gives_the_same_logits(name):
    model = _trained_like(name)
    loader = BatchLoader(Split(_images(48), torch.zeros(48, dtype=torch.int64)), batch_size=16,
                         transform=BatchTransform(MEAN, STD), train=False, device=torch.device("cpu"))
    loader_cl = BatchLoader(loader.split, batch_size=16, transform=loader.transform, train=False,
                            device=torch.device("cpu"), channels_last=True)
    with torch.inference_mode():
        for (x, _, _), (x_cl, _, _) in zip(loader.epoch(0), loader_cl.epoch(0), strict=True):
            assert x_cl.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(x, x_cl)
            reference = model(x)
            model_cl = model.to(memory_format=torch.channels_last)
            torch.testing.assert_close(model_cl(x_cl), reference, rtol=1e-4, atol=1e-4)
            model.to(memory_format=torch.contiguous_format)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 on this CPU")
@pytest.mark.parametrize("name", ["tutorial_cnn", pytest.param("fastnet", marks=pytest.mark.slow)])
def test_bf16_autocast_predicts_like_fp32(name):
    model = _trained_like(name)
    x = BatchTransform(MEAN, STD)(_images(256, seed=2), train=False)
    with torch.inference_mode():
        fp32 = model(x)
        with autocast_factory(torch.device("cpu"), torch.bfloat16)():
            bf16 = model(x.contiguous(memory_format=torch.channels_last)).float()
    # bf16 keeps 8 bits of mantissa: logits agree to about 1% of their spread, and so do the predictions,
    # except where two classes are nearly tied
    spread = fp32.std().item()
    assert (bf16 - fp32).abs().max().item() < 0.1 * spread
    tied = (fp32.topk(2).values.diff(dim=1).abs().squeeze(1) < 0.05 * spread)
    assert torch.equal(bf16.argmax(1)[~tied], fp32.argmax(1)[~tied])


# ---------------------------------------------------------------- batch augmentation and normalisation

def test_normalisation_is_x_over_255_minus_mean_over_std():
    images = _images(8)
    x = BatchTransform(MEAN, STD)(images, train=False)
    expected = (images.double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)
    cl = BatchTransform(MEAN, STD)(images, train=False, memory_format=torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x)


def test_each_augmented_picture_is_a_flipped_shifted_window_of_its_original():
    images, pad = _images(64, size=12), 3
    out = augment_batch(images, "flip-crop", pad=pad, generator=torch.Generator().manual_seed(5))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (pad,) * 4, mode="reflect")
    flipped_count, shifts = 0, set()
    for i in range(len(images)):
        matches = [(f, dy, dx) for f in (False, True) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if torch.equal(out[i], (padded[i].flip(2) if f else padded[i])[:, dy : dy + 12, dx : dx + 12])]
        assert matches, f"picture {i} is not a flipped/shifted window of its original"
        flipped_count += matches[0][0]
        shifts.add(matches[0][1:])
    assert 16 <= flipped_count <= 48  # about half are flipped
    assert len(shifts) > 10  # shifts vary per picture


def test_augmentation_is_the_same_on_uint8_and_float_and_repeatable():
    images = _images(16)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = augment_batch(images, "flip-crop-cutout", pad=4, generator=gen())
    b = augment_batch(images.float() / 255, "flip-crop-cutout", pad=4, generator=gen())
    torch.testing.assert_close(a.float() / 255, b, rtol=0, atol=0.5 / 255 + 1e-6)  # cutout grey: 128 vs 0.5
    assert torch.equal(a, augment_batch(images, "flip-crop-cutout", pad=4, generator=gen()))
    assert not torch.equal(a, augment_batch(images, "flip-crop-cutout", pad=4,
                                            generator=torch.Generator().manual_seed(4)))


def test_train_batches_are_normalised_augmented_pictures():
    split = Split(_images(40), torch.arange(40) % 10)
    loader = BatchLoader(split, batch_size=20, transform=BatchTransform(MEAN, STD, "flip"), train=True,
                         device=torch.device("cpu"), channels_last=True)
    x, y, n = next(iter(loader.epoch(0)))
    assert x.dtype == torch.float32 and x.shape == (20, 3, 32, 32) and n == 20
    assert x.is_contiguous(memory_format=torch.channels_last)
    back = (x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255
    for b, label in zip(back.round().to(torch.uint8), y.tolist(), strict=True):
        candidates = split.images[split.labels == label]
        assert any(torch.equal(b, c) or torch.equal(b, c.flip(2)) for c in candidates)


# ---------------------------------------------------------------- the decode cache

def _folder(tmp_path):
    root = write_class_folder(tmp_path / "pics", ["a", "b"], 6, size=12)
    return root, list_images(root), [0] * 6 + [1] * 6


def test_cache_is_reused_without_decoding_again(tmp_path, monkeypatch):
    root, files, labels = _folder(tmp_path)
    cache = tmp_path / "cache"
    first, _ = cached_split(files, labels, size=12, channels=3, cache_root=cache, progress=False)
    monkeypatch.setattr(cache_mod, "_decode_many", lambda *a, **k: pytest.fail("decoded again"))
    second, _ = cached_split(files, labels, size=12, channels=3, cache_root=cache, progress=False)
    assert torch.equal(torch.as_tensor(first.images), torch.as_tensor(second.images))
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1


def test_cache_is_rebuilt_when_a_file_changes(tmp_path):
    root, files, labels = _folder(tmp_path)
    cache = tmp_path / "cache"
    before, _ = cached_split(files, labels, size=12, channels=3, cache_root=cache, progress=False)
    Image.new("RGB", (12, 12), (255, 0, 0)).save(files[3])  # same name, new content
    st = files[3].stat()
    os.utime(files[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # even on coarse-timestamp filesystems
    after, _ = cached_split(files, labels, size=12, channels=3, cache_root=cache, progress=False)
    assert torch.equal(torch.as_tensor(after.images)[3], torch.tensor([255, 0, 0]).view(3, 1, 1).expand(3, 12, 12)
                       .to(torch.uint8))
    assert torch.equal(torch.as_tensor(before.images)[:3], torch.as_tensor(after.images)[:3])
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


def test_large_cache_is_memory_mapped_and_batches_the_same(tmp_path, monkeypatch):
    root, files, labels = _folder(tmp_path)
    cache = tmp_path / "cache"
    in_memory, _ = cached_split(files, labels, size=12, channels=3, cache_root=cache, progress=False)
    monkeypatch.setattr(cache_mod, "MMAP_BYTES", 100)  # everything above 100 bytes counts as large
    mapped, _ = cached_split(files, labels, size=12, channels=3, cache_root=cache, progress=False)
    assert isinstance(in_memory.images, torch.Tensor)
    assert isinstance(mapped.images, np.memmap) and not mapped.images.flags.writeable
    transform = BatchTransform(MEAN, STD, "flip-crop", pad=2)
    a = BatchLoader(in_memory, batch_size=5, transform=transform, train=True, device=torch.device("cpu"))
    b = BatchLoader(mapped, batch_size=5, transform=transform, train=True, device=torch.device("cpu"))
    for (xa, ya, _), (xb, yb, _) in zip(a.epoch(1), b.epoch(1), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ---------------------------------------------------------------- the fast network and recipe

def test_fastnet_whitening_layer_whitens_2x2_patches():
    torch.manual_seed(0)
    model = FastNet(num_classes=10)
    base = torch.nn.functional.avg_pool2d(torch.randn(200, 3, 34, 34), 3, stride=1)  # correlated pixels
    x = base + 0.3 * base.mean(1, keepdim=True)  # and correlated channels
    model.init_whitening(x)
    w = model.whiten.weight
    assert w.shape == (24, 3, 2, 2) and model.whiten.bias.shape == (24,)
    assert not w.requires_grad and not model.whiten.bias.requires_grad
    torch.testing.assert_close(w[12:], -w[:12])
    with torch.no_grad():
        out = model.whiten(x)[:, :12]  # (N, 12, 31, 31): the first half; the second is its negative
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(flat.T)
    torch.testing.assert_close(cov, torch.eye(12), atol=0.05, rtol=0)


def test_fastnet_shapes_and_small_pictures():
    model = FastNet(num_classes=7, in_channels=1, img_size=16)
    assert model.whiten.weight.shape == (8, 1, 2, 2)
    assert model(torch.randn(3, 1, 16, 16)).shape == (3, 7)
    assert FastNet()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(UserError, match="at least 16x16"):
        FastNet(img_size=8)


def test_fast_recipe_is_valid_and_flags_still_override_it():
    from imgclf.cli import build_parser, train_config

    assert RECIPES["fast"]["model"]["name"] == "fastnet_small"
    args = build_parser().parse_args(["train", "--data", "x", "--recipe", "fast", "--epochs", "3"])
    cfg = train_config(args)
    assert isinstance(cfg, TrainConfig)
    assert (cfg.model.name, cfg.optim.epochs, cfg.run.tta, cfg.data.batch_size) == ("fastnet_small", 3, True, 512)
    assert cfg.data == DataConfig(data="x", batch_size=512, eval_batch_size=1000, augment="flip-crop", crop_pad=2,
                                  progressive_resize=20)


@pytest.mark.slow
def test_fast_recipe_trains_end_to_end(tiny_split_folder, tmp_path):
    out = tmp_path / "run"
    # --lr given: the fast recipe's rate is for batch 512; following the batch (x 16/512) it would barely move
    r = run_cli("train", "--data", tiny_split_folder, "--recipe", "fast", "--epochs", "2", "--batch-size", "16",
                "--lr", "0.75", "--precision", "fp32", "--img-size", "32", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "fastnet_small" in r.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[-1]["val_count"] == 24
    assert "val_acc" not in records[0]  # the recipe evaluates after the last epoch only
    assert records[-1]["val_acc"] > 0.5  # three easy classes
    # the final figure is the test-time-augmented one, as `imgclf eval` computes it from the checkpoint
    r = run_cli("eval", out / "checkpoints" / "last.pt", "--data", tiny_split_folder, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["loss"] == pytest.approx(records[-1]["val_loss"], rel=1e-5)


# ---------------------------------------------------------------- the speed records' techniques

def test_lookahead_decay_schedule():
    from imgclf.optim import lookahead_decay

    values = [lookahead_decay(s, 100) for s in range(101)]
    assert values[0] == 0.0 and values[100] == 1.0
    assert values[50] == pytest.approx(0.95**5 * 0.125)
    assert all(a < b for a, b in zip(values[:100], values[1:100], strict=False))  # rises until the end


def test_lookahead_pulls_weights_back_to_the_average_every_five_steps():
    from imgclf.optim import Lookahead, lookahead_decay

    model = torch.nn.Linear(3, 2)
    lookahead = Lookahead(model)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    lookahead.after_step(model, 4, 100)  # not a multiple of 5: nothing happens
    assert torch.equal(model.weight, start + 1.0)
    lookahead.after_step(model, 50, 100)
    kept = lookahead_decay(50, 100)
    assert torch.allclose(model.weight, start + (1.0 - kept))  # moved to the average, which moved part-way
    assert torch.equal(lookahead.average["weight"], model.weight)
    with torch.no_grad():
        model.weight.add_(5.0)
    lookahead.after_step(model, 100, 100)  # the last step: the weights become the average
    assert torch.allclose(model.weight, start + (1.0 - kept))


def test_alternating_flips_mirror_each_picture_every_other_epoch():
    n = 40
    images = _images(n, size=8, seed=3)
    split = Split(images, torch.arange(n), [f"{i}.png" for i in range(n)])  # labels name the pictures
    transform = BatchTransform((0.0,) * 3, (1 / 255,) * 3, "flip")  # normalisation is the identity
    loader = BatchLoader(split, batch_size=8, transform=transform, train=True, device=torch.device("cpu"))
    flipped = {}
    for epoch in range(3):
        for x, y, _ in loader.epoch(epoch):
            for picture, i in zip(x, y.tolist(), strict=True):
                original = images[i].float()
                assert torch.equal(picture, original) or torch.equal(picture, original.flip(2))
                flipped[epoch, i] = torch.equal(picture, original.flip(2)) and not torch.equal(picture, original)
    assert all(flipped[0, i] != flipped[1, i] and flipped[0, i] == flipped[2, i] for i in range(n))
    assert 10 < sum(flipped[0, i] for i in range(n)) < 30  # about half start mirrored


def test_tta_averages_flipped_and_shifted_views():
    from imgclf.engine import tta_logits

    x = torch.randn(4, 3, 16, 16)
    pooled = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 5))
    # global average pooling ignores mirroring, and the two shifts pool the same up to the reflected borders
    assert torch.allclose(tta_logits(pooled, x), pooled(x), atol=0.05)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.Flatten(1), torch.nn.LazyLinear(5))
    conv(x)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[:, :, :16, :16], padded[:, :, 2:, 2:]]  # down-right and up-left by one pixel
    expected = 0.25 * (conv(x) + conv(x.flip(3))) + 0.125 * sum(conv(v) + conv(v.flip(3)) for v in shifted)
    assert torch.allclose(tta_logits(conv, x), expected, atol=1e-5)
    assert not torch.allclose(tta_logits(conv, x), conv(x), atol=1e-3)
    # --no-tta-shift: the picture and its mirror image only
    assert torch.allclose(tta_logits(conv, x, shift=False), 0.5 * (conv(x) + conv(x.flip(3))), atol=1e-6)
    assert not torch.allclose(tta_logits(conv, x, shift=False), expected, atol=1e-3)


def test_auto_precision_takes_bf16_only_where_the_cpu_computes_it(monkeypatch):
    """oneDNN emulates bf16 on a plain AVX512 CPU, 3-4x slower than fp32: `auto` must not choose it there."""
    from imgclf import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert not runtime.bf16_supported(torch.device("cpu"))
    assert runtime.resolve_precision("auto", torch.device("cpu")) == torch.float32
    native = cpu_has_native_bf16()
    flags = Path("/proc/cpuinfo").read_text()
    assert native == any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "bf16"))
