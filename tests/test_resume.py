"""Exact resume (issue 3, point 1): 4 epochs straight == 2 epochs, stop, resume to 4, bit for bit on CPU.

Runs go through `imgclf.cli.main` in this process (the CLI's own code path, without a second interpreter
start-up per run); test_signals.py and test_atomic.py cover real processes stopped by signals.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_class_folder

from imgclf.cli import main
from imgclf.errors import EXIT_USAGE

VOLATILE = {"images_per_s", "train_seconds", "epoch_seconds", "time"}  # wall-clock figures: the only fields that may differ


pytestmark = pytest.mark.usefixtures("one_thread")


def train(capsys, *args) -> tuple[int, str]:
    # fp32: these runs share one process, where oneDNN's bf16 kernel choices can depend on what ran before
    # (test_signals.py and test_atomic.py resume bf16 runs bit for bit across processes)
    code = main(["train", "--device", "cpu", "--precision", "fp32", *map(str, args)])
    return code, capsys.readouterr().err


def load(run: Path, name: str = "last.pt") -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def assert_same_state(a: dict, b: dict) -> None:
    assert_same_tensors(a["state_dict"], b["state_dict"])
    oa, ob = a["optimizer"]["state"], b["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for key in oa:
        assert_same_tensors(oa[key], ob[key])
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert (a["epoch"], a["step"], a["best_score"]) == (b["epoch"], b["step"], b["best_score"])
    assert {k: v for k, v in a["metrics"].items() if k not in VOLATILE} == \
        {k: v for k, v in b["metrics"].items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """33 train pictures: with --batch-size 8 the last train batch would hold 1 picture (dropped)."""
    root = tmp_path_factory.mktemp("resume-data")
    write_class_folder(root / "train", ["a", "b", "c"], 11, seed=1)
    write_class_folder(root / "test", ["a", "b", "c"], 5, seed=2)
    return root


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory) -> dict:
    """tutorial_cnn: 4 epochs straight, and 2 + 2 with --stop-after and --resume (outputs kept for checks)."""
    out = tmp_path_factory.mktemp("resume-runs")
    common = ["--data", folder, "--epochs", 4, "--seed", 0, "--batch-size", 8, "--device", "cpu", "--precision", "fp32"]
    codes = [main(["train", *map(str, common), "--out", str(out / "full")])]
    codes.append(main(["train", *map(str, common), "--out", str(out / "part"), "--stop-after", "2"]))
    after_two = load(out / "part")
    codes.append(main(["train", "--resume", str(out / "part")]))
    return {"full": out / "full", "part": out / "part", "codes": codes, "after_two": after_two}


@pytest.mark.slow  # over a second (a training or a real process): the fast tier stays under a minute
def test_four_epochs_equal_two_plus_two_bit_for_bit(runs):
    assert runs["codes"] == [0, 0, 0]
    assert runs["after_two"]["epoch"] == 2 and runs["after_two"]["step"] == 0
    full, part = load(runs["full"]), load(runs["part"])
    assert full["epoch"] == part["epoch"] == 4
    assert_same_state(full, part)
    assert_same_state(load(runs["full"], "best.pt"), load(runs["part"], "best.pt"))
    assert records(runs["full"]) == records(runs["part"])
    assert [r["epoch"] for r in records(runs["part"])] == [1, 2, 3, 4]
    # the run really learnt something, so "equal" is not "equal because nothing moved"
    assert not torch.equal(full["state_dict"]["features.0.weight"], runs["after_two"]["state_dict"]["features.0.weight"])


def test_stop_after_prints_the_resume_command(folder, tmp_path, capsys):
    code, err = train(capsys, "--data", folder, "--epochs", 3, "--batch-size", 8, "--out", tmp_path / "r",
                      "--stop-after", 1)
    assert code == 0
    assert f"resume with: imgclf train --resume {tmp_path / 'r'}" in err
    assert load(tmp_path / "r")["epoch"] == 1


@pytest.mark.slow
def test_batchnorm_and_dropout_model_resumes_exactly(tmp_path, capsys):
    """mobilenet_v3_small has BatchNorm (down to 1x1 maps, where a batch of one cannot train) and dropout
    (which draws from the global RNG, so the RNG state must travel in the checkpoint)."""
    data = tmp_path / "data"
    write_class_folder(data / "train", ["a", "b", "c"], 5, seed=3)  # 15 = 2 x 7 + 1: the last 1 is dropped
    write_class_folder(data / "test", ["a", "b", "c"], 5, seed=4)  # eval batches of 7, 7 and 1 (eval mode)
    common = ["--data", data, "--model", "mobilenet_v3_small", "--img-size", 16, "--epochs", 2, "--batch-size", 7,
              "--eval-batch-size", 7, "--seed", 1, "--lr", 0.01]
    assert train(capsys, *common, "--out", tmp_path / "full")[0] == 0
    assert train(capsys, *common, "--out", tmp_path / "part", "--stop-after", 1)[0] == 0
    code, err = train(capsys, "--resume", tmp_path / "part")
    assert code == 0, err
    assert_same_state(load(tmp_path / "full"), load(tmp_path / "part"))
    assert records(tmp_path / "full") == records(tmp_path / "part")


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("imgclf: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.slow  # its fixture (runs) trains for the slow test above anyway; ~2 s of fast-tier setup
def test_resuming_a_finished_run_says_so(runs, capsys):
    code, err = train(capsys, "--resume", runs["full"])
    assert code == EXIT_USAGE
    assert "already finished 4/4 epochs" in one_line(err)


@pytest.mark.slow
def test_resuming_with_a_larger_epoch_count_continues(runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "more"
    shutil.copytree(runs["full"], run)
    code, err = train(capsys, "--resume", run, "--epochs", 5)
    assert code == 0, err
    assert load(run)["epoch"] == 5
    assert [r["epoch"] for r in records(run)] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_resume_refuses_a_contradicting_model(runs, capsys):
    before = (runs["part"] / "checkpoints" / "last.pt").read_bytes()
    code, err = train(capsys, "--resume", runs["part"], "--model", "resnet18", "--epochs", 6)
    assert code == EXIT_USAGE
    assert "--model resnet18 contradicts the run being resumed (it used tutorial_cnn)" in one_line(err)
    assert (runs["part"] / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.slow
def test_resume_refuses_other_classes(runs, tmp_path, capsys):
    other = tmp_path / "other"
    write_class_folder(other / "train", ["cat", "dog"], 4)
    write_class_folder(other / "test", ["cat", "dog"], 2)
    code, err = train(capsys, "--resume", runs["part"], "--data", other, "--epochs", 6)
    assert code == EXIT_USAGE
    line = one_line(err)
    assert "was trained on classes ['a', 'b', 'c']" in line and "['cat', 'dog']" in line


def test_resume_of_nothing_says_so(tmp_path, capsys):
    code, err = train(capsys, "--resume", tmp_path / "nowhere")
    assert code == EXIT_USAGE
    assert "nothing to resume" in one_line(err)


@pytest.mark.slow
def test_starting_over_an_existing_run_is_refused(runs, folder, capsys):
    code, err = train(capsys, "--data", folder, "--out", runs["full"])
    assert code == EXIT_USAGE
    assert f"--resume {runs['full']}" in one_line(err)


def test_a_last_train_batch_of_one_is_dropped_and_evaluation_keeps_every_picture():
    from imgclf.cache import Split
    from imgclf.loader import BatchLoader
    from imgclf.transforms import BatchTransform

    def sizes(n: int, train: bool) -> list[int]:
        split = Split(torch.zeros(n, 3, 8, 8, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64))
        loader = BatchLoader(split, batch_size=7, transform=BatchTransform((0.5,) * 3, (0.25,) * 3), train=train,
                             device=torch.device("cpu"))
        got = [len(y) for _, y, _ in loader.epoch(0)]
        assert len(got) == len(loader)
        return got

    assert sizes(15, train=True) == [7, 7]  # 15 = 7 + 7 + 1: BatchNorm cannot train on one picture
    assert sizes(16, train=True) == [7, 7, 2]
    assert sizes(15, train=False) == [7, 7, 1]  # eval mode uses running statistics: nothing is left out


@pytest.mark.slow
def test_fast_recipe_with_lookahead_resumes_exactly(tmp_path, capsys):
    """fastnet with Lookahead averaging (its average travels in the checkpoint), alternating flips and
    shifts, resumed after epoch 1 of 3 with a step count (7) that is not a multiple of the 5-step average."""
    data = tmp_path / "data"
    write_class_folder(data / "train", ["a", "b", "c"], 20, seed=5)
    write_class_folder(data / "test", ["a", "b", "c"], 4, seed=6)
    common = ["--data", data, "--recipe", "records", "--epochs", 3, "--batch-size", 8,
              "--img-size", 16, "--seed", 2]
    assert train(capsys, *common, "--out", tmp_path / "full")[0] == 0
    assert train(capsys, *common, "--out", tmp_path / "part", "--stop-after", 1)[0] == 0
    after_one = load(tmp_path / "part")
    code, err = train(capsys, "--resume", tmp_path / "part")
    assert code == 0, err
    full, part = load(tmp_path / "full"), load(tmp_path / "part")
    assert_same_state(full, part)
    assert_same_tensors(full["lookahead"], part["lookahead"])
    assert not torch.equal(after_one["lookahead"]["head.weight"], full["lookahead"]["head.weight"])
    # the run ends on the average: the final weights are the Lookahead's
    assert_same_tensors({k: full["state_dict"][k] for k in full["lookahead"]}, full["lookahead"])
    assert records(tmp_path / "full") == records(tmp_path / "part")
