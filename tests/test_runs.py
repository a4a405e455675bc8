"""`imgclf runs` (issue 16, point 4): the runs under a folder with their status, from what runs write
(config.json, metrics.jsonl, checkpoints, status.json); sortable, --json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli, write_class_folder

from imgclf.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runsdata")
    write_class_folder(root / "train", ["a", "b", "c"], 6, seed=1)
    write_class_folder(root / "test", ["a", "b", "c"], 3, seed=2)
    return root


def train(tiny, out: Path, *args) -> int:
    return main(["train", "--data", str(tiny), "--batch-size", "6", "--device", "cpu", "--precision", "fp32",
                 "--out", str(out), *map(str, args)])


def listed(capsys, folder: Path, *args) -> list[dict]:
    assert main(["runs", str(folder), "--json", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> Path:
    """finished (2 epochs), stopped (1 of 3 by --stop-after), crashed (diverged), and a nested finished run
    with --monitor val_loss; one run of an older imgclf, without status.json."""
    root = tmp_path_factory.mktemp("runs")
    assert train(tiny, root / "done", "--epochs", 2, "--lr", 0.02) == 0
    assert train(tiny, root / "part", "--epochs", 3, "--stop-after", 1) == 0
    assert train(tiny, root / "boom", "--epochs", 2, "--lr", 1e9) != 0
    assert train(tiny, root / "tune" / "trial-0", "--epochs", 1, "--monitor", "val_loss", "--model",
                 "fastnet") == 0
    assert train(tiny, root / "old", "--epochs", 2, "--stop-after", 1) == 0
    (root / "old" / "status.json").unlink()
    return root


@pytest.mark.slow  # over a second (a training or a real process): the fast tier stays under a minute
def test_each_run_has_its_status_epochs_and_best_figure(runs, capsys):
    rows = {r["name"]: r for r in listed(capsys, runs)}
    assert set(rows) == {"done", "part", "boom", "old", os.path.join("tune", "trial-0")}
    assert {name: r["status"] for name, r in rows.items()} == {
        "done": "finished", "part": "stopped", "boom": "crashed", "old": "stopped",
        os.path.join("tune", "trial-0"): "finished"}
    done = rows["done"]
    metrics = [json.loads(line) for line in (runs / "done" / "metrics.jsonl").read_text().splitlines()]
    assert (done["epochs"], done["planned_epochs"], done["model"]) == (2, 2, "tutorial_cnn")
    assert done["best"] == max(r["val_acc"] for r in metrics) and done["time"] > 0
    trial = rows[os.path.join("tune", "trial-0")]
    assert (trial["monitor"], trial["model"], trial["lower_is_better"]) == ("val_loss", "fastnet", True)
    assert rows["boom"]["epochs"] == 0 and rows["boom"]["best"] is None
    status = json.loads((runs / "boom" / "status.json").read_text())
    assert status["status"] == "crashed" and "diverged" in status["message"]


@pytest.mark.slow  # its fixture (runs) trains for the slow test above anyway; ~2 s of fast-tier setup
def test_sorting_and_the_table(runs, capsys):
    assert [r["name"] for r in listed(capsys, runs, "--sort", "status")][:1] == ["boom"]
    by_epochs = [r["epochs"] for r in listed(capsys, runs, "--sort", "epochs")]
    assert by_epochs == sorted(by_epochs)
    assert main(["runs", str(runs)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["run", "model", "data", "epochs", "best", "time", "status"]
    assert len(lines) == 6 and "5 runs under" in err
    assert any(line.startswith("done") and "2/2" in line and line.endswith("finished") for line in lines)


def test_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"imgclf: error: no such folder: {tmp_path / 'nope'}"


@pytest.mark.slow
def test_a_live_run_is_running_and_a_killed_one_crashed(tiny, tmp_path):
    """A real training process: `imgclf runs` sees it running; SIGKILLed (no chance to say so), crashed."""
    out = tmp_path / "runs" / "live"
    # a low --lr: at the default, these 18 pictures diverge within a few epochs, and a diverged run has ended
    proc = subprocess.Popen([sys.executable, "-m", "imgclf", "train", "--data", str(tiny), "--epochs", "500", "--lr", "0.001",
                             "--batch-size", "6", "--device", "cpu", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.2)
        r = run_cli("runs", tmp_path / "runs", "--json")
        assert json.loads(r.stdout)["status"] == "running", r.stdout + r.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = run_cli("runs", tmp_path / "runs", "--json")
    assert json.loads(r.stdout)["status"] == "crashed"
