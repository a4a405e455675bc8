"""k-fold cross-validation (issue 23, point 3): the pure cut (imgclf.folds), the folds of a folder, built-in
and multi-label data, `imgclf train --folds K` end to end with its table, folds.json, `imgclf runs` and
resuming fold by fold (imgclf.crossval), and five folds of the real ants and bees."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace

import pytest
from conftest import run_cli, write_class_folder

from imgclf.cli import main
from imgclf.config import DataConfig
from imgclf.errors import UserError
from imgclf.folds import fold_indices, fold_lists, fold_parts

# ---------------------------------------------------------------- fold_indices: the contract

def label_lists():
    rng = random.Random(7)
    yield [0] * 10 + [1] * 3 + [2] * 7
    yield [1, 0] * 25
    yield [3] * 5
    yield [(0, 1), (1, 1), (0, 0), (1, 0)] * 6 + [(1, 1)] * 3
    for n in (1, 2, 5, 17, 100, 503):
        yield [rng.randrange(4) for _ in range(n)]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 20])
@pytest.mark.parametrize("labels", list(label_lists()), ids=lambda labels: f"n{len(labels)}")
def test_fold_indices_disjoint_covering_stratified(labels, k):
    parts = fold_indices(labels, k, seed=3)
    assert len(parts) == k
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(len(labels)))  # every index once: disjoint and covering
    assert all(part == sorted(part) for part in parts)
    for label in set(labels):  # each label spread within one over the parts
        counts = [sum(labels[i] == label for i in part) for part in parts]
        assert max(counts) - min(counts) <= 1, (label, counts)
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


def test_fold_indices_is_deterministic_by_seed():
    labels = [i % 3 for i in range(60)]
    assert fold_indices(labels, 5, seed=0) == fold_indices(list(labels), 5, seed=0)
    assert fold_indices(labels, 5, seed=0) != fold_indices(labels, 5, seed=1)
    with pytest.raises(ValueError):
        fold_indices(labels, 0, seed=0)


# ---------------------------------------------------------------- fold_parts and fold_lists

def test_fold_parts_refuses_too_many_folds_in_one_line():
    labels = [0] * 10 + [1] * 3
    keep, held, note = fold_parts(labels, folds=3, fold=2, classes=["ants", "bees"])
    assert sorted(keep + held) == list(range(13)) and not set(keep) & set(held) and note == ""
    with pytest.raises(UserError, match=r"^--folds 4 needs at least 4 pictures of every class, and bees has 3; "
                                        r"give --folds 3 or fewer$"):
        fold_parts(labels, folds=4, fold=1, classes=["ants", "bees"])
    with pytest.raises(UserError, match="^--folds 2 needs .* and bees has 1; add pictures of it, or train "):
        fold_parts([0, 0, 1], folds=2, fold=1, classes=["ants", "bees"])
    with pytest.raises(UserError, match=r"^--fold 4 is beyond --folds 3; give a fold from 1 to 3$"):
        fold_parts(labels, folds=3, fold=4, classes=["ants", "bees"])


def test_multilabel_folds_stratify_by_combination_or_say_they_are_random():
    rows = [[0, 0], [1, 0], [1, 1]] * 4  # each combination 4 times
    held = [fold_parts(rows, folds=3, fold=f, classes=["cat", "dog"]) for f in (1, 2, 3)]
    assert all(note == "" for *_, note in held)
    for _, part, _ in held:  # each combination's 4 pictures spread over the 3 folds
        counts = Counter(tuple(rows[i]) for i in part)
        assert all(1 <= counts[c] <= 2 for c in ((0, 0), (1, 0), (1, 1)))
    rows[0] = [0, 1]  # a combination seen once: no stratifying by combination
    *_, note = fold_parts(rows, folds=3, fold=1, classes=["cat", "dog"])
    assert note == ("--folds 3: some combination of labels has fewer than 3 pictures, so the folds are drawn at "
                    "random, not stratified")
    with pytest.raises(UserError, match="^--folds 3 needs at least 3 pictures showing every class, and dog has 2"):
        fold_parts([[1, 0]] * 6 + [[1, 1]] * 2, folds=3, fold=1, classes=["cat", "dog"])


def test_fold_lists_pool_train_and_val_and_keep_test():
    lists = {"train": [[f"t{i}" for i in range(6)], [0, 0, 0, 1, 1, 1]], "val": [["v0", "v1"], [0, 1]],
             "test": [["x0"], [1]]}
    seen = []
    for fold in (1, 2):
        out, _ = fold_lists(lists, folds=2, fold=fold, test_is_val=False, classes=["a", "b"])
        assert out["test"] == lists["test"]
        assert sorted(out["train"][0] + out["val"][0]) == sorted(lists["train"][0] + lists["val"][0])
        seen += out["val"][0]
    assert sorted(seen) == sorted(lists["train"][0] + lists["val"][0])  # each picture validated once
    only_test = {"train": lists["train"], "val": [["x0", "x1"], [0, 1]]}  # test/ standing in for val/
    out, _ = fold_lists(only_test, folds=3, fold=1, test_is_val=True, classes=["a", "b"])
    assert out["test"] == only_test["val"] and sorted(out["train"][0] + out["val"][0]) == lists["train"][0]


# ---------------------------------------------------------------- the folds of real loaders

def test_folder_folds_pool_val_and_keep_test(tmp_path):
    """train/ and val/ pooled and cut in three; test/ the test split of every fold; each picture validated
    by exactly one fold; the fold named in the data's description."""
    from imgclf.sources import load_data

    root = tmp_path / "data"
    write_class_folder(root / "train", ["a", "b"], 5, seed=1)
    write_class_folder(root / "val", ["a", "b"], 2, seed=2)
    write_class_folder(root / "test", ["a", "b"], 2, seed=3)
    base = DataConfig(data=str(root), cache_dir=str(tmp_path / "cache"), folds=3)
    validated = []
    for fold in (1, 2, 3):
        data = load_data(replace(base, fold=fold), progress=False)
        assert len(data.train) + len(data.val) == 14 and len(data.test) == 4
        assert not set(data.train.files) & set(data.val.files)
        assert f"fold {fold}/3 (as validation)" in data.describe()
        assert sorted(Counter(data.val.labels.tolist()).values()) in ([2, 2], [2, 3])  # 7 of each class, in 3
        validated += data.val.files
    assert len(validated) == len(set(validated)) == 14
    assert len(load_data(base, progress=False).val) == 4  # without --fold: val/ as always


