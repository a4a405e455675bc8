"""`imgclf tune` (issue 16, point 3): Optuna search over train options, the study in a real database shared
by several processes; pruning from the per-epoch figure; a killed worker loses its trial only and a rerun
continues the study; best.yaml reruns the best trial's figure."""

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
from imgclf.errors import EXIT_USAGE

optuna = pytest.importorskip("optuna")

GOOD, BAD = 0.05, 1e-5  # learning rates: learns the tiny classes in an epoch / stays at chance
SPACE = f"""lr: [{GOOD}, {BAD}]
augment: [none, flip]
warmup_epochs: 0  # plain values: every trial's
schedule: constant
"""
VOLATILE = {"images_per_s", "train_seconds", "epoch_seconds", "time"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tunedata")
    write_class_folder(root / "train", ["a", "b", "c"], 12, seed=1)
    write_class_folder(root / "test", ["a", "b", "c"], 4, seed=2)
    (root / "space.yaml").write_text(SPACE)
    return root


def tune_command(tiny: Path, out: Path, storage: str, *extra) -> list[str]:
    return [sys.executable, "-m", "imgclf", "tune", "--space", str(tiny / "space.yaml"), "--data", str(tiny),
            "--device", "cpu", "--precision", "fp32", "--batch-size", "6", "--epochs", "2", "--out", str(out),
            "--storage", storage, "--study", "s", "--startup-trials", "1", "--heartbeat", "1", *map(str, extra)]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def same(a: list[dict], b: list[dict]) -> bool:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in a] == \
        [{k: v for k, v in r.items() if k not in VOLATILE} for r in b]


