"""imgclf.augment: augmentation as a table of small named operations, each drawing from its own stream, so
that adding or removing one changes nothing the others draw; the presets built from the table; the photo
recipe's options switch it on under "auto" and are refused, in one line, where the chosen preset lacks them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import write_class_folder
from test_photo import config, photo_folder

from imgclf import augment
from imgclf.augment import OPS, PRESETS, Cutout, Draws, Erase, Flip, Policy, ResizedCrop, Shift, build, choose
from imgclf.cli import main
from imgclf.config import AUGMENTS, AUTO_AUGMENTS, LONG_RUN, DataConfig
from imgclf.errors import UserError
from imgclf.pipeline import build_run, build_transform
from imgclf.sources import load_data

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process trainings: one intra-op thread (conftest)


def pictures(n: int = 12, side: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def draws(n: int = 12, seed: int = 5) -> Draws:
    return Draws(seed, epoch=1, step=3, places=tuple(range(n)))


@dataclass(frozen=True)
class Toy:
    """A new operation that draws from its own stream and changes nothing."""

    per_picture: ClassVar[bool] = True

    def __call__(self, x, draws):
        draws.uniform("toy", 3)
        torch.randint(0, 9, (len(x),), generator=draws.generator("toy"))
        return x


# ---------------------------------------------------------------- the table and the presets

def test_every_preset_is_an_augment_choice_and_runs_operations_of_the_table():
    assert ("auto", *PRESETS) == AUGMENTS
    assert all(name in OPS for ops in PRESETS.values() for name in ops)
    assert AUTO_AUGMENTS[0] == "none" and all(callable(augment._policy(name)) for name in AUTO_AUGMENTS[1:])
    assert build("flip-crop-cutout", {"crop": {"pad": 3}}).ops == (Flip(), Shift(3), Cutout())
    assert build("photo").ops == (ResizedCrop(), Flip(), Policy(), Erase())
    assert build("none") == augment.Augmentation("none", ())
    assert build("photo").per_picture and not build("flip-crop").per_picture and build("flip").per_picture
    with pytest.raises(ValueError, match="unknown augmentation preset 'flip-cut'; one of none, flip,"):
        build("flip-cut")


def test_a_new_operation_changes_nothing_the_others_draw(monkeypatch):
    x = pictures()
    for preset, options in (("flip-crop-cutout", {"crop": {"pad": 3}}),
                            ("photo", {"resized-crop": {"size": 20}, "erase": {"erasing": 0.7}})):
        before = build(preset, options)(x, draws())
        monkeypatch.setitem(OPS, "toy", Toy)
        for at in range(len(PRESETS[preset]) + 1):  # wherever it is inserted
            ops = PRESETS[preset]
            monkeypatch.setitem(PRESETS, preset, (*ops[:at], "toy", *ops[at:]))
            assert torch.equal(build(preset, options)(x, draws()), before), (preset, at)
            monkeypatch.setitem(PRESETS, preset, ops)


def test_removing_an_operation_leaves_the_others_draws(monkeypatch):
    x = torch.full((12, 3, 24, 24), 7, dtype=torch.uint8)  # a plain picture: shifts and crops keep it plain
    with_shifts = build("flip-crop-cutout", {"crop": {"pad": 3}})(x, draws())
    monkeypatch.setitem(PRESETS, "flip-crop-cutout", ("flip", "cutout"))
    assert torch.equal(build("flip-crop-cutout")(x, draws()), with_shifts)  # the same grey squares
    options = {"policy": {"policy": "none"}, "erase": {"erasing": 0.8, "fill": (200, 0, 0)}}
    erased = build("photo", options)(x, draws())
    monkeypatch.setitem(PRESETS, "photo", ("erase",))  # without the random-resized crops and the mirror
    assert torch.equal(build("photo", options)(x, draws()), erased)  # the same rectangles
    assert (erased == 200).any() and (erased == 7).any()


def test_each_operation_draws_from_its_own_stream():
    d = draws(4)
    assert len({d.seeds("policy")[0], d.seeds("erase")[0], d.seeds("resized-crop")[0]}) == 3
    assert d.seeds("erase")[2] == Draws(5, 1, 3, (9, 8, 2)).seeds("erase")[2]  # by place, whatever the rows
    assert not torch.equal(d.uniform("erase", 5), d.uniform("flip", 5))
    a = torch.rand(4, generator=d.generator("crop"))
    assert not torch.equal(a, torch.rand(4, generator=d.generator("cutout")))
    shared = d.generator(augment.SHARED, skip=2)  # cutout's place in the flip-crop family's batch stream
    first = d.generator(augment.SHARED)
    for _ in range(2):
        torch.randint(0, 9, (4,), generator=first)
    assert torch.equal(torch.randint(0, 24, (4,), generator=shared), torch.randint(0, 24, (4,), generator=first))


def test_policy_runs_torchvision_per_picture_and_keeps_the_callers_generator():
    x = pictures(4)
    state = torch.get_rng_state()
    a = Policy("randaugment")(x, draws(4))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, Policy("randaugment")(x, draws(4))) and a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a[1:3], Policy("randaugment")(x[1:3], Draws(5, 1, 3, (1, 2))))
    assert torch.equal(Policy("none")(x, draws(4)), x)
    assert torch.equal(x, pictures(4))  # the input is never written to


def test_without_draws_a_generator_leads_every_draw():
    x = pictures()
    a = build("photo")(x, Draws.from_generator(torch.Generator().manual_seed(1), 12))
    assert torch.equal(a, build("photo")(x, Draws.from_generator(torch.Generator().manual_seed(1), 12)))
    assert not torch.equal(a, build("photo")(x, Draws.from_generator(torch.Generator().manual_seed(2), 12)))


# ---------------------------------------------------------------- choosing the preset, and the photo options

def test_options_resolve_every_value_by_the_runs_length():
    cfg, mean = DataConfig(), (0.5, 0.25, 0.0)
    long = augment.options(cfg, size=64, mean=mean, epochs=LONG_RUN)
    assert long == {"crop": {"pad": 8}, "resized-crop": {"size": 64, "scale": (0.25, 1.0)},
                    "policy": {"policy": "trivialaugment"}, "erase": {"erasing": 0.25, "fill": (128, 64, 0)}}
    short = augment.options(cfg, size=64, mean=mean, epochs=LONG_RUN - 1)
    assert short["resized-crop"]["scale"] == (0.35, 1.0) and short["policy"] == {"policy": "none"}
    assert short["erase"]["erasing"] == 0.0
    given = DataConfig(crop_pad=2, crop_scale=0.5, auto_augment="randaugment", random_erasing=0.1)
    short = augment.options(given, size=64, mean=mean, epochs=1)
    assert (short["crop"]["pad"], short["resized-crop"]["scale"], short["policy"]["policy"],
            short["erase"]["erasing"]) == (2, (0.5, 1.0), "randaugment", 0.1)


@pytest.mark.parametrize("given, photos, epochs, expected", [
    ({}, True, LONG_RUN, "photo"),
    ({}, True, 3, "flip-crop"),
    ({}, False, LONG_RUN, "flip-crop"),
    ({"random_erasing": 0.25}, True, 3, "photo"),  # a photo option on a short run switches the recipe on
    ({"auto_augment": "trivialaugment"}, False, LONG_RUN, "photo"),  # and on small pictures
    ({"crop_scale": 0.5}, False, 2, "photo"),
    ({"crop_pad": 2}, True, LONG_RUN, "flip-crop"),  # flip-crop's option switches flip-crop on
    ({"auto_augment": "none", "random_erasing": 0.0, "crop_pad": 0}, True, 3, "flip-crop"),  # options idle
    ({"augment": "flip-crop", "auto_augment": "none", "random_erasing": 0.0}, True, LONG_RUN, "flip-crop"),
    ({"augment": "photo", "crop_pad": 0, "random_erasing": 0.5}, False, 1, "photo"),
    ({"augment": "flip-crop-cutout", "crop_pad": 3}, True, 1, "flip-crop-cutout"),
])
def test_auto_resolves_by_data_length_and_the_options_given(given, photos, epochs, expected):
    assert choose(DataConfig(**given), photos=photos, epochs=epochs) == expected


@pytest.mark.parametrize("given, words", [
    ({"augment": "flip-crop", "auto_augment": "randaugment"},
     "--auto-augment randaugment sets the policy operation, which --augment flip-crop does not run; leave it out "
     "(or give --auto-augment none), or use --augment photo or auto"),
    ({"augment": "none", "random_erasing": 0.5}, "--random-erasing 0.5 sets the erase operation"),
    ({"augment": "flip", "crop_scale": 0.3}, "--crop-scale 0.3 sets the resized-crop operation, which --augment "
                                             "flip does not run; leave it out, or use --augment photo or auto"),
    ({"augment": "photo", "crop_pad": 3}, "--crop-pad 3 sets the crop operation, which --augment photo does not "
                                          "run; leave it out (or give --crop-pad 0), or use --augment flip-crop"),
    ({"crop_pad": 3, "auto_augment": "randaugment"}, "--crop-pad (crop), --auto-augment (policy) set operations "
                                                     "of different augmentations; choose one with --augment"),
])
def test_an_option_its_preset_would_ignore_is_refused(given, words):
    for photos, epochs in ((True, LONG_RUN), (False, 1)):
        with pytest.raises(UserError, match="^" + words.replace("(", r"\(").replace(")", r"\)")):
            choose(DataConfig(**given), photos=photos, epochs=epochs)


def test_a_photo_option_on_a_short_run_trains_with_the_photo_recipe(tmp_path):
    folder = photo_folder(tmp_path / "p")
    cfg = config("--data", folder, "--img-size", 56, "--epochs", 3, "--random-erasing", 0.5, "--device", "cpu")
    data = load_data(cfg.data)
    assert data.train.images.shape[-1] == 64  # the photo recipe's larger store
    transform = build_run(cfg, data, device=torch.device("cpu")).transform
    assert transform.augment == "photo"
    assert transform.augmentation.ops == (ResizedCrop(56, (0.35, 1.0)), Flip(), Policy("none"),
                                          Erase(0.5, tuple(round(255 * m) for m in data.mean)))
    plain = config("--data", folder, "--img-size", 56, "--epochs", 3, "--device", "cpu")
    assert build_transform(plain.data, data, epochs=3).augment == "flip-crop"
    small = tmp_path / "s"
    write_class_folder(small / "train", ["a", "b"], 4)
    write_class_folder(small / "test", ["a", "b"], 2)
    cfg = config("--data", small, "--auto-augment", "trivialaugment", "--epochs", 2)
    data = load_data(cfg.data)
    transform = build_transform(cfg.data, data, epochs=2)
    assert transform.augment == "photo" and Policy("trivialaugment") in transform.augmentation.ops
    assert data.train.images.shape[-1] == 18  # 8/7 of 16: crops of the larger store


def test_train_refuses_an_ignored_photo_option_in_one_line_before_decoding(tmp_path, capsys, monkeypatch):
    import imgclf.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_data", lambda *a, **k: pytest.fail("decoded before refusing"))
    folder = photo_folder(tmp_path / "p")
    code = main(["train", "--data", str(folder), "--augment", "flip-crop", "--auto-augment", "randaugment",
                 "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--auto-augment randaugment sets the policy operation, which --augment flip-crop does not run" in err


def test_eval_of_a_photo_run_ignores_its_training_options():
    """Evaluation loads every split at the model's side with augment "none": the training options stay silent."""
    cfg = dataclasses.replace(DataConfig(auto_augment="randaugment", random_erasing=0.5), augment="none")
    from imgclf.sources import store_size

    assert store_size(cfg, 32, True) == 32
