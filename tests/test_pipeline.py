"""imgclf.pipeline builds a run's pieces for training, `lr-find`, evaluation and the report alike: for the same
flags, `imgclf lr-find` and `imgclf train` start from the same weights and train on the same batches."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from conftest import write_class_folder

import imgclf.lrfind
import imgclf.train
from imgclf.cli import build_parser, main, train_config
from imgclf.pipeline import build_run
from imgclf.sources import load_data

pytestmark = pytest.mark.usefixtures("one_thread")

# Flags where lr-find once drifted from train (it ignored --crop-pad), on 48 pictures of 16x16: 6 steps an epoch.
FLAGS = ["--crop-pad", "1", "--augment", "flip-crop", "--batch-size", "8", "--seed", "4", "--device", "cpu"]
STEPS = 10  # lr-find's sweep runs into a second epoch


class RecordingLoader:
    """A BatchLoader that keeps a copy of every batch it hands out."""

    def __init__(self, loader, batches: list):
        self.loader, self.batches = loader, batches

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, **kwargs):
        for x, y, n in self.loader.epoch(epoch, **kwargs):
            self.batches.append((x.clone(), y.clone()))
            yield x, y, n


def lr_find_batches(folder, tmp_path, monkeypatch) -> tuple[dict, list]:
    """Run `imgclf lr-find`; return the initial weights and the batches its sweep trained on."""
    seen: dict = {"batches": []}
    real = imgclf.lrfind.range_test

    def recording(model, batches, **kwargs):
        seen["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def tapped():
            for x, y, *rest in batches:
                seen["batches"].append((x.clone(), y.clone()))
                yield (x, y, *rest)

        return real(model, tapped(), **kwargs)

    monkeypatch.setattr(imgclf.lrfind, "range_test", recording)
    assert main(["lr-find", "--data", str(folder), *FLAGS, "--steps", str(STEPS), "--start-lr", "1e-4",
                 "--end-lr", "0.1", "--out", str(tmp_path / "lr.png")]) == 0
    return seen["weights"], seen["batches"]


def train_batches(folder, tmp_path, monkeypatch) -> tuple[dict, list]:
    """Run `imgclf train` for 2 epochs; return the initial weights and the batches it trained on."""
    seen: dict = {"batches": []}
    real = imgclf.train.train_one_epoch

    def recording(state, loader, **kwargs):
        seen.setdefault("weights", {k: v.detach().clone() for k, v in state.model.state_dict().items()})
        return real(state, RecordingLoader(loader, seen["batches"]), **kwargs)

    monkeypatch.setattr(imgclf.train, "train_one_epoch", recording)
    assert main(["train", "--data", str(folder), *FLAGS, "--epochs", "2", "--out", str(tmp_path / "run")]) == 0
    return seen["weights"], seen["batches"]


@pytest.mark.slow
def test_lr_find_and_train_see_the_same_batches_for_the_same_flags(tiny_split_folder, tmp_path, monkeypatch):
    found_weights, found = lr_find_batches(tiny_split_folder, tmp_path, monkeypatch)
    trained_weights, trained = train_batches(tiny_split_folder, tmp_path, monkeypatch)
    assert len(found) == STEPS and len(trained) == 12  # 2 epochs of 6 steps
    for step, ((xf, yf), (xt, yt)) in enumerate(zip(found, trained[:STEPS], strict=True)):
        assert torch.equal(yf, yt), f"step {step}: other pictures"
        assert torch.equal(xf, xt), f"step {step}: other augmentation or normalisation"
    assert found_weights.keys() == trained_weights.keys()
    for key, value in found_weights.items():
        assert torch.equal(value, trained_weights[key]), f"initial {key} differs"

    # The comparison can fail: with lr-find's old drift (the default shift of 16 // 8 = 2 pixels instead of
    # --crop-pad 1), the same pictures come out otherwise augmented.
    cfg = train_config(build_parser().parse_args(["train", "--data", str(tiny_split_folder), *FLAGS]))
    assert cfg.data.crop_pad == 1 and cfg.data.augment == "flip-crop" and cfg.data.batch_size == 8
    drifted = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, crop_pad=None))
    data = load_data(cfg.data)
    same = build_run(cfg, data, device=torch.device("cpu")).train
    other = build_run(drifted, data, device=torch.device("cpu")).train
    assert all(torch.equal(x, xf) for (x, _, _), (xf, _) in zip(same.epoch(0), found, strict=False))
    pairs = list(zip(other.epoch(0), found[:6], strict=True))
    assert all(torch.equal(y, yf) for (_, y, _), (_, yf) in pairs)  # the same pictures...
    assert not any(torch.equal(x, xf) for (x, _, _), (xf, _) in pairs)  # ...shifted otherwise


def test_build_run_is_repeatable_and_honours_the_flags(tiny_split_folder):
    cfg = train_config(build_parser().parse_args(["train", "--data", str(tiny_split_folder), *FLAGS]))
    data = load_data(cfg.data)
    runs = []
    for _ in range(2):
        torch.manual_seed(cfg.run.seed)
        runs.append(build_run(cfg, data, device=torch.device("cpu")))
    a, b = runs
    assert a.transform.pad == 1 and a.transform.augment == "flip-crop"
    assert (len(a.train), a.train.batch_size, a.train.seed) == (6, 8, 4)
    assert a.train.channels_last == cfg.run.channels_last
    for (xa, ya, _), (xb, yb, _) in itertools.zip_longest(a.train.epoch(1), b.train.epoch(1)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key


def test_progressive_side_grows_to_full_size_by_three_quarters_of_the_run():
    from imgclf.transforms import progressive_side

    sides = [progressive_side(e, epochs=5, start=20, full=32) for e in range(5)]
    assert sides == [20, 24, 28, 32, 32]
    assert [progressive_side(e, epochs=8, start=16, full=32) for e in range(8)] == [16, 19, 21, 24, 27, 29, 32, 32]
    assert progressive_side(0, epochs=1, start=16, full=32) == 32  # a one-epoch run trains at full size
    assert progressive_side(0, epochs=5, start=None, full=32) == 32


def test_progressive_resize_trains_small_then_full_and_evaluates_full(tmp_path):
    write_class_folder(tmp_path / "d" / "train", ["a", "b"], 12, size=32, seed=1)
    write_class_folder(tmp_path / "d" / "test", ["a", "b"], 4, size=32, seed=2)
    args = ["train", "--data", str(tmp_path / "d"), "--model", "fastnet", "--progressive-resize", "16",
            "--epochs", "4", "--batch-size", "8", "--device", "cpu"]
    cfg = train_config(build_parser().parse_args(args))
    parts = build_run(cfg, load_data(cfg.data), device=torch.device("cpu"))
    sides = [{x.shape[-1] for x, _, _ in parts.train.epoch(e)} for e in range(4)]
    assert sides == [{16}, {21}, {27}, {32}]
    assert {x.shape[-1] for x, _, _ in parts.val.epoch(0)} == {32}
    x16, _, _ = next(iter(parts.train.epoch(0)))  # the resized batch is the full batch, averaged down
    assert x16.abs().mean() > 0.1 and torch.isfinite(x16).all()


def test_progressive_resize_refuses_a_model_that_cannot_take_the_small_side(tiny_split_folder, tmp_path, capsys):
    code = main(["train", "--data", str(tiny_split_folder), "--model", "tutorial_cnn", "--progressive-resize", "8",
                 "--epochs", "4", "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "--progressive-resize 8: tutorial_cnn cannot take 8x8 pictures" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    code = main(["train", "--data", str(tiny_split_folder), "--progressive-resize", "16", "--epochs", "2",
                 "--device", "cpu", "--out", str(tmp_path / "run2")])
    assert code == 2 and "must be smaller than the picture side (16)" in capsys.readouterr().err