def test_builtin_folds_cut_the_training_split_and_test_on_the_test_split():
    from imgclf.sources import load_data

    data = load_data(DataConfig(data="fashion-mnist-mini", folds=5, fold=2), progress=False)
    assert (len(data.train), len(data.val), len(data.test)) == (4800, 1200, 1000)
    assert data.val_name == "fold 2/5" and sorted(Counter(data.val.labels.tolist()).values())[-1] <= 121


def test_multilabel_folder_folds(tmp_path):
    from PIL import Image

    from imgclf.sources import load_data

    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(12):
        Image.new("RGB", (16, 16), (20 * i, 100, 200 - 10 * i)).save(pics / f"a{i}.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("image_name,tags\n" + "".join(f"a{i}.png,{' '.join(['cat', 'dog'][: i % 3])}\n"
                                                  for i in range(12)))
    cfg = DataConfig(data=str(pics), labels=str(csv), folds=3, cache_dir=str(tmp_path / "cache"))
    validated = []
    for fold in (1, 2, 3):
        data = load_data(replace(cfg, fold=fold), progress=False)
        assert data.task == "multilabel" and len(data.val) == 4 and len(data.train) == 8
        counts = Counter(map(tuple, data.val.labels.tolist()))
        assert all(1 <= counts[c] <= 2 for c in ((0, 0), (1, 0), (1, 1)))  # stratified by combination
        validated += data.val.files
    assert len(set(validated)) == 12


# ---------------------------------------------------------------- the command line: bad input in one line

