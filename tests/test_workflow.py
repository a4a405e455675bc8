"""Issue 2: the notes' workflow end to end, on synthetic folders (fast) and the real data sets (skipped if absent)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run_cli, write_class_folder
from PIL import Image

from imgclf.checkpoint import load_checkpoint
from imgclf.config import DataConfig, OptimConfig
from imgclf.loader import BatchLoader
from imgclf.metrics import confusion_matrix, per_class_accuracy
from imgclf.models import TutorialCNN, build_model
from imgclf.optim import build_optimizer, lr_factor
from imgclf.sources import load_data, read_idx, stratified_split
from imgclf.transforms import BatchTransform, augment_batch, load_image

# ---------------------------------------------------------------- 1. data

def test_folder_layouts_classes_and_hidden_entries(tmp_path):
    root = write_class_folder(tmp_path / "d" / "train", ["zebra", "ant", "Bee"], 5)
    write_class_folder(tmp_path / "d" / "val", ["zebra", "ant", "Bee"], 3)
    (root / ".ipynb_checkpoints").mkdir()
    (root / "ant" / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "ant" / "notes.txt").write_text("not a picture")
    data = load_data(DataConfig(data=str(tmp_path / "d"), cache_dir=str(tmp_path / "cache")))
    assert data.classes == ["Bee", "ant", "zebra"]  # sorted folder names, hidden ones ignored
    assert (len(data.train), len(data.val), data.val_name) == (15, 9, "val")
    assert data.skipped == []  # .DS_Store and notes.txt are not pictures, so never tried
    assert data.train.images.dtype == torch.uint8 and tuple(data.train.images.shape[1:]) == (3, 16, 16)


def test_single_folder_is_split_stratified_and_seeded(tmp_path):
    write_class_folder(tmp_path / "one", ["a", "b"], 10)
    cfg = DataConfig(data=str(tmp_path / "one"), val_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    data = load_data(cfg)
    assert len(data.val) == 6 and data.val.labels.bincount().tolist() == [3, 3]
    assert load_data(cfg).val.files == data.val.files  # the same split every time
    files, labels = list(range(20)), [0] * 10 + [1] * 10
    assert stratified_split(files, labels, fraction=0.3, seed=1) != stratified_split(files, labels, fraction=0.3,
                                                                                       seed=2)


def test_grayscale_rgba_palette_and_16bit_are_converted(tmp_path):
    rgba = Image.new("RGBA", (20, 30), (255, 0, 0, 0))  # fully transparent -> white background
    rgba.save(tmp_path / "rgba.png")
    Image.new("L", (30, 30), 128).save(tmp_path / "gray.png")
    Image.new("RGB", (30, 30), (0, 0, 255)).convert("P").save(tmp_path / "pal.gif")
    Image.fromarray(np.full((30, 30), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "rgba.png", size=16, channels=3).tolist() == np.full((16, 16, 3), 255).tolist()
    assert load_image(tmp_path / "gray.png", size=16, channels=3)[0, 0].tolist() == [128, 128, 128]
    assert load_image(tmp_path / "pal.gif", size=16, channels=3)[0, 0].tolist() == [0, 0, 255]
    assert load_image(tmp_path / "deep.png", size=16, channels=1)[0, 0, 0] == 255
    assert load_image(tmp_path / "rgba.png", size=24, channels=1).shape == (24, 24, 1)


@pytest.mark.slow
def test_idx_folder_and_builtin_mnist_without_network(tmp_path, fashion_dir):
    data = load_data(DataConfig(data=str(fashion_dir)))
    assert (len(data.train), len(data.val)) == (60000, 10000)
    assert data.classes[0] == "T-shirt/top" and data.mean == (0.2860,)
    # torchvision's MNIST finds files already in --data-root and downloads nothing
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in fashion_dir.glob("*.gz"):
        shutil.copy(f, raw / f.name)
        with gzip.open(f) as packed, open(raw / f.name.removesuffix(".gz"), "wb") as out:
            out.write(packed.read())
    mnist = load_data(DataConfig(data="mnist", data_root=str(tmp_path / "root")))
    assert mnist.train.images.shape == (60000, 1, 28, 28) and mnist.mean == (0.1307,)
    assert read_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz").shape == (10000,)


@pytest.mark.slow
def test_failed_download_is_one_line(tmp_path):
    r = run_cli("train", "--data", "cifar10", "--data-root", tmp_path / "nothing", "--out", tmp_path / "r")
    assert r.returncode == 2
    assert r.stderr.startswith("imgclf: error: could not download cifar10") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- 2. transforms

def test_batch_transform_normalises_and_augments_per_sample():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 3, 8, 8)
    t = BatchTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "none")
    x = t(images, train=True)
    torch.testing.assert_close(x, (images.float() / 255 - 0.5) / 0.25)
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(64, 1, 8, 8)
    flipped = augment_batch(ramp, "flip", pad=0, generator=torch.Generator().manual_seed(0))
    kinds = {tuple(row[0, 0].tolist()) for row in flipped}
    assert kinds == {tuple(range(8)), tuple(range(7, -1, -1))}  # each picture flipped or not, independently
    shifted = augment_batch(ramp, "flip-crop", pad=2, generator=torch.Generator().manual_seed(0))
    assert shifted.shape == ramp.shape and not torch.equal(shifted, flipped)


def test_folder_statistics_are_computed_and_cached(tmp_path):
    write_class_folder(tmp_path / "d", ["a", "b"], 6)
    cfg = DataConfig(data=str(tmp_path / "d"), cache_dir=str(tmp_path / "cache"))
    data = load_data(cfg)
    x = data.train.images.double() / 255
    assert data.mean == pytest.approx(tuple(x.mean(dim=(0, 2, 3)).tolist()), abs=1e-3)
    assert len(list((tmp_path / "cache").glob("stats-*.json"))) == 1


# ---------------------------------------------------------------- 3. models

def test_tutorial_cnn_is_the_network_of_note_21():
    model = TutorialCNN(num_classes=10)
    shapes, x = [], torch.zeros(1, 3, 32, 32)
    for layer in [*model.features, *model.classifier]:
        x = layer(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(32, 32, 32), (32, 16, 16), (32, 16, 16), (32, 8, 8), (64, 8, 8), (64, 4, 4), (1024,),
                      (64,), (10,)]
    assert TutorialCNN(num_classes=10, in_channels=1, img_size=28)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.slow
def test_torchvision_models_get_a_new_head_and_pretrained_backbone(tmp_path):
    vgg = build_model("vgg16", num_classes=10)
    assert vgg.classifier[-1].out_features == 10 and vgg.classifier[-1].in_features == 4096
    source = build_model("resnet18", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = build_model("resnet18", num_classes=2, pretrained=str(tmp_path / "weights.pth"), freeze_backbone=True)
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 2
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert build_model("resnet18", num_classes=3, in_channels=1)(torch.zeros(2, 1, 32, 32)).shape == (2, 3)


@pytest.mark.slow
def test_freeze_backbone_trains_only_the_head(tiny_split_folder, tmp_path):
    r = run_cli("train", "--data", tiny_split_folder, "--model", "resnet18", "--freeze-backbone", "--epochs", "1",
                "--batch-size", "16", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    torch.manual_seed(0)
    fresh = build_model("resnet18", num_classes=3)
    torch.testing.assert_close(ckpt["state_dict"]["conv1.weight"], fresh.conv1.weight)
    assert not torch.equal(ckpt["state_dict"]["fc.weight"], fresh.fc.weight)


# ---------------------------------------------------------------- 4. loss and optimisers

def test_schedules_warm_up_then_follow_their_shape():
    f = lambda s, kind: lr_factor(s, total_steps=100, warmup_steps=10, schedule=kind)  # noqa: E731
    assert [f(s, "constant") for s in (0, 4, 9, 50, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert f(99, "cosine") == pytest.approx(0.0, abs=1e-9) and f(55, "cosine") == pytest.approx(0.5, abs=0.02)
    assert f(99, "onecycle") == pytest.approx(0.0, abs=1e-9) and f(54, "onecycle") == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_skip_decay_on_biases(name):
    opt = build_optimizer(TutorialCNN(), OptimConfig(optimizer=name, weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert type(opt).__name__.lower() == name


# ---------------------------------------------------------------- 5-8. the routine, checkpoints, eval, predict

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wf")
    classes = ["circle", "square", "triangle"]
    write_class_folder(tmp / "data" / "train", classes, 30, seed=1)
    write_class_folder(tmp / "data" / "test", classes, 10, seed=2)
    run = tmp / "run"
    # --lr given: at batch 16 the rate would otherwise follow the batch (0.05 x 16/128), too slow for 3 epochs
    r = run_cli("train", "--data", tmp / "data", "--epochs", "3", "--batch-size", "16", "--lr", "0.05",
                "--log-every", "2", "--out", run, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return tmp / "data", run, r


@pytest.mark.slow
def test_run_folder_holds_metrics_tensorboard_and_checkpoints(trained_run):
    data, run, result = trained_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["val_acc"] >= 0.9 and records[-1]["val_count"] == 30
    assert "epoch 3/3" in result.stderr and "val loss" in result.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "val/loss", "val/acc"} <= set(tags["scalars"])
    assert len(events.Scalars("train/loss")) >= 8  # every 2 of 18 steps
    assert "train/batch" in tags["images"] and tags["graph"]
    assert json.loads((run / "config.json").read_text())["optim"]["epochs"] == 3


@pytest.mark.slow
def test_checkpoint_is_self_describing_and_safe(trained_run):
    _, run, _ = trained_run
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["classes"] == ["circle", "square", "triangle"]
    assert ckpt["model"]["name"] == "tutorial_cnn" and ckpt["input"]["size"] == 16
    assert len(ckpt["input"]["mean"]) == 3 and ckpt["config"]["data"]["batch_size"] == 16
    assert {"optimizer", "scheduler", "rng", "metrics", "epoch", "imgclf_version"} <= ckpt.keys()


@pytest.mark.slow
def test_eval_agrees_with_metrics_and_prints_table_and_json(trained_run):
    data, run, _ = trained_run
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    r = run_cli("eval", run / "checkpoints" / "last.pt", "--data", data, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["accuracy"] == pytest.approx(last["val_acc"]) and out["loss"] == pytest.approx(last["val_loss"])
    assert np.array(out["confusion"]).sum() == 30 and set(out["per_class_accuracy"]) == {"circle", "square",
                                                                                         "triangle"}
    table = run_cli("eval", run / "checkpoints" / "last.pt", "--data", data).stdout
    assert "confusion matrix" in table and "triangle" in table and f"{last['val_acc']:.2%}" in table


@pytest.mark.slow
def test_predict_table_json_csv_and_bad_files(trained_run, tmp_path):
    data, run, _ = trained_run
    ckpt = run / "checkpoints" / "best.pt"
    folder = data / "test" / "square"
    table = run_cli("predict", ckpt, folder, "--topk", "2")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert len(lines) == 10 and all(line.split()[1] == "square" for line in lines)
    js = [json.loads(line) for line in run_cli("predict", ckpt, folder / "0000.png", "--json").stdout.splitlines()]
    assert js[0]["top"][0]["label"] == "square" and sum(t["probability"] for t in js[0]["top"]) <= 1.0 + 1e-6
    rows = list(csv.DictReader(io.StringIO(run_cli("predict", ckpt, folder / "0001.png", "--csv").stdout)))
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and rows[0]["label"] == "square"
    (tmp_path / "broken.jpg").write_bytes(b"this is not a jpeg")
    mixed = run_cli("predict", ckpt, tmp_path / "broken.jpg", folder / "0002.png", tmp_path / "missing.png")
    assert mixed.returncode == 1
    assert "square" in mixed.stdout and len(mixed.stdout.splitlines()) == 1
    errors = mixed.stderr.strip().splitlines()
    assert len(errors) == 2 and "broken.jpg" in errors[0] and "missing.png" in errors[1]


@pytest.mark.slow
def test_seeded_cpu_runs_repeat_and_notes_recipe_is_reachable(tiny_split_folder, tmp_path):
    args = ["train", "--data", tiny_split_folder, "--recipe", "notes", "--epochs", "1", "--seed", "3"]
    for name in ("a", "b"):
        assert run_cli(*args, "--out", tmp_path / name).returncode == 0
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    optim = a["config"]["optim"]
    assert (optim["lr"], optim["momentum"], optim["optimizer"], a["config"]["data"]["batch_size"],
            a["config"]["data"]["augment"]) == (0.01, 0.0, "sgd", 64, "none")


@pytest.mark.slow
def test_device_flag_is_checked(tiny_split_folder, tmp_path):
    r = run_cli("train", "--data", tiny_split_folder, "--device", "cuda", "--out", tmp_path / "r")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr


def test_metrics_pure_functions():
    cm = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert per_class_accuracy(cm) == [1.0, 1.0, 0.5]


def test_loader_drops_a_last_single_picture_batch_and_covers_each_sample():
    from imgclf.cache import Split

    split = Split(torch.zeros(17, 1, 4, 4, dtype=torch.uint8), torch.arange(17))
    t = BatchTransform((0.0,), (1.0,))
    train = BatchLoader(split, batch_size=8, transform=t, train=True, device=torch.device("cpu"))
    assert [len(y) for _, y, _ in train.epoch(0)] == [8, 8]
    test = BatchLoader(split, batch_size=8, transform=t, train=False, device=torch.device("cpu"))
    assert sorted(torch.cat([y for _, y, _ in test.epoch(0)]).tolist()) == list(range(17))


# ---------------------------------------------------------------- real data (slow, skipped without ../shared/data)

@pytest.mark.slow
def test_fashion_mnist_idx_reaches_90_percent_in_3_epochs(fashion_dir, tmp_path):
    # Centred garments gain nothing from shifted crops in a 3-epoch run: flips only, a short warm-up
    # (measured: 90.18% after epoch 3; the default flip-crop with 1 warm-up epoch gives 88.0%).
    r = run_cli("train", "--data", fashion_dir, "--epochs", "3", "--augment", "flip", "--warmup-epochs", "0.3",
                "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["val_acc"] for r in records) >= 0.90, records


@pytest.mark.slow
def test_resnet18_on_ants_and_bees_at_224_then_predict_and_eval(hymenoptera_dir, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--data", hymenoptera_dir, "--model", "resnet18", "--img-size", "224", "--epochs", "1",
                "--batch-size", "32", "--out", run)
    assert r.returncode == 0, r.stderr
    assert "imageNotFound.gif" not in r.stderr  # a palette GIF is still a picture: converted, not skipped
    pred = run_cli("predict", run / "checkpoints" / "last.pt", hymenoptera_dir / "val", "--topk", "1")
    assert pred.returncode == 0, pred.stderr
    lines = pred.stdout.splitlines()
    assert len(lines) == 153
    assert all(line.split()[-2] in ("ants", "bees") and line.endswith("%") for line in lines)
    ev = json.loads(run_cli("eval", run / "checkpoints" / "last.pt", "--data", hymenoptera_dir, "--json").stdout)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert ev["count"] == 153 and ev["accuracy"] == pytest.approx(last["val_acc"])


@pytest.mark.slow
def test_notes_recipe_learns_on_cifar10_subset(cifar10_dir, tmp_path):
    """The notes' exact recipe on 5,000 real CIFAR-10 pictures: test accuracy rises from epoch 1 to 3."""
    for split, per_class in (("train", 400), ("test", 100)):
        for cls in sorted(p.name for p in (cifar10_dir / split).iterdir()):
            dest = tmp_path / "c10" / split / cls
            dest.mkdir(parents=True)
            for f in sorted((cifar10_dir / split / cls).iterdir())[:per_class]:
                (dest / f.name).symlink_to(f)
    r = run_cli("train", "--data", tmp_path / "c10", "--recipe", "notes", "--epochs", "3", "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    acc = [json.loads(line)["val_acc"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert acc[2] > acc[0] and acc[2] > 0.2, acc
