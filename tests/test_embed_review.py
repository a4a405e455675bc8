"""Embeddings, similar pictures, duplicates and leaks, and the label-error review (issue 25, points 2-3):
the pure functions on made-up numbers, the commands on real CIFAR-10 pictures with planted copies and
planted wrong labels."""

from __future__ import annotations

import csv
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from imgclf.duplicates import find_pairs
from imgclf.embed import nearest, unit_rows
from imgclf.review import class_thresholds, confident_class, label_issues, stratified_folds

# ---------------------------------------------------------------- pure functions


def test_class_thresholds_are_the_mean_self_confidence_of_each_given_class():
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    labels = np.array([0, 0, 1])
    assert class_thresholds(probs, labels) == pytest.approx([0.8, 0.8])
    assert class_thresholds(probs[:2], labels[:2])[1] == 1.0  # nobody labelled 1: no picture is confidently 1


def test_confident_class_is_the_most_probable_class_over_its_threshold_else_none():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6], [0.35, 0.2, 0.45]])
    assert confident_class(probs, np.array([0.4, 0.25, 0.9])).tolist() == [0, 1, -1]


def test_label_issues_flag_a_picture_confidently_of_another_class_and_rank_it_first():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    probs = np.full((60, 3), 0.05)
    probs[np.arange(60), labels] = rng.uniform(0.8, 0.9, 60)
    probs[7] = [0.02, 0.96, 0.02]  # labelled 0, looks like 1
    probs[45] = [0.5, 0.05, 0.45]  # labelled 2, a little more like 0
    probs /= probs.sum(1, keepdims=True)
    issues = label_issues(probs, labels)
    assert issues.flagged.sum() == 1 and issues.flagged[7] and issues.suggested[7] == 1
    assert issues.order[:2].tolist() == [7, 45]  # flagged first, then the lowest given-label probability
    assert issues.score[7] == pytest.approx(probs[7, 0])