def test_bad_folds_are_one_line(tmp_path, capsys):
    root = write_class_folder(tmp_path / "data", ["a", "b"], 2)
    out = tmp_path / "cv"
    for flags, words in [(["--folds", "1"], "--folds must be 2..20, got 1"),
                         (["--folds", "21"], "--folds must be 2..20, got 21"),
                         (["--fold", "2"], "--fold would change nothing here: it picks one fold of --folds K"),
                         (["--folds", "3", "--val-fraction", "0.3"], "--val-fraction would change nothing here"),
                         (["--folds", "3"], "--folds 3 needs at least 3 pictures of every class, and a has 2; "
                                            "give --folds 2 or fewer")]:
        code = main(["train", "--data", str(root), "--out", str(out), "--device", "cpu", *flags])
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err.strip().splitlines()) <= 2, err  # fold 1/3 line, then the error
        assert not out.exists()  # a cross-validation that trained nothing leaves nothing


def test_a_damaged_folds_file_and_fit_without_a_fold_are_one_line(tmp_path, capsys):
    import imgclf

    parent = tmp_path / "cv"
    parent.mkdir()
    (parent / "folds.json").write_text("{not json")
    assert main(["train", "--resume", str(parent)]) == 2
    assert "cannot resume from " in capsys.readouterr().err
    root = write_class_folder(tmp_path / "data", ["a", "b"], 3)
    with pytest.raises(UserError, match="^--folds 3 trains 3 runs, one per fold: .*give --fold I to train fold"):
        imgclf.fit("tutorial_cnn", str(root), folds=3, out=str(tmp_path / "run"), epochs=1)


