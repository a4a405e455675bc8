"""--val-every N (issue 26, point 1): the held-out split is evaluated after every Nth epoch and always after
the run's last one (and the last before a resumable stop); N = 0: after the last one only. The epochs in
between have records without val_* figures, best.pt and --patience go by the evaluated epochs only, and the
training itself is the same whatever N is.

Runs go through `imgclf.cli.main` in this process, as tests/test_resume.py's do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_class_folder

from imgclf.cli import main
from imgclf.config import TrainConfig, idle_options
from imgclf.errors import EXIT_USAGE

VOLATILE = {"images_per_s", "train_seconds", "epoch_seconds", "time"}  # wall-clock figures
EPOCHS = 5

pytestmark = pytest.mark.usefixtures("one_thread")


def train(*args) -> int:
    # fp32: these runs share one process, where oneDNN's bf16 kernel choices can depend on what ran before
    return main(["train", "--device", "cpu", "--precision", "fp32", *map(str, args)])


def records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def evaluated(run: Path) -> list[int]:
    return [r["epoch"] for r in records(run) if any(k.startswith("val_") for k in r)]


def without_val(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("val_")}


def load(run: Path, name: str) -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("val-every-data")
    write_class_folder(root / "train", ["a", "b", "c"], 11, seed=1)
    write_class_folder(root / "test", ["a", "b", "c"], 5, seed=2)
    return root


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory) -> dict[str, Path]:
    """Five epochs evaluated after each (the default), every second, only the last; and every second with
    --stop-after 3, then resumed to the end."""
    out = tmp_path_factory.mktemp("val-every-runs")
    common = ["--data", folder, "--epochs", EPOCHS, "--seed", 0, "--batch-size", 8, "--no-calibrate"]
    paths = {name: out / name for name in ("every", "two", "zero", "part")}
    assert train(*common, "--out", paths["every"]) == 0
    assert train(*common, "--out", paths["two"], "--val-every", 2) == 0
    assert train(*common, "--out", paths["zero"], "--val-every", 0) == 0
    assert train(*common, "--out", paths["part"], "--val-every", 2, "--stop-after", 3) == 0
    paths["stopped"] = json.loads((paths["part"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert train("--resume", paths["part"]) == 0
    return paths


@pytest.mark.slow  # the module's trainings (`runs`) take ~3 s
def test_every_second_epoch_and_the_last_are_evaluated(runs):
    assert evaluated(runs["every"]) == [1, 2, 3, 4, 5]
    assert evaluated(runs["two"]) == [2, 4, 5]
    two, every = records(runs["two"]), records(runs["every"])
    assert [r["epoch"] for r in two] == [1, 2, 3, 4, 5]
    # no figure invented: an epoch not evaluated has none; the evaluated ones are the default run's exactly,
    # and the training figures of every epoch too (evaluating draws no random numbers)
    assert [without_val(r) for r in two] == [without_val(r) for r in every]
    assert [r for r in two if "val_acc" in r] == [every[1], every[3], every[4]]


@pytest.mark.slow  # the module's trainings (`runs`) take ~3 s
def test_zero_evaluates_the_last_epoch_only(runs):
    assert evaluated(runs["zero"]) == [EPOCHS]
    assert load(runs["zero"], "best.pt")["epoch"] == EPOCHS
    assert records(runs["zero"])[-1] == records(runs["every"])[-1]


@pytest.mark.slow  # the module's trainings (`runs`) take ~3 s
def test_best_pt_is_the_best_evaluated_epoch(runs):
    scored = [r for r in records(runs["two"]) if "val_acc" in r]
    best = max(scored, key=lambda r: r["val_acc"])  # the first of equal figures
    ckpt, last = load(runs["two"], "best.pt"), load(runs["two"], "last.pt")
    assert ckpt["epoch"] == ckpt["best_epoch"] == best["epoch"] and ckpt["best_score"] == best["val_acc"]
    assert last["epoch"] == EPOCHS and last["metrics"]["epoch"] == EPOCHS
    # --patience's count: the evaluations since the best one (2, 4 and 5 evaluated)
    assert last["waited"] == len([r for r in scored if r["epoch"] > best["epoch"]])
    default = load(runs["every"], "last.pt")  # evaluated after every epoch: the epochs since the best one
    assert default["waited"] == default["epoch"] - default["best_epoch"]


@pytest.mark.slow  # the module's trainings (`runs`) take ~3 s
def test_the_curves_draw_validation_points_only_where_there_are_some(runs):
    from imgclf.visualize import curves_figure

    assert (runs["two"] / "curves.png").is_file()
    figure = curves_figure(records(runs["two"]))
    for ax in figure.axes:
        lines = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
        assert lines == {"train": [1, 2, 3, 4, 5], "val": [2, 4, 5]}


@pytest.mark.slow  # the module's trainings (`runs`) take ~3 s
def test_a_stopped_run_ends_on_an_evaluation_and_resumes(runs):
    # --stop-after 3 evaluated epoch 3, off the schedule, so that the stopped run has a last figure
    assert runs["stopped"]["epoch"] == 3 and "val_acc" in runs["stopped"]
    assert evaluated(runs["part"]) == [2, 3, 4, 5]
    assert [without_val(r) for r in records(runs["part"])] == [without_val(r) for r in records(runs["two"])]
    a, b = load(runs["part"], "last.pt")["state_dict"], load(runs["two"], "last.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert load(runs["part"], "best.pt")["epoch"] in (2, 3, 4, 5)


@pytest.mark.slow  # the module's trainings (`runs`) take ~3 s
def test_runs_lists_a_run_evaluated_every_second_epoch(runs):
    from imgclf.runs import summarize

    row = summarize(runs["two"], runs["two"].parent)
    best = max((r for r in records(runs["two"]) if "val_acc" in r), key=lambda r: r["val_acc"])
    assert (row["epochs"], row["status"], row["best"], row["best_epoch"]) == (5, "finished", best["val_acc"],
                                                                             best["epoch"])


def test_patience_counts_evaluations(folder, tmp_path, capsys):
    """A learning rate too small to change a prediction: epoch 2 sets the mark, epoch 4 (the next
    evaluation) does not beat it, and --patience 1 ends the run there."""
    assert train("--data", folder, "--epochs", 9, "--batch-size", 8, "--lr", 1e-12, "--val-every", 2,
                 "--patience", 1, "--no-calibrate", "--out", tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert evaluated(tmp_path / "run") == [2, 4] and records(tmp_path / "run")[-1]["epoch"] == 4
    assert "has not improved for 1 evaluations" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--val-every", "-1"], "--val-every must be at least 0, got -1"),
    (["--val-every", "0", "--patience", "2"], "--patience would change nothing here: with --val-every 0 only "
                                              "the last epoch is evaluated, so there is nothing to wait for; drop it"),
    (["--val-every", "2", "--patience", "4"], "--patience would change nothing here: a run of --epochs 10 "
                                              "evaluated every 2 epochs ends before it could wait 4 evaluations"),
])
def test_bad_values_are_one_line(folder, tmp_path, capsys, args, message):
    assert train("--data", folder, "--epochs", 10, "--out", tmp_path / "run", *args) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_a_bad_value_is_one_line_from_a_process_and_a_file(folder, tmp_path):
    r = run_cli("train", "--data", folder, "--val-every", "-3", "--out", tmp_path / "run")
    assert r.returncode == EXIT_USAGE and r.stderr.strip() == "imgclf: error: --val-every must be at least 0, got -3"
    (tmp_path / "run.yaml").write_text("val_every: 1.5\n")
    r = run_cli("train", "--config", tmp_path / "run.yaml", "--data", folder, "--out", tmp_path / "run")
    assert r.returncode == EXIT_USAGE and len(r.stderr.strip().splitlines()) == 1 and "val_every" in r.stderr


def test_the_option_is_in_the_configuration_and_its_default_changes_nothing(tmp_path, capsys):
    assert TrainConfig().run.val_every == 1
    assert main(["train", "--print-config"]) == 0
    assert "\nval_every: 1\n" in capsys.readouterr().out
    (tmp_path / "run.yaml").write_text("val_every: 3\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--print-config"]) == 0
    assert "\nval_every: 3\n" in capsys.readouterr().out
    # the default's --patience rule is the one of before: the wait must run out before the last epoch
    for patience, idle in ((8, False), (9, True)):
        cfg = TrainConfig.from_dict({"optim": {"epochs": 10, "patience": patience}})
        assert ("--patience" in idle_options(cfg)) is idle


@pytest.mark.slow  # imports Optuna
def test_tune_reports_the_evaluated_epochs_only(folder, tmp_path):
    optuna = pytest.importorskip("optuna")
    (tmp_path / "space.yaml").write_text("lr: [0.05]\n")
    storage = f"sqlite:///{tmp_path / 'db'}"
    assert main(["tune", "--space", str(tmp_path / "space.yaml"), "--data", str(folder), "--device", "cpu",
                 "--precision", "fp32", "--batch-size", "8", "--epochs", "3", "--val-every", "2", "--trials", "1",
                 "--storage", storage, "--out", str(tmp_path / "t")]) == 0
    (trial,) = optuna.load_study(study_name="t", storage=storage).trials
    assert trial.state.name == "COMPLETE" and sorted(trial.intermediate_values) == [2, 3]
    assert trial.value == max(trial.intermediate_values.values())