def test_stratified_folds_deal_each_class_evenly():
    labels = np.repeat([0, 1], [9, 6])
    fold = stratified_folds(labels, 3, seed=1)
    for c in (0, 1):
        assert np.bincount(fold[labels == c], minlength=3).tolist() == [int((labels == c).sum()) // 3] * 3


def test_find_pairs_finds_exact_files_and_near_vectors_worst_first():
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
    hashes = ["a", "b", "c", "b", "e"]
    pairs = find_pairs(vectors, hashes, threshold=0.99)
    assert [(p.a, p.b, p.exact) for p in pairs] == [(1, 3, True), (0, 2, False)]
    assert pairs[1].similarity == pytest.approx(0.99 / np.hypot(0.99, 0.1))
    assert find_pairs(vectors, hashes, threshold=0.99, wanted=lambda a, b: a == 0) == pairs[1:]
    assert find_pairs(vectors, hashes, threshold=1.5) == pairs[:1]  # exact pairs whatever the threshold


def test_nearest_is_by_cosine_not_length():
    vectors = np.array([[10.0, 0.0], [1.0, 1.0], [0.1, 0.0]], dtype=np.float32)
    rows, sims = nearest(vectors, np.array([1.0, 0.0]), 2)
    assert sorted(rows.tolist()) == [0, 2] and sims == pytest.approx([1.0, 1.0])
    assert np.linalg.norm(unit_rows(np.zeros((1, 3))), axis=1).tolist() == [0.0]


def test_the_runs_own_data_is_read_with_its_recorded_split_options(tmp_path):
    from types import SimpleNamespace

    from imgclf.embed import data_config

    net = SimpleNamespace(recorded={"data": str(tmp_path / "pics"), "val_fraction": 0.1, "labels": "l.csv",
                                    "data_root": "d", "augment": "photo"})
    cfg = data_config(net, str(tmp_path / "pics" / ".." / "pics"), val_fraction=None, labels=None, cache_dir="c")
    assert (cfg.val_fraction, cfg.labels, cfg.data_root, cfg.cache_dir, cfg.augment) == (0.1, "l.csv", "d", "c", "auto")
    assert data_config(net, str(tmp_path / "pics"), val_fraction=0.3).val_fraction == 0.3  # given: it wins
    other = data_config(net, str(tmp_path / "other"), val_fraction=None, labels=None)
    assert (other.val_fraction, other.labels, other.data_root) == (0.2, None, "data")  # another data set: defaults


# ---------------------------------------------------------------- the commands on small synthetic folders


@pytest.fixture
def untrained(tiny_split_folder, tmp_path) -> dict:
    """An untrained TutorialCNN checkpoint for tiny_split_folder's 16x16 pictures of three classes, with an
    exact copy of a training picture planted in the test split."""
    import torch

    from imgclf.checkpoint import build_checkpoint, save_checkpoint
    from imgclf.config import TrainConfig
    from imgclf.models import TutorialCNN

    torch.manual_seed(0)
    model = TutorialCNN(num_classes=3, in_channels=3, img_size=16)
    ckpt = build_checkpoint(model_name="tutorial_cnn", classes=["circle", "square", "triangle"], channels=3,
                            size=16, mean=[0.5] * 3, std=[0.25] * 3, config=TrainConfig().to_dict(),
                            state={"state_dict": model.state_dict()})
    save_checkpoint(tmp_path / "tiny.pt", ckpt)
    shutil.copyfile(tiny_split_folder / "train" / "square" / "0003.png", tiny_split_folder / "test" / "square" / "x.png")
    return {"ckpt": tmp_path / "tiny.pt", "data": tiny_split_folder, "ckpt_dict": ckpt}


@pytest.mark.slow
def test_embed_duplicates_and_review_run_in_process(untrained, tmp_path, capsys):
    from imgclf.cli import main

    data, ckpt = untrained["data"], untrained["ckpt"]
    assert main(["embed", str(ckpt), str(data), "--out", str(tmp_path / "e.npy"), "--device", "cpu"]) == 0
    vectors = np.load(tmp_path / "e.npy")
    rows = list(csv.DictReader((tmp_path / "e.csv").open()))
    assert vectors.shape == (48 + 25, 64) and vectors.dtype == np.float32 and len(rows) == 73
    assert [r["split"] for r in rows].count("test") == 25
    assert main(["duplicates", str(ckpt), str(data), "--out", str(tmp_path / "d"), "--device", "cpu",
                 "--threshold", "1"]) == 0
    out = capsys.readouterr().out
    assert "leak train/test: 1 exact, 0 near" in out and "within train" not in out
    assert main(["review", str(ckpt), str(data), "--out", str(tmp_path / "r"), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("likely mislabels (confident learning, checkpoint probabilities)") and "in sample" in err
    assert (tmp_path / "r" / "mislabels.csv").read_text().startswith("path,split,given,suggested,score")
    folds = ["review", str(ckpt), str(data), "--out", str(tmp_path / "f"), "--folds", "2", "--epochs", "1"]
    assert main(folds) == 0
    out, err = capsys.readouterr()
    assert "cross-fitted probabilities): " in out and "(of 48 train)" not in out
    assert sorted(p.name for p in (tmp_path / "f" / "folds").iterdir()) == ["fold-0", "fold-1"]
    assert main(folds) == 2
    assert "holds the fold models of an earlier review" in capsys.readouterr().err


@pytest.mark.slow
def test_embedding_commands_refuse_other_classes_exported_models_and_multilabel(untrained, tmp_path, capsys):
    from imgclf.checkpoint import save_checkpoint
    from imgclf.cli import main

    other = tmp_path / "other"
    shutil.copytree(untrained["data"], other)
    (other / "train" / "circle").rename(other / "train" / "disc")
    (other / "test" / "circle").rename(other / "test" / "disc")
    assert main(["embed", str(untrained["ckpt"]), str(other), "--out", str(tmp_path / "e"), "--device", "cpu"]) == 2
    assert "was trained for the classes circle, square, triangle" in capsys.readouterr().err
    (tmp_path / "m.onnx").write_bytes(b"not really")
    assert main(["similar", str(tmp_path / "m.onnx"), "q.png", str(other)]) == 2
    assert "is an exported model; embeddings are read inside the network" in capsys.readouterr().err
    save_checkpoint(tmp_path / "multi.pt", {**untrained["ckpt_dict"], "task": "multilabel"})
    assert main(["review", str(tmp_path / "multi.pt"), str(other), "--out", str(tmp_path / "r")]) == 2
    assert "multi-label" in capsys.readouterr().err


def test_a_head_reading_a_feature_map_gives_its_average():
    import torch
    from torch import nn

    from imgclf.embed import Network, run_network
    from imgclf.runtime import autocast_factory, resolve_precision
    from imgclf.tasks import make_task
    from imgclf.transforms import BatchTransform

    head = nn.Conv2d(4, 2, 1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), head, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    device = torch.device("cpu")
    net = Network(model, head, BatchTransform((0.0,) * 3, (1.0,) * 3), 8, 3, ["a", "b"],
                  make_task("single-label", ["a", "b"]), device, autocast_factory(device, resolve_precision("fp32", device)), "test")
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    vectors, probs = run_network(net, images)
    with torch.no_grad():
        maps = model[0](torch.as_tensor(images).float() / 255)
    assert vectors.shape == (5, 4) and probs.shape == (5, 2)
    assert np.allclose(vectors, maps.mean((2, 3)).numpy(), atol=1e-5)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)


# ---------------------------------------------------------------- real pictures (CIFAR-10)

pytestmark = pytest.mark.usefixtures("one_thread")


def cifar_subset(cifar10_dir: Path, dest: Path, classes: tuple[str, ...], train: int, test: int) -> Path:
    """train/ and test/ folders of the first `train` and `test` CIFAR-10 pictures of each of `classes`, copied
    (the tests change them)."""
    for split, count in (("train", train), ("test", test)):
        for cls in classes:
            (dest / split / cls).mkdir(parents=True)
            for f in sorted((cifar10_dir / split / cls).iterdir())[:count]:
                shutil.copyfile(f, dest / split / cls / f.name)
    return dest


@pytest.fixture(scope="module")
def planted(cifar10_dir, tmp_path_factory):
    """A CIFAR-10 subset whose test split holds an exact copy of one training picture and a resized (64x64
    PNG) copy of another, and a small network trained on it."""
    from imgclf import fit

    root = cifar_subset(cifar10_dir, tmp_path_factory.mktemp("planted") / "data", ("airplane", "frog", "truck"),
                        150, 40)
    copy, resized = root / "train" / "frog" / "0011.jpg", root / "train" / "truck" / "0023.jpg"
    shutil.copyfile(copy, root / "test" / "frog" / "copy.jpg")
    with Image.open(resized) as im:
        im.resize((64, 64), Image.BICUBIC).save(root / "test" / "truck" / "resized.png")
    run = fit("tutorial_cnn", str(root), epochs=4, out=str(root.parent / "run"), precision="fp32")
    return {"data": root, "ckpt": run.best, "copy": copy, "resized": resized}


@pytest.mark.slow
def test_embed_writes_one_vector_per_picture_in_the_csvs_order(planted, tmp_path):
    r = run_cli("embed", planted["ckpt"], planted["data"], "--out", tmp_path / "emb")
    assert r.returncode == 0, r.stderr
    vectors = np.load(tmp_path / "emb.npy")
    rows = list(csv.DictReader((tmp_path / "emb.csv").open()))
    assert vectors.shape == (3 * 150 + 3 * 40 + 2, 64) and len(rows) == len(vectors)  # tutorial_cnn's fc1 is 64 wide
    assert rows[0] == {"path": str(planted["data"] / "train" / "airplane" / "0000.jpg"), "split": "train",
                       "label": "airplane"}
    by_path = {row["path"]: i for i, row in enumerate(rows)}
    copy = by_path[str(planted["data"] / "test" / "frog" / "copy.jpg")]
    assert rows[copy]["split"] == "test" and np.allclose(vectors[copy], vectors[by_path[str(planted["copy"])]])


@pytest.mark.slow
@pytest.mark.parametrize("query, original", [("frog/copy.jpg", "copy"), ("truck/resized.png", "resized")])
def test_similar_finds_the_training_original_of_a_planted_test_copy(planted, query, original):
    r = run_cli("similar", planted["ckpt"], planted["data"] / "test" / query, planted["data"], "-k", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["rank", "cosine", "split", "label", "path"]
    found = [line.split()[-1] for line in lines[1:3]]  # the query itself (it is in DATA) and its original
    assert set(found) == {str(planted["data"] / "test" / query), str(planted[original])}, r.stdout


@pytest.mark.slow
def test_duplicates_reports_the_planted_exact_copy_and_resized_copy_first_as_leaks(planted, tmp_path):
    r = run_cli("duplicates", planted["ckpt"], planted["data"], "--out", tmp_path / "dup", "--threshold", "0.99")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((tmp_path / "dup" / "duplicates.csv").open()))
    first = rows[0]
    assert first["exact"] == "1" and first["kind"] == "leak train/test"
    assert {first["path_a"], first["path_b"]} == {str(planted["copy"]), str(planted["data"] / "test/frog/copy.jpg")}
    # the resized copy is near the top, not always second: this small network also finds two real CIFAR-10
    # airplanes (train 0115, test 0034: different pictures) about as close
    resized = {str(planted["resized"]), str(planted["data"] / "test/truck/resized.png")}
    near = [row for row in rows[1:6] if {row["path_a"], row["path_b"]} == resized]
    assert near and near[0]["exact"] == "0" and near[0]["kind"] == "leak train/test", rows[:6]
    assert float(near[0]["similarity"]) > 0.99
    assert "leak train/test: 1 exact" in r.stdout
    with Image.open(tmp_path / "dup" / "duplicates.png") as png:
        assert png.width > 500


@pytest.fixture(scope="module")
def flipped(cifar10_dir, tmp_path_factory):
    """A two-class CIFAR-10 subset (300 training pictures a class) with 5% of its training labels flipped
    (the picture moved to the other class's folder, renamed flip-*), and a run trained on it. (Three classes
    of 200 pictures gave models of about 70% accuracy, whose review put 10 to 18 of the 30 flipped pictures
    in the top tenth, depending on which were flipped.)"""
    from imgclf import fit

    classes = ("airplane", "frog")
    root = cifar_subset(cifar10_dir, tmp_path_factory.mktemp("flipped") / "data", classes, 300, 50)
    rng = random.Random(0)
    files = sorted((root / "train").glob("*/*.jpg"))
    moved = []
    for f in rng.sample(files, len(files) // 20):
        other = rng.choice([c for c in classes if c != f.parent.name])
        moved.append(f.rename(root / "train" / other / f"flip-{f.parent.name}-{f.name}"))
    run = fit("tutorial_cnn", str(root), epochs=5, out=str(root.parent / "run"), precision="fp32")
    return {"data": root, "run": Path(run.folder), "moved": {str(p) for p in moved}}


@pytest.mark.slow
def test_cross_fitted_review_ranks_the_flipped_labels_near_the_top(flipped, tmp_path):
    from imgclf.api import load
    from imgclf.config import DataConfig
    from imgclf.embed import open_network
    from imgclf.review import review_folds

    run = load(flipped["run"])
    review = review_folds(open_network(run.best, device="cpu"), run.config, DataConfig(data=str(flipped["data"])),
                          folds=3, work=tmp_path / "folds")
    top = review.issues.order[: len(review.issues.order) // 10]
    caught = sum(review.emb.paths[i] in flipped["moved"] for i in top)
    assert len(flipped["moved"]) == 30 and caught >= 15, caught


@pytest.mark.slow
def test_review_cli_writes_the_csv_and_grid_and_says_its_mode(flipped, tmp_path):
    r = run_cli("review", flipped["run"], flipped["data"], "--out", tmp_path / "rev")
    assert r.returncode == 0, r.stderr
    assert "in sample" in r.stderr and "likely mislabels (confident learning, checkpoint probabilities)" in r.stdout
    rows = list(csv.DictReader((tmp_path / "rev" / "mislabels.csv").open()))
    assert list(rows[0]) == ["path", "split", "given", "suggested", "score", "suggested_probability", "sample"]
    scores = [float(row["score"]) for row in rows]
    assert scores == sorted(scores) and all(row["given"] != row["suggested"] for row in rows)
    assert sum(row["path"] in flipped["moved"] for row in rows) >= 10
    assert (tmp_path / "rev" / "mislabels.png").is_file()
