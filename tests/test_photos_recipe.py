"""The photos recipe (issue 22, point 5): a folder of photos trained from scratch gets recipes/photos.yaml by
--recipe auto, chosen by the rule the loaded data's `photos` follows; CIFAR-sized pictures, built-in data sets
and --pretrained weights keep their recipes; every value is overridden by its flag."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_class_folder

from imgclf.cli import build_parser, main, train_config
from imgclf.config import DataConfig, TrainConfig
from imgclf.configfile import RECIPES
from imgclf.resolve import chosen_recipe, resolve
from imgclf.sources import holds_photos, load_data

# every value recipes/photos.yaml sets, as the resolved configuration holds it
RECIPE = {("optim", "optimizer"): "adamw", ("optim", "lr"): 1e-3, ("optim", "weight_decay"): 0.01,
          ("data", "batch_size"): 64}


def resolved(*argv) -> TrainConfig:
    return train_config(build_parser().parse_args(["train", *map(str, argv)]))


def value(cfg: TrainConfig, key: tuple[str, str]):
    return getattr(getattr(cfg, key[0]), key[1])


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    """Photos (80-px squares in train/ and test/), and CIFAR-sized pictures (32-px squares, no split folders)."""
    write_class_folder(tmp_path / "photos" / "train", ["cat", "dog"], 3, size=80)
    write_class_folder(tmp_path / "photos" / "test", ["cat", "dog"], 2, size=80)
    write_class_folder(tmp_path / "small", ["cat", "dog"], 3, size=32)
    return {"photos": tmp_path / "photos", "small": tmp_path / "small", "empty": tmp_path}


def test_a_folder_of_photos_resolves_the_photos_recipe(folders):
    assert RECIPE.keys() == {(section, field) for section, fields in RECIPES["photos"].items() for field in fields}
    cfg = resolved("--data", folders["photos"], "--model", "resnet18")
    for key, expected in RECIPE.items():
        assert value(cfg, key) == expected, key
    assert cfg == resolved("--data", folders["photos"], "--model", "resnet18", "--recipe", "photos")
    small = resolved("--data", folders["small"], "--model", "resnet18")  # CIFAR-sized: the default recipe
    assert small == resolved("--data", folders["small"], "--model", "resnet18", "--recipe", "default")
    assert (small.optim.optimizer, small.optim.lr, small.optim.weight_decay) == ("sgd", 0.05, 5e-4)
    kept = resolved("--data", folders["photos"], "--recipe", "default")  # a recipe named wins
    assert (kept.optim.optimizer, kept.optim.lr) == ("sgd", 0.05)


def test_the_choice_follows_the_loaded_datas_photos_rule(folders):
    for name in ("photos", "small"):
        data = load_data(DataConfig(data=str(folders[name]), cache_dir=str(folders["empty"] / "cache")),
                         progress=False)
        assert holds_photos(folders[name]) is data.photos is (name == "photos"), name
    for data in ("cifar10", str(folders["empty"] / "missing"), str(folders["empty"] / "cache")):
        assert not holds_photos(data), data  # built-in, absent, or no pictures: loading says what is wrong
    assert chosen_recipe("auto", {("data", "data"): str(folders["photos"])}) == "photos"
    assert chosen_recipe("auto", {("data", "data"): str(folders["photos"])}, {("data", "data"): "cifar10"}) == \
        "default"  # the last layer that sets --data decides
    assert chosen_recipe("auto", {("data", "data"): str(folders["photos"]), ("model", "pretrained"): "w.pth"}) == \
        "finetune"  # pretrained weights: the fine-tuning recipe, whatever the pictures
    assert resolve({("data", "data"): str(folders["photos"])}).optim.optimizer == "adamw"  # fit and tune too


def test_every_photos_value_is_overridden_by_its_flag_and_shown_by_print_config(folders, capsys):
    flags = {("optim", "optimizer"): "adam", ("optim", "lr"): 0.003, ("optim", "weight_decay"): 0.05,
             ("data", "batch_size"): 32}
    assert flags.keys() == RECIPE.keys()
    argv = [x for (_, name), v in flags.items() for x in (f"--{name.replace('_', '-')}", v)]
    cfg = resolved("--data", folders["photos"], *argv)
    for key, expected in flags.items():
        assert value(cfg, key) == expected, key
    smaller = resolved("--data", folders["photos"], "--batch-size", 16)  # the recipe's rate follows the batch
    assert smaller.optim.lr == pytest.approx(1e-3 * (16 / 64) ** 0.5)  # (AdamW: timm's square-root rule)
    assert main(["train", "--data", str(folders["photos"]), "--print-config"]) == 0
    shown = capsys.readouterr().out
    for line in ("optimizer: adamw", "lr: 0.001", "weight_decay: 0.01", "batch_size: 64"):
        assert f"\n{line}\n" in shown, line
