"""Every common folder layout read as its user means it (issue 12): which pictures train, which validate
after every epoch (and choose best.pt and early stopping), which are the test split evaluated once at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import write_class_folder

from imgclf.checkpoint import load_checkpoint
from imgclf.cli import main
from imgclf.config import DataConfig
from imgclf.errors import UserError
from imgclf.sources import load_data

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process trainings: one intra-op thread (conftest)

CLASSES = ["cat", "dog"]


def layout(folder: Path, **splits: int) -> Path:
    """folder/<split>/<class>/ with `n` pictures per class for each split given (split "here": folder itself)."""
    for seed, (split, n) in enumerate(splits.items()):
        write_class_folder(folder / split if split != "here" else folder, CLASSES, n, seed=seed)
    return folder


def counts(data) -> dict[str, int]:
    return {role: len(split) for role, split in data.splits().items()}


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_train_with_a_validation_folder_uses_it_and_holds_nothing_out(tmp_path, val_name):
    data = load_data(DataConfig(data=str(layout(tmp_path, train=10, **{val_name: 3}))))
    assert counts(data) == {"train": 20, "val": 6} and data.val_name == val_name
    assert f"20 train / 6 {val_name} pictures" == data.describe()


def test_train_val_test_keeps_test_apart(tmp_path):
    data = load_data(DataConfig(data=str(layout(tmp_path, train=10, val=3, test=4))))
    assert counts(data) == {"train": 20, "val": 6, "test": 8} and data.val_name == "val"
    assert data.describe() == "20 train / 6 val / 8 test pictures"


def test_only_a_test_folder_serves_as_validation_and_says_so(tmp_path):
    data = load_data(DataConfig(data=str(layout(tmp_path, train=10, test=4))))
    assert counts(data) == {"train": 20, "val": 8} and data.val_name == "test"
    assert data.describe() == "20 train / 8 test (as validation) pictures"


def test_single_folder_holds_out_a_fraction_and_whole_takes_all(tmp_path):
    root = layout(tmp_path, here=10)
    assert counts(load_data(DataConfig(data=str(root)))) == {"train": 16, "val": 4}
    whole = load_data(DataConfig(data=str(root)), whole=True)
    assert len(whole.val) == 20 and whole.val_name == "all"


@pytest.mark.parametrize("val_name", ["val", "Val", "VALIDATION", "test"])
def test_class_folders_beside_val_without_train_is_one_clear_error(tmp_path, val_name):
    """val/ (in any case) beside class folders is never read as one more class: the layout is ambiguous."""
    layout(tmp_path, here=3, **{val_name: 2})
    with pytest.raises(UserError, match=f"ambiguous layout: .* has {val_name}/ beside the class folders cat, dog "
                                        f"but no train/ folder.* move the training class folders into"):
        load_data(DataConfig(data=str(tmp_path)))


def test_split_folders_are_known_in_any_case(tmp_path):
    data = load_data(DataConfig(data=str(layout(tmp_path, Train=5, Val=2))), progress=False)
    assert counts(data) == {"train": 10, "val": 4} and data.val_name == "Val"


def test_folders_beside_train_are_named_as_not_read(tmp_path, capsys):
    layout(tmp_path, train=5, val=2)
    write_class_folder(tmp_path, ["extra"], 2)
    data = load_data(DataConfig(data=str(tmp_path)))
    assert counts(data) == {"train": 10, "val": 4}
    assert "imgclf: warning: not reading extra in " in capsys.readouterr().err


def test_a_single_class_is_one_clear_error(tmp_path):
    write_class_folder(tmp_path / "data", ["cat"], 4)
    with pytest.raises(UserError, match=r"has a single class \(cat\); a classifier needs at least two"):
        load_data(DataConfig(data=str(tmp_path / "data")))
    write_class_folder(tmp_path / "split" / "train", ["cat"], 4)
    write_class_folder(tmp_path / "split" / "val", ["cat"], 2)
    with pytest.raises(UserError, match="has a single class"):
        load_data(DataConfig(data=str(tmp_path / "split")))


def test_labels_from_a_csv_file(tmp_path):
    pictures = layout(tmp_path / "src", here=6)
    folder = tmp_path / "kaggle" / "images"
    folder.mkdir(parents=True)
    rows = ["filename,label"]
    for i, path in enumerate(sorted(pictures.rglob("*.png"))):
        (folder / f"{i:03d}.png").write_bytes(path.read_bytes())
        rows.append(f"images/{i:03d}.png,{path.parent.name}")
    (tmp_path / "kaggle" / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = DataConfig(data=str(tmp_path / "kaggle"), labels=str(tmp_path / "kaggle" / "labels.csv"))
    data = load_data(cfg)
    assert data.classes == CLASSES and counts(data) == {"train": 10, "val": 2}
    assert data.train.labels.bincount().tolist() == [5, 5]
    (tmp_path / "kaggle" / "bad.csv").write_text("filename,label\nimages/none.png,cat\n")
    with pytest.raises(UserError, match="does not exist"):
        load_data(DataConfig(data=cfg.data, labels=str(tmp_path / "kaggle" / "bad.csv")))
    (tmp_path / "kaggle" / "one.csv").write_text("\n".join(r.replace(",dog", ",cat") for r in rows) + "\n")
    with pytest.raises(UserError, match=r"one.csv has a single class \(cat\); a classifier needs at least two"):
        load_data(DataConfig(data=cfg.data, labels=str(tmp_path / "kaggle" / "one.csv")))
    os.mkfifo(tmp_path / "kaggle" / "fifo.csv")  # never opened: reading it would wait for ever
    with pytest.raises(UserError, match=r"fifo.csv: not a regular file \(a FIFO\); give a CSV file"):
        load_data(DataConfig(data=cfg.data, labels=str(tmp_path / "kaggle" / "fifo.csv")))
    os.mkfifo(folder / "fifo.png")  # a FIFO named in the CSV: skipped, never opened
    (tmp_path / "kaggle" / "with-fifo.csv").write_text("\n".join([*rows, "images/fifo.png,cat"]) + "\n")
    data = load_data(DataConfig(data=cfg.data, labels=str(tmp_path / "kaggle" / "with-fifo.csv")), progress=False)
    assert len(data.train) + len(data.val) == 12  # every picture but the FIFO
    assert (str(folder / "fifo.png"), "not a regular file (a FIFO)") in data.skipped


def run_train(*args) -> int:
    return main(["train", *map(str, args), "--precision", "fp32", "--device", "cpu", "--model", "tutorial_cnn",
                 "--batch-size", "8"])


def records_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_best_is_chosen_on_val_and_test_is_evaluated_once_with_it(tmp_path, capsys):
    data = layout(tmp_path / "d", train=12, val=4, test=5)
    run = tmp_path / "run"
    assert run_train("--data", data, "--epochs", 3, "--out", run, "--lr", 0.02) == 0
    err = capsys.readouterr().err
    assert "24 train / 8 val / 10 test pictures" in err.splitlines()[0]
    records = records_of(run)
    assert [r["val_count"] for r in records] == [8, 8, 8]
    assert [("test_acc" in r) for r in records] == [False, False, True]  # once, at the end
    best_epoch = max(records, key=lambda r: r["val_acc"])["epoch"]  # the first of equal figures
    assert load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] == best_epoch
    assert records[-1]["test_count"] == 10 and records[-1]["test_of_epoch"] == best_epoch
    assert "test: accuracy" in err and f"best.pt (epoch {best_epoch})" in err


def test_patience_stops_the_run_and_keeps_the_best(tmp_path, capsys):
    data = layout(tmp_path / "d", train=8, val=3)
    run = tmp_path / "run"
    # a learning rate too small to change anything: the validation figure cannot improve after epoch 1
    assert run_train("--data", data, "--epochs", 10, "--patience", 2, "--lr", 1e-9, "--warmup-epochs", 0,
                     "--schedule", "constant", "--out", run) == 0
    err = capsys.readouterr().err
    records = records_of(run)
    assert len(records) == 3, records
    assert "early stop after epoch 3: val_acc has not improved for 2 epochs" in err
    assert load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] == 1


def test_balance_sampler_draws_classes_evenly(tmp_path):
    from imgclf.cli import build_parser, train_config
    from imgclf.pipeline import build_run

    root = tmp_path / "d"
    write_class_folder(root / "train", ["big"], 90, seed=1)
    write_class_folder(root / "train", ["small"], 10, seed=2)
    write_class_folder(root / "val", ["big", "small"], 2, seed=3)

    def drawn(balance: str) -> list[int]:
        cfg = train_config(build_parser().parse_args(["train", "--data", str(root), "--balance", balance,
                                                      "--batch-size", "50", "--augment", "none"]))
        data = load_data(cfg.data)
        parts = build_run(cfg, data, device=torch.device("cpu"))
        labels = torch.cat([y for epoch in range(10) for _, y, _ in parts.train.epoch(epoch)])
        return labels.bincount(minlength=2).tolist()

    plain, balanced = drawn("none"), drawn("sampler")
    assert plain[1] * 8 < plain[0]  # about 90:10
    assert 0.8 < balanced[1] / balanced[0] < 1.25, balanced  # about even


def test_unbalanced_classes_are_warned_about_in_the_first_lines(tmp_path, capsys):
    root = tmp_path / "d"
    write_class_folder(root / "train", ["big"], 30, seed=1)
    write_class_folder(root / "train", ["small"], 5, seed=2)
    write_class_folder(root / "val", ["big", "small"], 2, seed=3)
    assert run_train("--data", root, "--epochs", 1, "--out", tmp_path / "run") == 0
    lines = capsys.readouterr().err.splitlines()
    assert any("warning: class small has 5 training pictures, under a fifth of big's 30" in line and
               "--balance" in line for line in lines[:3]), lines[:3]


def test_cache_list_and_prune(tmp_path, capsys):
    cache = tmp_path / "cache"
    data = layout(tmp_path / "d", train=4, val=2)
    load_data(DataConfig(data=str(data), cache_dir=str(cache)))
    assert main(["cache", "list", "--cache-dir", str(cache), "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(c["pictures"] for c in listed) == [4, 8] and not any(c["partial"] for c in listed)
    assert main(["cache", "prune", "--cache-dir", str(cache)]) == 0  # used just now: kept
    assert len(list(cache.glob("*/meta.json"))) == 2
    assert main(["cache", "prune", "--older-than", "0", "--cache-dir", str(cache)]) == 0
    assert not list(cache.glob("*/meta.json"))
    assert "2 caches" in capsys.readouterr().err
