"""MLflow tracking (issue 16, point 2) against a real tracking server on loopback (SQLite backend store, a
local artifact folder): parameters, both epochs' metrics, pictures and best.pt as artifacts, the run's
status; a stopped-then-resumed run is one MLflow run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import write_class_folder

from imgclf.cli import main
from imgclf.errors import EXIT_USAGE

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1: its URI; stopped at the end."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_bin)] if mlflow_bin.exists() else [sys.executable, "-m", "mlflow"]
    log = open(root / "server.log", "w")  # noqa: SIM115 - open for the server's life
    proc = subprocess.Popen([*command, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlflowdata")
    write_class_folder(root / "train", ["cat", "dog", "red fox"], 6, seed=1)
    write_class_folder(root / "test", ["cat", "dog", "red fox"], 3, seed=2)
    return root


def train(tiny, out: Path, *args) -> int:
    return main(["train", "--data", str(tiny), "--batch-size", "6", "--device", "cpu", "--precision", "fp32",
                 "--out", str(out), *map(str, args)])


def artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for f in client.list_artifacts(run_id, path):
        found |= artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return found


def run_id(out: Path) -> str:
    return json.loads((out / "mlflow.json").read_text())["run_id"]


@pytest.mark.slow
def test_two_epochs_params_metrics_and_artifacts(server, tiny, tmp_path, capsys):
    out = tmp_path / "two"
    assert train(tiny, out, "--epochs", 2, "--lr", 0.02, "--mlflow", server, "--mlflow-experiment", "two") == 0
    assert "View run" not in capsys.readouterr().out  # MLflow's own words go to stderr: stdout is the user's
    client = mlflow.MlflowClient(server)
    run = client.get_run(run_id(out))
    assert run.info.status == "FINISHED" and run.info.run_name == "two"
    assert client.get_experiment(run.info.experiment_id).name == "two"
    params, tags = run.data.params, run.data.tags
    assert (params["lr"], params["epochs"], params["batch_size"], params["model"]) == ("0.02", "2", "6",
                                                                                       "tutorial_cnn")
    assert params["data"] == str(tiny) and tags["imgclf.model"] == "tutorial_cnn"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "val_acc", "val_loss", "lr", "val_macro_f1"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(r["epoch"], r[key]) for r in records], key
    numbers = {k for k, v in records[-1].items() if isinstance(v, float | int)} - {"epoch", "time"}
    per_class = {f"val_per_class/{c}/{k}" for c, figures in records[-1]["val_per_class"].items() for k in figures}
    assert numbers | per_class == set(run.data.metrics)  # metrics.jsonl's keys, every one
    assert "val_per_class/red fox/f1" in per_class  # a class name as it is
    assert artifacts(client, run.info.run_id) == {"pictures/curves.png", "pictures/confusion.png",
                                                 "pictures/mistakes.png", "pictures/reliability.png", "checkpoints/best.pt", "config.yaml",
                                                 "metrics.jsonl"}
    local = Path(client.download_artifacts(run.info.run_id, "checkpoints/best.pt", str(tmp_path)))
    assert local.read_bytes() == (out / "checkpoints" / "best.pt").read_bytes()


@pytest.mark.slow
def test_stopped_then_resumed_is_one_mlflow_run(server, tiny, tmp_path, capsys):
    out = tmp_path / "resumed"
    assert train(tiny, out, "--epochs", 3, "--stop-after", 1, "--mlflow", server, "--mlflow-experiment", "rs") == 0
    client = mlflow.MlflowClient(server)
    first = run_id(out)
    assert client.get_run(first).info.status == "KILLED"  # stopped: marked so
    assert main(["train", "--resume", str(out)]) == 0  # no --mlflow: the run's own configuration says where
    assert run_id(out) == first
    run = client.get_run(first)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first, "val_acc")] == [1, 2, 3]
    experiment = client.get_experiment_by_name("rs")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [first]
    assert "checkpoints/best.pt" in artifacts(client, first)
    capsys.readouterr()


@pytest.mark.slow
def test_a_crashed_run_is_failed_and_the_environment_names_the_server(server, tiny, tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    out = tmp_path / "crash"
    assert train(tiny, out, "--epochs", 2, "--lr", 1e9, "--mlflow", "--mlflow-experiment", "crash") == 3
    run = mlflow.MlflowClient(server).get_run(run_id(out))
    assert run.info.status == "FAILED"
    assert json.loads((out / "status.json").read_text())["status"] == "crashed"
    capsys.readouterr()


def test_mlflow_alone_without_the_environment_variable_is_one_line(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert train(tiny, tmp_path / "r", "--epochs", 1, "--mlflow") == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MLFLOW_TRACKING_URI, which is not set" in err[0], err
    assert not (tmp_path / "r" / "checkpoints").exists()  # refused before training
    assert os.environ.get("MLFLOW_TRACKING_URI") is None


def test_a_server_that_does_not_answer_is_one_line_at_once(tiny, tmp_path, capsys):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    assert train(tiny, tmp_path / "r", "--epochs", 1, "--mlflow", f"http://127.0.0.1:{port}") == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no MLflow tracking server answers at http://127.0.0.1:{port}" in err[0], err
    assert time.monotonic() - started < 30 and not (tmp_path / "r").exists()


@pytest.mark.slow  # MLflow's import and stores: a few seconds each
@pytest.mark.parametrize(("uri", "said"), [
    ("notascheme://x", "MLflow knows no such kind of store"),
    ("sqlite:///{tmp}/a-file/mlflow.db", "File exists"),  # a folder that cannot be made: a file is there
    ("file://{tmp}/mlruns", "MLflow refuses a file store unless MLFLOW_ALLOW_FILE_STORE=true is set"),
    ("{tmp}/mlruns", "MLflow refuses a file store unless MLFLOW_ALLOW_FILE_STORE=true is set")])
def test_a_store_mlflow_cannot_use_is_one_line_before_the_run(tiny, tmp_path, monkeypatch, capsys, uri, said):
    """Issue 24.21: these were tracebacks, after the run folder was written."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    (tmp_path / "a-file").write_text("")
    uri = uri.format(tmp=tmp_path)
    assert train(tiny, tmp_path / "r", "--epochs", 1, "--mlflow", uri) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"imgclf: error: MLflow cannot log to --mlflow {uri}: ") and \
        said in err[0], err
    assert not (tmp_path / "r").exists()


def test_a_hostile_earlier_record_is_logged_without_a_traceback():
    """A sibling of 24.19/24.24: a resumed run's earlier metrics.jsonl records go to MLflow; an absurd time or
    an int beyond a float's range was an OverflowError. NaN (a diverged run's loss) is still logged."""
    import math

    from imgclf.mlflowrun import MlflowRun

    class Client:
        def log_batch(self, run_id, metrics=()):
            self.metrics = metrics

    run = MlflowRun(Client(), "r", "u")
    before = int(time.time() * 1000)
    run.log_epoch({"epoch": 1, "time": 1e300, "val_acc": 10**400, "val_loss": float("nan"), "note": "x"})
    (metric,) = run.client.metrics
    assert metric.key == "val_loss" and math.isnan(metric.value) and metric.timestamp >= before
    assert not run.broken