@pytest.mark.slow
def test_two_workers_share_a_study_prune_and_best_yaml_reruns_the_best(tiny, tmp_path):
    out, storage = tmp_path / "search", f"sqlite:///{tmp_path / 'tune.db'}"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    for lr, augment in ((GOOD, "none"), (GOOD, "flip"), (BAD, "none"), (BAD, "flip")):  # in this order
        study.enqueue_trial({"lr": lr, "augment": augment})
    workers = [subprocess.Popen(tune_command(tiny, out, storage, "--trials", 5), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for w, (stdout, stderr) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, stderr[-3000:]
        assert stdout.splitlines()[0].split()[:3] == ["trial", "state", "val_acc"]  # the study's table
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    states = [t.state.name for t in trials]
    assert set(states) <= {"COMPLETE", "PRUNED"} and 5 <= len(trials) <= 6, states  # 6: both began a 5th
    # shared: both processes ran trials; none twice: each trial's run folder trained once, by its worker
    workers_of = {t.number: t.user_attrs["worker"] for t in trials}
    assert len(set(workers_of.values())) == 2, workers_of
    for t in trials:
        run = out / f"trial-{t.number}"
        assert [r["epoch"] for r in records(run)] == list(range(1, len(t.intermediate_values) + 1))
        status = json.loads((run / "status.json").read_text())
        assert str(status["pid"]) == workers_of[t.number].rpartition(":")[2]
        assert status["status"] == {"COMPLETE": "finished", "PRUNED": "stopped"}[t.state.name]
    # the bad learning rate, after a good trial finished, is pruned after its first epoch
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned and all(t.params["lr"] == BAD and len(t.intermediate_values) == 1 for t in pruned)
    assert any(t.number == 2 for t in pruned)
    # best.yaml, plots; `train --config best.yaml` reproduces the best trial's figure for the same seed
    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: (t.value, -t.number))
    for name in ("history.png", "importances.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run_cli("train", "--config", out / "best.yaml")
    assert r.returncode == 0, r.stderr
    again = records(out / "best")
    assert max(x["val_acc"] for x in again) == best.value
    assert same(again, records(out / f"trial-{best.number}"))


@pytest.mark.slow
def test_a_killed_worker_loses_only_its_trial_and_a_rerun_continues(tiny, tmp_path):
    out, storage = tmp_path / "search", f"sqlite:///{tmp_path / 'tune.db'}"
    worker = subprocess.Popen(tune_command(tiny, out, storage, "--trials", 2, "--epochs", 500),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "trial-0" / "metrics.jsonl").is_file():  # trial 0 is training
            assert worker.poll() is None and time.time() < deadline
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert optuna.load_study(study_name="s", storage=storage).trials[0].state.name == "RUNNING"
    time.sleep(2.5)  # its heartbeat (1 s) is now older than the grace period (2 s)
    rerun = subprocess.run(tune_command(tiny, out, storage, "--trials", 2, "--epochs", 1), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "trial 0 was lost" in rerun.stderr
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.state.name for t in trials][0] == "FAIL"
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 2  # the lost one is not counted
    assert (out / "best.yaml").is_file()
    r = run_cli("runs", out, "--json")
    status = {json.loads(line)["name"]: json.loads(line)["status"] for line in r.stdout.splitlines()}
    assert status["trial-0"] == "crashed"


@pytest.mark.parametrize(("space", "words"), [
    ("lrr: [0.1, 0.2]\n", "unknown key 'lrr'; did you mean 'lr'?"),
    ("lr: {low: 1, high: 0.1}\n", "lr: low must be below high"),
    ("lr: {low: 0, high: 1, log: true}\n", "lr: log needs low above 0"),
    ("lr: {low: 0.1, hi: 1}\n", "a range is {low: X, high: Y}"),
    ("augment: {low: 1, high: 2}\n", "search it as a list of choices"),
    ("augment: [flip, flp]\n", "augment: 'flp' is not one of"),
    ("out: [a, b]\n", "out cannot be searched"),
    ("lr: 0.1\n", "searches nothing"),
    ("[1, 2]\n", "must be a mapping"),
])
def test_a_bad_search_space_is_one_line(tmp_path, capsys, space, words):
    (tmp_path / "space.yaml").write_text(space)
    assert main(["tune", "--space", str(tmp_path / "space.yaml"), "--out", str(tmp_path / "t")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and str(tmp_path / "space.yaml") in err[0], err
    assert not (tmp_path / "t").exists()


def test_a_range_beyond_what_the_option_takes_is_one_line_before_any_trial(tiny, tmp_path, capsys):
    (tmp_path / "space.yaml").write_text("momentum: {low: 0.5, high: 1.5}\n")
    assert main(["tune", "--space", str(tmp_path / "space.yaml"), "--data", str(tiny), "--storage",
                 f"sqlite:///{tmp_path / 'db'}", "--out", str(tmp_path / "t")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "search space momentum: --momentum must be in [0, 1), got 1.5" in err[0], err
    assert not (tmp_path / "t").exists()


def test_a_storage_that_cannot_be_opened_is_one_line(tiny, tmp_path, capsys):
    assert main(["tune", "--space", str(tiny / "space.yaml"), "--data", str(tiny), "--storage", "nosuchdb://x",
                 "--out", str(tmp_path / "t")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot open the study 't' in nosuchdb://x" in err[0], err


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_diverged_trial_fails_and_the_search_goes_on(tiny, tmp_path, capsys):
    (tmp_path / "space.yaml").write_text("lr: [1.0e+9]\n")
    storage = f"sqlite:///{tmp_path / 'db'}"
    assert main(["tune", "--space", str(tmp_path / "space.yaml"), "--data", str(tiny), "--device", "cpu",
                 "--batch-size", "6", "--epochs", "1", "--trials", "2", "--storage", storage,
                 "--out", str(tmp_path / "t")]) == 0
    out, err = capsys.readouterr()
    trials = optuna.load_study(study_name="t", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]  # both ran: the first failure did not end it
    assert all("training diverged" in t.user_attrs["ended"] for t in trials)
    assert "trial 0 fail" in err and "no trial of the study 't' has finished yet" in err
    assert "Traceback" not in err and out.count("fail") == 2  # the table


@pytest.mark.slow
def test_each_trial_a_torchrun_job(tiny, tmp_path):
    """--nproc-per-node 2: every trial trains as two gloo processes; pruning stops the job (SIGTERM)."""
    out, storage = tmp_path / "search", f"sqlite:///{tmp_path / 'tune.db'}"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    for lr in (GOOD, BAD):
        study.enqueue_trial({"lr": lr, "augment": "none"})
    r = subprocess.run([*tune_command(tiny, out, storage, "--trials", 2, "--nproc-per-node", 2, "--epochs", 40)],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("world size 2") == 2
    first, second = optuna.load_study(study_name="s", storage=storage).trials
    assert (first.state.name, second.state.name) == ("COMPLETE", "PRUNED")
    assert first.value == max(x["val_acc"] for x in records(out / "trial-0"))
    assert [x["epoch"] for x in records(out / "trial-0")] == list(range(1, 41))
    # pruned after epoch 1, its job stopped by SIGTERM well before its 40th: saved, resumable
    assert json.loads((out / "trial-1" / "status.json").read_text())["status"] == "stopped", r.stderr[-3000:]
    assert len(records(out / "trial-1")) < 40


def test_the_search_direction_is_the_tasks(monkeypatch):
    from imgclf.tasks import SingleLabel
    from imgclf.tune import direction_of

    assert (direction_of("val_loss"), direction_of("val_acc"), direction_of("val_macro_f1")) == (
        "minimize", "maximize", "maximize")
    monkeypatch.setattr(SingleLabel, "monitors", {"val_loss": True})  # the task says, not the figure's name
    assert direction_of("val_loss") == "maximize"


OPEN_AT = """
import sys, time
from pathlib import Path
from imgclf.errors import UserError
from imgclf.tune import Search, open_study
search = Search(given={}, recipe="", space=[], fixed={}, out=Path("."), storage=sys.argv[1], study="s")
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    open_study(search, "maximize")
    print("ok")
except UserError as err:
    print(err)
"""


@pytest.mark.slow  # processes importing Optuna: about 10 s
def test_workers_started_together_on_a_new_database_all_open_the_study(tmp_path):
    """Issue 24.22: all but one stopped with "table alembic_version already exists" (or its UNIQUE)."""
    for attempt in range(2):
        url, at = f"sqlite:///{tmp_path / f'new{attempt}.db'}", time.time() + 8  # after every import
        workers = [subprocess.Popen([sys.executable, "-c", OPEN_AT, url, str(at)], stdout=subprocess.PIPE,
                                    text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
                   for _ in range(4)]
        said = [w.communicate(timeout=120)[0].strip() for w in workers]
        assert said == ["ok"] * 4, said
