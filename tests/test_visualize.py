"""Pictures: `show`, `features`, the run report written after training, `lr-find` and `env`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_class_folder
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from imgclf.cache import Split
from imgclf.cli import main
from imgclf.lrfind import RangeTest, lr_at, range_test, suggestions
from imgclf.report import confident_mistakes, flatten_config, mistakes_figure
from imgclf.visualize import (
    confusion_figure,
    curves_figure,
    feature_maps,
    image_grid,
    pick_samples,
    save_png,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process trainings: one intra-op thread (conftest)

CLASSES = ["circle", "square", "triangle"]


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def tags(run: Path) -> dict:
    acc = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc.Tags()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vis") / "shapes"
    write_class_folder(root / "train", CLASSES, 16, seed=1)
    write_class_folder(root / "test", CLASSES, 8, seed=2)
    return root


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("vis") / "run"
    assert main(["train", "--data", str(data_dir), "--epochs", "2", "--batch-size", "16", "--out", str(run)]) == 0
    return run


# ---------------------------------------------------------------- grids and figures

def test_image_grid_png_has_one_tile_per_picture(tmp_path):
    images = [np.full((3, 20, 20), v, dtype=np.uint8) for v in (0, 128, 255)] + [np.zeros((1, 20, 20), np.uint8)]
    fig = image_grid(images, ["a", "b", "c", "gray"], ncols=2, title="four pictures")
    w, h = png_size(save_png(fig, tmp_path / "g.png"))
    assert w == pytest.approx(2 * 1.25 * 100 + 10, abs=3) and h > w  # two tiles a row, two rows plus labels


def test_pick_samples_per_class_and_random():
    labels = torch.tensor([0, 1, 2] * 10)
    picks = pick_samples(labels, num_classes=3, per_class=4, random=None, seed=0)
    assert [int(labels[i]) for i in picks] == [0] * 4 + [1] * 4 + [2] * 4
    assert len(set(picks)) == 12
    assert pick_samples(labels, num_classes=3, per_class=4, random=None, seed=1) != picks
    assert len(set(pick_samples(labels, num_classes=3, per_class=None, random=7, seed=0))) == 7


@pytest.mark.slow  # over a second (a training or a real process): the fast tier stays under a minute
def test_curves_and_confusion_figures_render(tmp_path):
    records = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e, "train_acc": 0.3 * e, "val_acc": 0.25 * e}
               for e in (1, 2, 3)]
    assert png_size(save_png(curves_figure(records), tmp_path / "c.png"))[0] == 1000
    cm = torch.tensor([[5, 1, 0], [0, 6, 0], [2, 0, 4]])
    small = confusion_figure(cm, CLASSES)
    assert png_size(save_png(small, tmp_path / "m.png"))[0] > 400
    assert png_size(tmp_path / "m.png") == (550, 450)  # 4.5 + 1 by 4.5 inches at 100 dpi
    assert [t.get_text() for t in small.axes[0].texts] == [str(v) for v in cm.flatten().tolist()]  # every cell
    many = torch.eye(100, dtype=torch.int64) * 10  # CIFAR-100: no numbers in cells, still drawn
    big = confusion_figure(many, [f"class{i}" for i in range(100)])
    assert png_size(save_png(big, tmp_path / "big.png")) == (2100, 2000)  # the largest size, 21 by 20 inches
    assert len(big.axes[0].texts) == 0 and "100.0% of 1000 right" in big.axes[0].get_title()


def test_confident_mistakes_come_most_confident_first():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.05, 0.95], [0.7, 0.3]])
    labels = torch.tensor([0, 0, 0, 0, 1])
    assert confident_mistakes(probs, labels, count=10) == [3, 1, 4, 2]  # 0.95, 0.8, 0.7, 0.6
    assert confident_mistakes(probs, labels, count=2) == [3, 1]
    split = Split(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), labels)
    fig = mistakes_figure(probs, split, ["a", "b"])
    assert fig.get_size_inches()[0] == pytest.approx(4 * 1.5 + 0.1)  # one row of four 1.5-inch tiles
    assert [t.get_text() for t in fig.axes[0].texts] == [  # the four mistakes, most confident first
        "true: a\npred: b 95%", "true: a\npred: b 80%", "true: b\npred: a 70%", "true: a\npred: b 60%"]
    assert fig._suptitle.get_text() == "most confident mistakes: 4 of 4 wrong out of 5"
    right = mistakes_figure(probs[[0]], Split(split.images[:1], labels[:1]), ["a", "b"])
    assert [t.get_text() for t in right.texts] == ["no mistakes: all 1 test pictures were classified right"]


def test_flatten_config():
    assert flatten_config({"optim": {"lr": 0.1, "nesterov": True}, "model": {"pretrained": None}}) == {
        "optim.lr": 0.1, "optim.nesterov": True, "model.pretrained": None}


# ---------------------------------------------------------------- imgclf show

def test_show_prints_counts_and_writes_a_grid(data_dir, tmp_path, capsys):
    out = tmp_path / "samples.png"
    assert main(["show", str(data_dir), "--per-class", "3", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["class", "train", "test"]
    assert lines[1].split() == ["circle", "16", "8"] and lines[4].split() == ["total", "48", "24"]
    w, h = png_size(out)
    assert w > 3 * 125 and h > 3 * 125  # three pictures a row, one row a class

    assert main(["show", str(data_dir), "--random", "5", "--split", "test", "--out", str(tmp_path / "r.png")]) == 0
    assert png_size(tmp_path / "r.png")[0] == pytest.approx(5 * 125 + 10, abs=3)

    assert main(["show", str(data_dir), "--per-class", "0"]) == 2
    assert "--per-class must be 1..1000" in capsys.readouterr().err


# ---------------------------------------------------------------- after training: the run report

def test_training_writes_curves_confusion_mistakes_and_tensorboard_report(trained_run):
    for name in ("curves", "confusion", "mistakes"):
        w, h = png_size(trained_run / f"{name}.png")
        assert w > 300 and h > 100
    assert png_size(trained_run / "curves.png") == (1000, 400)  # 10 by 4 inches at 100 dpi
    assert png_size(trained_run / "confusion.png") == (550, 450)  # three classes: the smallest matrix
    t = tags(trained_run)
    assert {"report/curves", "report/confusion", "report/mistakes", "report/per_class"} <= set(t["images"])
    assert {f"test_class/{c}" for c in CLASSES} <= set(t["scalars"])
    acc = EventAccumulator(str(trained_run), size_guidance={"scalars": 0})
    acc.Reload()
    per_class = [acc.Scalars(f"test_class/{c}")[-1].value for c in CLASSES]
    last = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert sum(per_class) / 3 == pytest.approx(last["val_acc"], abs=1e-6)  # balanced test split
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(acc.PluginTagToContent("hparams"))


def test_a_failing_report_warns_in_one_line_and_keeps_the_run(data_dir, tmp_path, monkeypatch, capsys):
    import imgclf.report

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts\nsecond line")

    monkeypatch.setattr(imgclf.report, "write_run_report", broken)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data_dir), "--epochs", "1", "--batch-size", "16", "--out", str(run)]) == 0
    err = capsys.readouterr().err
    assert "imgclf: warning: no run pictures (RuntimeError: no fonts)" in err and "second line" not in err
    assert (run / "checkpoints" / "best.pt").is_file() and not (run / "curves.png").exists()


# ---------------------------------------------------------------- imgclf features

def test_feature_maps_are_taken_before_an_inplace_relu_changes_them():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2))
    maps, logits = feature_maps(model, torch.randn(1, 1, 10, 10))
    assert [(name, kind, list(t.shape)) for name, kind, t in maps] == [
        ("0", "Conv2d", [4, 8, 8]), ("1", "ReLU", [4, 8, 8]), ("2", "MaxPool2d", [4, 4, 4])]
    assert maps[0][2].min() < 0 and maps[1][2].min() >= 0
    assert torch.equal(maps[1][2], maps[0][2].clamp_min(0))


@pytest.mark.slow  # over a second (a training or a real process): the fast tier stays under a minute
def test_features_writes_a_png_per_layer_and_tensorboard_images(trained_run, data_dir, tmp_path, capsys):
    out = tmp_path / "maps"
    picture = data_dir / "test" / "square" / "0001.png"
    assert main(["features", str(trained_run / "checkpoints" / "best.pt"), str(picture), "--out", str(out),
                 "--max-channels", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("0001.png: predicted ")
    assert [line.split()[1:] for line in lines[1:]] == [
        ["features.0", "Conv2d", "32x16x16"], ["features.1", "MaxPool2d", "32x8x8"],
        ["features.2", "Conv2d", "32x8x8"], ["features.3", "MaxPool2d", "32x4x4"],
        ["features.4", "Conv2d", "64x4x4"], ["features.5", "MaxPool2d", "64x2x2"]]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs[:2] == ["00_input.png", "01_features_0_Conv2d.png"] and len(pngs) == 7
    assert len(tags(out)["images"]) == 7

    assert main(["features", str(trained_run / "checkpoints" / "best.pt"), str(tmp_path / "nope.png")]) == 2
    assert "no such picture" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    assert main(["features", str(trained_run / "checkpoints" / "best.pt"), str(tmp_path / "bad.png")]) == 2
    assert "is not a readable picture" in capsys.readouterr().err


@pytest.mark.slow
def test_features_of_an_untrained_model_given_by_name(data_dir, tmp_path, capsys):
    picture = data_dir / "test" / "circle" / "0000.png"
    out = tmp_path / "untrained"
    assert main(["features", "tutorial_cnn", str(picture), "--input-size", "3x16x16", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "0000.png: random weights (seed 0), no prediction"
    assert lines[1].split()[1:] == ["features.0", "Conv2d", "32x16x16"] and len(lines) == 7
    assert len(list(out.glob("*.png"))) == 7
    assert main(["features", "tutorial_cnn", str(picture), "--input-size", "3x16x8"]) == 2
    assert "--input-size must be square" in capsys.readouterr().err


# ---------------------------------------------------------------- imgclf lr-find

def test_lr_sweep_is_exponential():
    assert lr_at(0, start_lr=1e-6, end_lr=1.0, num_steps=7) == pytest.approx(1e-6)
    assert lr_at(3, start_lr=1e-6, end_lr=1.0, num_steps=7) == pytest.approx(1e-3)
    assert lr_at(6, start_lr=1e-6, end_lr=1.0, num_steps=7) == pytest.approx(1.0)


def test_suggestions_on_a_textbook_curve():
    lrs = [10 ** (-6 + 6 * i / 99) for i in range(100)]
    # flat until 1e-4, falling until 1e-2, rising after
    losses = [2.0 if lr < 1e-4 else 2.0 - 0.5 * math.log10(lr / 1e-4) if lr < 1e-2 else 1.0 + 3 * math.log10(lr / 1e-2)
              for lr in lrs]
    s = suggestions(lrs, losses)
    assert 1e-4 < s["valley"] < 1e-2 and s["valley"] == pytest.approx(1e-3, rel=0.5)
    assert 1e-4 <= s["steep"] < 1e-2
    assert s["minimum"] == pytest.approx(1e-3, rel=0.1)


def test_range_test_stops_when_the_loss_diverges():
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    model = torch.nn.Linear(4, 3)
    batches = iter([(x, y, 64)] * 500)
    result = range_test(model, batches, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                        loss_fn=torch.nn.CrossEntropyLoss(), start_lr=1e-4, end_lr=1e4, num_steps=200,
                        autocast=lambda: torch.autocast("cpu", enabled=False))
    assert isinstance(result, RangeTest) and result.diverged
    assert len(result.lrs) < 200 and result.lrs == sorted(result.lrs)
    assert result.losses[-1] > 4 * min(result.losses) or not math.isfinite(result.raw[-1])


@pytest.mark.slow
def test_lr_find_command_writes_a_plot_and_suggests(data_dir, tmp_path, capsys):
    out = tmp_path / "lr.png"
    assert main(["lr-find", "--data", str(data_dir), "--batch-size", "16", "--steps", "40", "--end-lr", "100",
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("suggested learning rate: ") and lines[0].endswith("(valley)")
    assert 1e-7 <= float(lines[0].split()[3]) <= 100
    assert png_size(out) == (700, 450)
    assert main(["lr-find", "--data", str(data_dir), "--start-lr", "1", "--end-lr", "0.1"]) == 2
    assert "need 0 < --start-lr < --end-lr" in capsys.readouterr().err


# ---------------------------------------------------------------- imgclf env

def test_env_prints_versions_and_devices(capsys):
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert f"torch        {torch.__version__.split('+')[0]}" in text
    for word in ("python", "torchvision", "pillow", "tensorboard", "devices:", "cpu", "mps", "bf16"):
        assert word in text
    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["cpu"]["torch_threads"] == torch.get_num_threads()
    assert len(env["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
