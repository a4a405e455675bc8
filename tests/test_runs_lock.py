"""Never lose a run (issue 14, point 1): one training process per run folder (the second is one line naming
the first's PID), no run written into a folder of the user's own files, and only imgclf's own temporary
files removed from a run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_class_folder

from imgclf.cli import main
from imgclf.errors import EXIT_SIGTERM, EXIT_USAGE, UserError
from imgclf.files import RUN_MARK, atomic_write_text, claim_run_folder, remove_temporaries

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lock-data")
    write_class_folder(root / "train", ["a", "b"], 6, seed=1)
    write_class_folder(root / "test", ["a", "b"], 2, seed=2)
    return root


def test_a_held_folder_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with claim_run_folder(run):
        assert (run / RUN_MARK).read_text() == f"{os.getpid()}\n"
        words = rf"^{run} is in use by another imgclf training process \(PID {os.getpid()}\); wait for it"
        with pytest.raises(UserError, match=words), claim_run_folder(run):
            pass
    with claim_run_folder(run):  # released with the block
        pass


def test_a_folder_of_the_users_files_is_refused_and_left_untouched(data, tmp_path, capsys):
    own = tmp_path / "mine"
    own.mkdir()
    files = {"config.json": b'{"my": "settings"}\n', "metrics.jsonl": b'{"my": 1}\n', "holiday.png": b"\x89PNG..",
             ".draft.tmp": b"half a thought"}
    for name, content in files.items():
        (own / name).write_bytes(content)
    code = main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "4", "--device", "cpu",
                 "--out", str(own)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and err.splitlines() == [
        f"imgclf: error: --out {own} is a folder of files that imgclf did not write; imgclf writes a run only into "
        f"a new or empty folder, or its own: choose another --out"]
    assert {p.name: p.read_bytes() for p in own.iterdir()} == files


@pytest.mark.slow
def test_an_empty_folder_takes_a_run_and_a_run_folder_resumes(data, tmp_path, capsys):
    run = tmp_path / "empty"
    run.mkdir()
    flags = ["--data", str(data), "--batch-size", "4", "--device", "cpu", "--lr", "0.01"]
    assert main(["train", *flags, "--epochs", "1", "--out", str(run)]) == 0
    (run / RUN_MARK).unlink()  # a run folder of an imgclf before the mark: known by its config.json
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2
    assert (run / RUN_MARK).is_file()


def test_cleanup_removes_only_imgclf_temporaries(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    atomic_write_text(run / "config.json", "{}")
    left = [run / ".metrics.jsonl.k3j4h5.imgclf-tmp", run / "checkpoints" / ".last.pt.zz81x.imgclf-tmp"]
    mine = [run / ".notes.tmp", run / "checkpoints" / ".copy.pt.tmp", run / "draft.imgclf-tmp"]
    for path in left + mine:
        path.write_text("x")
    remove_temporaries(run)
    assert [p.exists() for p in left] == [False, False]
    assert all(p.exists() for p in mine)


def _cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imgclf", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for(condition, proc: subprocess.Popen, seconds: float = 300) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_trainers_on_one_out_the_second_is_refused_and_the_first_run_is_whole(data, tmp_path):
    """Two real `imgclf train` processes, one --out: the second ends at once with one line naming the first's
    PID, for a new run and for --resume; the first run goes on, its files its own."""
    run = tmp_path / "run"
    flags = ["--data", data, "--batch-size", "4", "--device", "cpu", "--out", run]
    first = _cli("train", *flags, "--epochs", "10000", "--lr", "0.01")
    try:
        _wait_for(lambda: (run / "checkpoints" / "last.pt").is_file(), first)
        for second_args in (("train", *flags, "--epochs", "3", "--lr", "0.02"), ("train", "--resume", run)):
            second = _cli(*second_args)
            out, err = second.communicate(timeout=300)
            assert second.returncode == EXIT_USAGE, err
            assert err.splitlines() == [f"imgclf: error: {run} is in use by another imgclf training process "
                                        f"(PID {first.pid}); wait for it to end, or choose another --out"]
            assert first.poll() is None
        epochs = len((run / "metrics.jsonl").read_text().splitlines())
        _wait_for(lambda: len((run / "metrics.jsonl").read_text().splitlines()) > epochs + 1, first)
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=300)
    assert first.returncode == EXIT_SIGTERM, err
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.01
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1))
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["config"]["optim"]["lr"] == 0.01 and ckpt["epoch"] == len(records)
    assert not [p for p in run.rglob("*") if p.name.endswith("tmp")]
