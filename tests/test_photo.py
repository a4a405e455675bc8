"""The photo recipe (issue 12): training pictures kept larger than the model's side, random-resized crops,
auto-augment, erasing and mixup/CutMix on whole batches, repeatable from (seed, epoch, step) alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_class_folder
from PIL import Image

from imgclf.augment import Draws, Erase, Flip, ResizedCrop, build
from imgclf.cache import Split
from imgclf.checkpoint import load_checkpoint
from imgclf.cli import build_parser, main, train_config
from imgclf.loader import BatchLoader
from imgclf.pipeline import augmentation
from imgclf.sources import load_data
from imgclf.transforms import BatchTransform, Mixer

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def photo_folder(root, per_class: int = 6, side: tuple[int, int] = (90, 70)):
    """train/ and val/ of two classes of photo-sized (non-square, over 64 px) pictures."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c, name in enumerate(("ant", "bee")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.array([200 * c + 20, 120, 220 - 200 * c], dtype=np.float64)
                pixels = base + rng.normal(0, 30, (side[1], side[0], 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg")
    return root


def config(*flags):
    return train_config(build_parser().parse_args(["train", *map(str, flags)]))


def test_photos_get_the_photo_recipe_and_a_larger_training_store(tmp_path):
    cfg = config("--data", photo_folder(tmp_path / "p"), "--img-size", 56)
    data = load_data(cfg.data)
    assert data.photos and augmentation(cfg.data, data) == "photo"
    assert augmentation(cfg.data, data, epochs=3) == "flip-crop"  # a short run: measured best (RESULTS.md)
    assert data.train.images.shape[-1] == 64 and data.val.images.shape[-1] == 56  # 8/7 of 56
    small = tmp_path / "s"
    write_class_folder(small / "train", ["a", "b"], 4)
    write_class_folder(small / "test", ["a", "b"], 2)
    cfg = config("--data", small)
    data = load_data(cfg.data)
    assert not data.photos and augmentation(cfg.data, data) == "flip-crop"
    assert data.train.images.shape[-1] == data.val.images.shape[-1] == 16


def test_photo_augment_is_a_function_of_each_pictures_place():
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    augment = build("photo", {"resized-crop": {"size": 32}, "erase": {"erasing": 0.5}})

    def draws(places, seed=1):
        return Draws(seed, epoch=2, step=5, places=tuple(places))

    a = augment(images, draws(range(6)))
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, augment(images, draws(range(6))))
    assert torch.equal(a[3:5], augment(images[3:5], draws([3, 4])))  # the same picture and place, alone or not
    assert not torch.equal(a, augment(images, draws(range(6), seed=2)))


def test_full_crop_without_policy_or_erasing_is_a_plain_resize_or_mirror():
    """scale (1, 1) and ratio (1, 1): the crop is the whole stored picture, only resized (and perhaps mirrored)."""
    images = torch.arange(2 * 8 * 8, dtype=torch.float64).view(2, 1, 8, 8).mul(3).to(torch.uint8)
    augment = build("photo", {"resized-crop": {"size": 8, "scale": (1.0, 1.0), "ratio": (1.0, 1.0)},
                              "policy": {"policy": "none"}, "erase": {"erasing": 0.0, "fill": (0,)}})
    out = augment(images, Draws(0, 0, 0, (1, 2)))
    for i in range(2):
        assert torch.equal(out[i], images[i]) or torch.equal(out[i], images[i].flip(-1))
    assert torch.equal(ResizedCrop(8, (1.0, 1.0), (1.0, 1.0))(images, Draws(0, 0, 0, (1, 2))), images)
    assert torch.equal(Flip()(images, Draws(0, 0, 0, (0, 1), flip=torch.tensor([True, False]))),
                       torch.stack([images[0].flip(-1), images[1]]))
    assert torch.equal(Erase(0.0)(images, Draws(0, 0, 0, (0, 1))), images)


def test_eval_view_is_the_centre_crop_of_the_store():
    images = torch.randint(0, 256, (2, 3, 10, 10), dtype=torch.uint8)
    x = BatchTransform((0.0,) * 3, (1 / 255,) * 3, size=8)(images, train=False)
    assert torch.equal(x, images[:, :, 1:9, 1:9].float())


def test_mixer_gives_soft_labels_and_is_seeded():
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    mixer = Mixer(3, mixup=0.4, cutmix=1.0)
    xa, ya = mixer(x, y, 7)
    xb, yb = mixer(x, y, 7)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert ya.shape == (6, 3) and torch.allclose(ya.sum(1), torch.ones(6))


def test_each_process_augments_only_its_share_and_gets_what_one_process_gets():
    split = Split(torch.randint(0, 256, (20, 3, 24, 24), dtype=torch.uint8), torch.arange(20) % 2)
    transform = BatchTransform(MEAN, STD, "photo", size=20)
    assert transform.augmentation.per_picture
    common = dict(batch_size=8, transform=transform, train=True, device=torch.device("cpu"), seed=3)
    whole = list(BatchLoader(split, **common).epoch(1))
    shares = [list(BatchLoader(split, rank=r, world=2, **common).epoch(1)) for r in (0, 1)]
    for step, (x, y, n) in enumerate(whole):
        assert torch.equal(shares[0][step][0], x[0::2]) and torch.equal(shares[1][step][0], x[1::2])
        assert torch.equal(shares[0][step][1], y[0::2]) and shares[0][step][2] == n


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_photo_recipe_with_mixup_resumes_bit_exactly(tmp_path, capsys):
    data = photo_folder(tmp_path / "p")
    flags = ["--data", data, "--img-size", 48, "--batch-size", 4, "--epochs", 3, "--augment", "photo",
             "--auto-augment", "trivialaugment", "--random-erasing", 0.25, "--mixup", 0.3, "--cutmix", 1.0,
             "--precision", "fp32", "--device", "cpu", "--lr", 0.01]
    assert main(["train", *map(str, flags), "--out", str(tmp_path / "straight")]) == 0
    assert main(["train", *map(str, flags), "--out", str(tmp_path / "halves"), "--stop-after", "1"]) == 0
    assert main(["train", "--resume", str(tmp_path / "halves")]) == 0
    capsys.readouterr()
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "halves" / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    records = [json.loads(line) for line in (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= records[-1]["train_acc"] <= 1.0  # accuracy against the mixed labels' larger share