def test_runs_lists_a_cross_validation_with_its_folds(tmp_path):
    """`imgclf runs` on folds.json and fold folders written by hand (no training here)."""
    from imgclf.runs import list_runs, runs_output

    parent = tmp_path / "runs" / "cv"
    for fold, acc in ((1, 0.8), (2, 0.9)):
        folder = parent / f"fold-{fold}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model": {"name": "resnet18"}, "data": {"data": "/d/ants"},
                                                        "optim": {"epochs": 1, "monitor": "val_acc"}}))
        (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_acc": acc, "epoch_seconds": 3}) + "\n")
        (folder / "status.json").write_text(json.dumps({"status": "finished"}))
    (parent / "folds.json").write_text(json.dumps({
        "folds": 3, "done": 2, "config": {"model": {"name": "resnet18"}, "data": {"data": "/d/ants"},
                                          "optim": {"monitor": "val_acc"}},
        "figures": {"val_acc": {"mean": 0.85, "std": 0.0707, "min": 0.8, "max": 0.9}}}))
    rows = list_runs(tmp_path / "runs")
    assert [r["name"] for r in rows] == ["cv", "cv/fold-1", "cv/fold-2"]
    assert (rows[0]["folds"], rows[0]["epochs"], rows[0]["status"], rows[0]["time"]) == (3, 2, "stopped", 6)
    table, err = runs_output(rows, tmp_path / "runs")
    assert "2/3 folds" in table and "val_acc 0.8500 ± 0.0707 (mean)" in table and err.startswith("3 runs")


# ---------------------------------------------------------------- end to end, resumed fold by fold

@pytest.mark.slow
def test_folds_train_resume_and_list(tmp_path):
    root = tmp_path / "data"
    write_class_folder(root / "train", ["a", "b", "c"], 6, seed=1)
    write_class_folder(root / "test", ["a", "b", "c"], 2, seed=2)
    out = tmp_path / "cv"
    env = {"OMP_NUM_THREADS": "1"}
    first = run_cli("train", "--data", root, "--folds", "3", "--epochs", "2", "--stop-after", "1", "--out", out,
                    "--batch-size", "8", "--device", "cpu", "--precision", "fp32", env=env)
    assert first.returncode == 0, first.stderr
    assert "fold 1/3 stopped by --stop-after 1 after epoch 1; resume every fold with: imgclf train --resume" \
        in first.stderr
    assert sorted(p.name for p in out.iterdir()) == ["fold-1", "folds.json"]
    again = run_cli("train", "--data", root, "--folds", "3", "--out", out, env=env)
    assert again.returncode == 2 and "already holds the folds of a cross-validation; resume it with" in again.stderr
    unlike = run_cli("train", "--resume", out, "--epochs", "3", env=env)
    assert unlike.returncode == 2 and "--epochs 3 differs from the 2 the folds of" in unlike.stderr

    resumed = run_cli("train", "--resume", out, env=env)  # fold 1 continued, folds 2 and 3 trained
    assert resumed.returncode == 0, resumed.stderr
    assert "fold 1/3: resuming" in resumed.stderr and "fold 3/3: training" in resumed.stderr
    summary = json.loads((out / "folds.json").read_text())
    assert (summary["folds"], summary["done"], sorted(summary["runs"])) == (3, 3, ["fold-1", "fold-2", "fold-3"])
    for name in ("val_acc", "val_loss", "test_acc"):
        values = [summary["runs"][f"fold-{i}"][name] for i in (1, 2, 3)]
        assert summary["figures"][name]["mean"] == pytest.approx(sum(values) / 3)
        assert summary["figures"][name]["std"] >= 0
    assert [json.loads(line)["epoch"] for line in (out / "fold-1" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert resumed.stdout.splitlines()[1].split() == ["figure", "mean", "std", "min", "max"]
    assert "done: val_acc" in resumed.stderr and "over 3 folds" in resumed.stderr

    listed = run_cli("runs", tmp_path, env=env)
    lines = listed.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["cv", "cv/fold-1", "cv/fold-2", "cv/fold-3"]
    assert "3/3 folds" in lines[1] and "finished" in lines[1] and "(mean)" in lines[1]

    kept = (out / "fold-1" / "checkpoints" / "last.pt").stat().st_mtime_ns
    import shutil

    shutil.rmtree(out / "fold-3")  # a fold killed and its folder lost: trained again, alone
    redone = run_cli("train", "--resume", out, env=env)
    assert redone.returncode == 0, redone.stderr
    assert "fold 1/3: finished" in redone.stderr and "fold 3/3: training" in redone.stderr
    assert (out / "fold-1" / "checkpoints" / "last.pt").stat().st_mtime_ns == kept
    assert json.loads((out / "folds.json").read_text())["done"] == 3


@pytest.mark.slow
def test_multilabel_folds_train(tmp_path, capsys):
    from PIL import Image

    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(12):
        Image.new("RGB", (16, 16), (20 * i, 100, 200 - 10 * i)).save(pics / f"a{i}.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("image_name,tags\n" + "".join(f"a{i}.png,{' '.join(['cat', 'dog'][: i % 3])}\n"
                                                  for i in range(12)))
    out = tmp_path / "cv"
    assert main(["train", "--data", str(pics), "--labels", str(csv), "--folds", "3", "--epochs", "1",
                 "--monitor", "val_map", "--out", str(out), "--device", "cpu", "--batch-size", "4",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    summary = json.loads((out / "folds.json").read_text())
    assert summary["done"] == 3 and "val_map" in summary["figures"]
    assert "done: val_map" in capsys.readouterr().err


@pytest.mark.slow
def test_five_folds_of_ants_and_bees(hymenoptera_dir, tmp_path):
    out = tmp_path / "cv"
    done = run_cli("train", "--data", hymenoptera_dir, "--folds", "5", "--img-size", "32", "--epochs", "1",
                   "--out", out, "--device", "cpu", env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "folds.json").read_text())
    assert summary["done"] == 5 and sorted(summary["runs"]) == [f"fold-{i}" for i in range(1, 6)]
    assert 0 <= summary["figures"]["val_acc"]["mean"] <= 1 and summary["figures"]["val_acc"]["std"] is not None
    assert "245 train" not in done.stderr and "/ 80 fold 1/5 (as validation)" in done.stderr  # 398 pooled
    listed = run_cli("runs", out.parent)
    assert "5/5 folds" in listed.stdout and listed.stdout.count("fold-") == 5
