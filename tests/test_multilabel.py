"""Multi-label classification (issue 23, point 1): MultiLabel's figures by hand, the CSV, and a real-picture
set of 2x2 CIFAR-10 mosaics trained, evaluated, predicted and exported end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_dataset

from imgclf.cli import main
from imgclf.metrics import average_precision, best_f1_threshold, f1_figures, multilabel_counts
from imgclf.tasks import MultiLabel, checkpoint_task, make_task


def test_average_precision_by_hand():
    # ranked 1 0 1 0: precision 1 at recall 1/2, 2/3 at recall 1 -> (1 + 2/3) / 2
    ap = average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0]))
    assert ap == pytest.approx(5 / 6)
    # tied scores fall together: cut after 0.9 (1/1), then after both 0.5 (2/3)
    assert average_precision(torch.tensor([0.9, 0.5, 0.5]), torch.tensor([1, 1, 0])) == pytest.approx(5 / 6)
    assert average_precision(torch.tensor([0.2, 0.1]), torch.tensor([0, 0])) is None  # undefined
    assert average_precision(torch.tensor([0.1, 0.9]), torch.tensor([1, 1])) == pytest.approx(1.0)


def test_threshold_maximises_f1():
    scores, targets = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.2]), torch.tensor([1, 0, 1, 1, 0])
    # keeping the top 4: tp 3, fp 1, fn 0 -> F1 6/7, the best; half-way between 0.6 and 0.2
    assert best_f1_threshold(scores, targets) == pytest.approx(0.4)
    assert best_f1_threshold(scores, torch.zeros(5)) == 0.5  # no positive: the default
    counts = multilabel_counts(scores.view(-1, 1), targets.view(-1, 1), torch.tensor([0.4]))
    assert counts.tolist() == [[3, 1, 0]]
    assert f1_figures(counts)["f1"] == [pytest.approx(6 / 7)]


def test_multilabel_task_figures_and_decoding():
    task = make_task("multilabel", ["a", "b", "c"])
    probs = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.8, 0.3], [0.7, 0.7, 0.1], [0.2, 0.1, 0.2]])
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.uint8)  # the last: none
    logits = torch.logit(probs)
    tally = task.tally(torch.device("cpu"), keep=True)
    tally.add(logits[:2], targets[:2])
    tally.add(logits[2:], targets[2:])
    from imgclf.distributed import DistInfo

    result = tally.result(DistInfo())
    assert result["count"] == 4 and result["map"] == pytest.approx(1.0) and result["acc"] == 1.0
    assert result["micro_f1"] == pytest.approx(1.0)
    want = torch.nn.functional.binary_cross_entropy(probs, targets.float())
    assert result["loss"] == pytest.approx(float(want), rel=1e-5)
    assert task.loss(logits, targets).item() == pytest.approx(float(want), rel=1e-5)
    figures = task.figures(result)
    assert figures["per_class"]["a"]["ap"] == pytest.approx(1.0)
    table = task.table(task.summary({**result, "split": "val"}))
    assert "mAP 1.0000" in table and "thresholds from this split" in table
    stored = checkpoint_task({"classes": ["a", "b", "c"], "task": "multilabel", "thresholds": [0.5, 0.75, 0.5]})
    assert [i for i, _ in stored.decode(probs[2], 5)] == [0]  # b's 0.7 is under its 0.75
    assert stored.decode(probs[3], 5) == []  # no label over its threshold
    assert stored.hits(logits, targets) == 4


def test_damaged_thresholds_are_one_line():
    from imgclf.errors import UserError

    with pytest.raises(UserError, match="thresholds are damaged"):
        checkpoint_task({"classes": ["a", "b"], "task": "multilabel", "thresholds": [0.5]})
    assert isinstance(checkpoint_task({"classes": ["a", "b"], "task": "multilabel"}), MultiLabel)


# ---------------------------------------------------------------- real pictures: 2x2 mosaics of CIFAR-10

MOSAIC_CLASSES = ("airplane", "automobile", "bird", "cat", "ship")


def make_mosaics(cifar: Path, out: Path, *, count: int, seed: int = 0, start: int = 0) -> list[list[str]]:
    """`count` 32x32 pictures out/m<i>.png, each four 16x16 tiles: a CIFAR-10 training picture of one of
    MOSAIC_CLASSES (downscaled) or, a quarter of the time, a blank grey tile; the labels of a mosaic are the
    classes it shows (none when all four are blank). Returns [file name, sorted labels] per picture."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pools = {name: sorted((cifar / "train" / name).iterdir())[start:] for name in MOSAIC_CLASSES}
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        mosaic, shown = Image.new("RGB", (32, 32), (128, 128, 128)), set()
        for k in range(4):
            if rng.random() < 0.25:
                continue
            name = MOSAIC_CLASSES[rng.integers(len(MOSAIC_CLASSES))]
            pool = pools[name]
            tile = Image.open(pool[int(rng.integers(len(pool)))]).convert("RGB").resize((16, 16), Image.BILINEAR)
            mosaic.paste(tile, (16 * (k % 2), 16 * (k // 2)))
            shown.add(name)
        mosaic.save(out / f"m{i:04d}.png")
        rows.append([f"m{i:04d}.png", sorted(shown)])
    return rows


def write_csv(path: Path, rows: list[list], *, columns: bool = False) -> Path:
    if columns:
        lines = ["filename," + ",".join(MOSAIC_CLASSES)]
        lines += [f"{f}," + ",".join("1" if c in labels else "0" for c in MOSAIC_CLASSES) for f, labels in rows]
    else:
        lines = ["image_name,tags"] + [f"{f},{' '.join(labels)}" for f, labels in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory):
    """400 training mosaics (a fifth held out for validation) and 100 test mosaics from other CIFAR
    pictures, with their CSVs."""
    cifar = shared_dataset("cifar10")
    root = tmp_path_factory.mktemp("mosaics")
    rows = make_mosaics(cifar, root / "pictures", count=400, seed=0)
    test_rows = make_mosaics(cifar, root / "test", count=100, seed=1, start=4000)  # pictures training never sees
    return {"root": root / "pictures", "csv": write_csv(root / "labels.csv", rows), "rows": rows,
            "test": root / "test", "test_csv": write_csv(root / "test.csv", test_rows), "test_rows": test_rows,
            "cache": root / "cache"}


@pytest.mark.slow  # 400 mosaics, 15 epochs, exports and a server: about 15 s alone
def test_mosaics_train_eval_predict_export(request, tmp_path, capsys):
    """Runs in a fresh pytest process: after the other tests of a whole-suite run, pytest's captured standard
    output was found closed inside this test (ValueError on the capture's own context manager; not yet
    understood: the in-process server helper is the suspect), which then crashed the whole test process."""
    if not os.environ.get("IMGCLF_TEST_ALONE"):
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{request.node.name}"],
                           env={**os.environ, "IMGCLF_TEST_ALONE": "1"}, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        return
    mosaics = request.getfixturevalue("mosaics")
    run = tmp_path / "run"
    assert main(["train", "--data", str(mosaics["root"]), "--labels", str(mosaics["csv"]), "--epochs", "15",
                 "--batch-size", "32", "--optimizer", "adamw", "--lr", "0.003", "--weight-decay", "0.01",
                 "--monitor", "val_map", "--device", "cpu", "--precision", "fp32",
                 "--cache-dir", str(mosaics["cache"]), "--out", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "multi-label (several labels in a cell of" in out + err  # detected, and said in the first line
    assert "no run pictures" not in err and (run / "curves.png").is_file()  # (no confusion matrix: per-class AP)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 16))
    assert "done: validation mAP" in out + err
    assert records[-1]["val_count"] == 80 and set(records[-1]["val_per_class"]) == set(MOSAIC_CLASSES)
    best = max(r["val_map"] for r in records)
    # chance is each class's share of pictures, 1 - 0.85^4 = 0.48; 0.76 measured
    assert best > 0.7, [r["val_map"] for r in records]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()  # the run folder holds the event file
    assert {"val/map", "val/macro_f1", "val/micro_f1"} <= set(events.Tags()["scalars"])
    assert events.Scalars("val/map")[-1].value == pytest.approx(records[-1]["val_map"], abs=1e-6)
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["task"] == "multilabel" and ckpt["classes"] == sorted(MOSAIC_CLASSES)
    assert ckpt["thresholds"] == records[ckpt["epoch"] - 1]["val_thresholds"]  # chosen on validation

    # eval on mosaics of pictures training never saw, at the checkpoint's thresholds
    assert main(["eval", str(run / "checkpoints" / "best.pt"), "--data", str(mosaics["test"]), "--labels",
                 str(mosaics["test_csv"]), "--json", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "multilabel" and summary["count"] == 100
    assert summary["thresholds"] == ckpt["thresholds"] and summary["thresholds_from"] == "the checkpoint"
    assert summary["map"] > 0.62, summary["map"]  # 0.68 measured
    assert main(["eval", str(run / "checkpoints" / "best.pt"), "--data", str(mosaics["test"]), "--labels",
                 str(mosaics["test_csv"]), "--device", "cpu"]) == 0
    assert "mAP" in capsys.readouterr().out

    # predict: every label over its threshold, and all scores in JSON
    pictures = sorted(mosaics["test"].glob("*.png"))[:20]
    assert main(["predict", str(run / "checkpoints" / "best.pt"), *map(str, pictures), "--json",
                 "--device", "cpu", "--precision", "fp32"]) == 0  # float32, as the exported graph computes
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    thresholds = dict(zip(ckpt["classes"], ckpt["thresholds"], strict=True))
    for row in rows:
        assert set(row["scores"]) == set(MOSAIC_CLASSES)
        over = {c for c, p in row["scores"].items() if p >= thresholds[c]}
        assert {t["label"] for t in row["top"]} == over

    # ONNX: the sigmoid inside the graph, the thresholds in its metadata, the same answers
    onnx = tmp_path / "model.onnx"
    assert main(["export", str(run / "checkpoints" / "best.pt"), "--format", "onnx", "--out", str(onnx)]) == 0
    capsys.readouterr()
    assert main(["predict", str(onnx), *map(str, pictures), "--json"]) == 0
    exported = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for a, b in zip(rows, exported, strict=True):
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert all(abs(a["scores"][c] - b["scores"][c]) < 1e-4 for c in MOSAIC_CLASSES)
    assert main(["eval", str(onnx), "--data", str(mosaics["test"]), "--labels", str(mosaics["test_csv"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["map"] == pytest.approx(summary["map"], abs=1e-3)
    served(onnx, pictures[:3], rows[:3])

    # int8: calibrated on the run's training mosaics, its mAP against the float graph's on the validation ones
    pytest.importorskip("nncf")
    int8 = tmp_path / "model.int8.onnx"
    assert main(["export", str(run / "checkpoints" / "best.pt"), "--format", "onnx", "--int8", "--out", str(int8)]) == 0
    said = capsys.readouterr().out
    from imgclf.predict import ExportedPredictor

    q = ExportedPredictor(int8, "onnx").metadata["quantization"]
    assert q["pictures"] == 80 and "same_labels" in q and "float_accuracy" not in q
    assert f"int8 mAP {q['int8_map']:.2%} against float {q['float_map']:.2%}" in said
    assert q["float_map"] == pytest.approx(records[ckpt["epoch"] - 1]["val_map"], abs=1e-3)  # the float graph's
    assert q["float_map"] - q["int8_map"] < 0.05 and q["same_labels"] > 0.5
    assert main(["predict", str(int8), *map(str, pictures[:5]), "--json"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(answers) == 5
    for b in answers:
        assert set(b["scores"]) == set(MOSAIC_CLASSES) and all(t["probability"] >= thresholds[t["label"]] for t in b["top"])
    pytest.importorskip("openvino")
    xml = tmp_path / "model.xml"
    assert main(["export", str(run / "checkpoints" / "best.pt"), "--format", "openvino", "--out", str(xml)]) == 0
    capsys.readouterr()
    assert main(["predict", str(xml), *map(str, pictures), "--json"]) == 0
    for a, b in zip(rows, map(json.loads, capsys.readouterr().out.splitlines()), strict=True):
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]


def served(model: Path, pictures: list[Path], predicted: list[dict]) -> None:
    """`imgclf serve`'s answers (from `model`, over HTTP) are predict's: the labels over their thresholds and
    every class's score."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from test_serve import serving_in_this_process

    from imgclf.predict import Predictor
    from imgclf.serve import create_app

    predictor = Predictor.from_path(model)
    with serving_in_this_process(create_app(predictor, model_name="tutorial_cnn")) as url:
        answers = [httpx.post(f"{url}/predict", content=p.read_bytes(), timeout=60).json() for p in pictures]
    for answer, row in zip(answers, predicted, strict=True):
        assert [t["label"] for t in answer["top"]] == [t["label"] for t in row["top"]]
        assert all(abs(answer["scores"][c] - row["scores"][c]) < 1e-4 for c in MOSAIC_CLASSES)


# ---------------------------------------------------------------- the CSV layouts and bad inputs, one line each

@pytest.fixture
def pictures(tmp_path):
    """Twelve small pictures a0.png ... in tmp_path/pics."""
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (16, 16), (20 * i, 100, 200 - 10 * i)).save(folder / f"a{i}.png")
    return folder


def test_both_layouts_read_the_same_targets(pictures, tmp_path):
    from imgclf.labelsets import labels_task, read_multilabel_csv

    rows = [[f"a{i}.png", [c for k, c in enumerate(MOSAIC_CLASSES[:3]) if (i >> k) & 1]] for i in range(12)]
    spaced = write_csv(tmp_path / "spaced.csv", rows)
    text = spaced.read_text().replace(".png,", ",")  # Planet's names come without a suffix
    (tmp_path / "planet.csv").write_text(text)
    columns = tmp_path / "columns.csv"
    columns.write_text("filename,airplane,automobile,bird\n" + "".join(
        f"{f},{','.join('1' if c in labels else '0' for c in MOSAIC_CLASSES[:3])}\n" for f, labels in rows))
    read = [read_multilabel_csv(p, pictures) for p in (spaced, tmp_path / "planet.csv", columns)]
    assert all(r[0] == ["airplane", "automobile", "bird"] for r in read)
    assert all(r[1] == [pictures / f"a{i}.png" for i in range(12)] for r in read)
    assert all(torch.equal(r[2], read[0][2]) for r in read)
    assert read[0][2][0].tolist() == [0, 0, 0]  # a0 shows none of them: allowed, a negative of every class
    assert read[0][2][7].tolist() == [1, 1, 1] and read[0][2].dtype == torch.uint8
    assert labels_task("auto", str(spaced))[0] == "multilabel"
    assert labels_task("auto", str(columns))[0] == "multilabel"
    (tmp_path / "single.csv").write_text("filename,label\na0.png,cat\na1.png,dog\n")
    assert labels_task("auto", str(tmp_path / "single.csv")) == ("single-label", "")
    assert labels_task("multilabel", str(tmp_path / "single.csv"))[0] == "multilabel"


@pytest.mark.parametrize(("text", "words"), [
    ("filename,labels\na0.png,cat dog\na1.png,horse\n", "row 3 names the class horse, which the model does not know"),
    ("filename,labels\na0.png,cat dog\nnothere.png,dog\n", "row 3 names .*nothere.png, which does not exist"),
    ("filename,labels\na0.png,cat dog\na0.png,dog\n", "names .*a0.png twice \\(rows 2 and 3\\)"),
    ("filename,cat,dog\na0.png,1,0\na1.png,2,1\n", "row 3 has 2 for cat, not 0 or 1"),
    ("filename,cat,dog\na0.png,1,0\na1.png,1\n", "row 3 has 1 class cells where the header names 2 classes"),
])
def test_bad_rows_are_one_line(pictures, tmp_path, text, words):
    from imgclf.errors import UserError
    from imgclf.labelsets import read_multilabel_csv

    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(UserError, match=words):
        read_multilabel_csv(tmp_path / "bad.csv", pictures, ["cat", "dog"] if "horse" in text else None)


@pytest.mark.parametrize(("flags", "words"), [
    (["--mixup", "0.2"], "--mixup and --cutmix take one class per picture"),
    (["--balance", "sampler"], "--balance sampler weighs pictures by their class"),
    (["--task", "single-label", "--monitor", "val_map"], "--monitor val_map is not a figure of single-label"),
])
def test_options_that_do_not_fit_are_one_line(pictures, tmp_path, capsys, flags, words):
    write_csv(tmp_path / "labels.csv", [[f"a{i}.png", ["cat", "dog"][: i % 3]] for i in range(12)])
    if "single-label" in flags:
        (tmp_path / "labels.csv").write_text("".join(f"a{i}.png,{'cat' if i % 2 else 'dog'}\n" for i in range(12)))
    code = main(["train", "--data", str(pictures), "--labels", str(tmp_path / "labels.csv"), "--epochs", "1",
                 "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert code != 0 and words in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("imgclf: error")]) <= 1


def test_multilabel_needs_a_labels_csv(pictures, tmp_path, capsys):
    assert main(["train", "--data", str(pictures), "--task", "multilabel", "--epochs", "1", "--device", "cpu",
                 "--out", str(tmp_path / "run")]) != 0
    assert "(--task multilabel, or a multi-label model) need --labels FILE.csv" in capsys.readouterr().err


@pytest.mark.slow  # over a second (a training or a real process): the fast tier stays under a minute
def test_small_run_resumes_keeps_its_thresholds_and_shows_its_pictures(pictures, tmp_path, capsys):
    from dataclasses import replace

    from imgclf.config import DataConfig
    from imgclf.sources import load_data
    from imgclf.visualize import class_count_table, samples_figure

    csv = write_csv(tmp_path / "labels.csv", [[f"a{i}.png", ["cat", "dog"][: i % 3]] for i in range(12)])
    run, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--device", "cpu", "--precision", "fp32", "--batch-size", "4", "--cache-dir", str(cache)]
    assert main(["train", "--data", str(pictures), "--labels", str(csv), "--epochs", "3", "--stop-after", "1",
                 "--monitor", "val_map", "--out", str(run), *common]) == 0
    first = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert first["task"] == "multilabel" and len(first["thresholds"]) == 2
    assert main(["train", "--resume", str(run)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and all("val_map" in r for r in records)
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["thresholds"] == records[-1]["val_thresholds"]
    assert "Traceback" not in capsys.readouterr().err
    tuned = tmp_path / "tuned"  # fine-tuning from those weights, the last layer alone first
    assert main(["train", "--data", str(pictures), "--labels", str(csv), "--epochs", "2", "--freeze-epochs", "1",
                 "--pretrained", str(run / "checkpoints" / "last.pt"), "--out", str(tuned), *common]) == 0
    assert torch.load(tuned / "checkpoints" / "last.pt", weights_only=True)["task"] == "multilabel"

    data = load_data(replace(DataConfig(), data=str(pictures), labels=str(csv), cache_dir=str(cache)))
    assert data.task == "multilabel" and data.train.labels.shape[1] == 2 and data.train.labels.dtype == torch.uint8
    assert len(data.train) + len(data.val) == 12  # a fifth held out at random
    table = class_count_table(data)
    assert table.splitlines()[1].split()[0] == "cat" and "12" not in table.splitlines()[1]
    samples_figure(data, name="pics")  # captioned with each picture's labels, "(none)" for none

    plot = tmp_path / "lr.png"
    assert main(["lr-find", "--data", str(pictures), "--labels", str(csv), "--steps", "10", "--out", str(plot),
                 *common]) == 0, capsys.readouterr().err


@pytest.mark.slow  # a decode and a figure: over a second on a busy machine
def test_show_draws_a_multilabel_data_set_from_its_csv(pictures, tmp_path, capsys):
    csv = write_csv(tmp_path / "labels.csv", [[f"a{i}.png", ["cat", "dog"][: i % 3]] for i in range(12)])
    out = tmp_path / "samples.png"
    assert main(["show", str(pictures), "--labels", str(csv), "--random", "6", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines() if line.split()}
    # every picture with i % 3 >= 1 is a cat, with i % 3 == 2 also a dog; the train split holds some of each
    assert "cat" in rows and "dog" in rows and int(rows["cat"][0]) >= int(rows["dog"][0]) > 0
    assert out.is_file() and out.stat().st_size > 1000
