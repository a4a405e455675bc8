"""Interrupts (issue 3, point 3): SIGINT -> 130, SIGTERM -> 143, last.pt saved mid-epoch, the resume
command printed, and the resumed run ends with the very weights of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_class_folder

from imgclf.checkpoint import load_checkpoint
from imgclf.cli import main
from imgclf.errors import EXIT_SIGINT, EXIT_SIGTERM
from imgclf.files import TMP_SUFFIX

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# real training processes, interrupted: the slow tier
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("signal-data")
    write_class_folder(root / "train", ["a", "b", "c"], 11, seed=1)  # 33 pictures: 8 steps of 4 per epoch
    write_class_folder(root / "test", ["a", "b", "c"], 4, seed=2)
    return root


def args(folder: Path, out: Path) -> list[str]:
    return ["train", "--data", str(folder), "--epochs", "6", "--batch-size", "4", "--seed", "3", "--lr", "0.01",
            "--device", "cpu", "--out", str(out)]


def interrupt(folder: Path, out: Path, signals: list[int]) -> tuple[int, str]:
    """Start training, wait until it reports a step (the handlers are installed then), send `signals`."""
    proc = subprocess.Popen([sys.executable, "-m", "imgclf", *args(folder, out)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=ENV)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if " step " in line:
                for sig in signals:
                    proc.send_signal(sig)
                break
        seen.append(proc.stderr.read())
        proc.wait(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, "".join(seen)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> dict:
    """The same run, never interrupted."""
    out = tmp_path_factory.mktemp("signal-ref") / "run"
    assert main(args(folder, out)) == 0
    return {"ckpt": load_checkpoint(out / "checkpoints" / "last.pt"), "records": records(out)}


def records(run: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock figures."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "train_seconds", "epoch_seconds", "time")}
            for line in lines]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, EXIT_SIGINT), (signal.SIGTERM, EXIT_SIGTERM)],
                         ids=["SIGINT", "SIGTERM"])
def test_signal_saves_prints_resume_and_the_resumed_run_is_exact(folder, reference, tmp_path, sig, code):
    run = tmp_path / "run"
    rc, err = interrupt(folder, run, [sig])
    assert rc == code, err
    name = signal.Signals(sig).name
    assert f"{name} received; finishing this step and saving" in err
    # Sent after a step of epoch 1 was reported; where it lands depends on the scheduler: usually mid-epoch,
    # at worst after an epoch's last step (then saved as the end of that epoch).
    where = re.search(rf"imgclf: stopped by {name} (at epoch (\d+), step (\d+)|after epoch (\d+));", err)
    assert where, err
    assert f"resume with: imgclf train --resume {run}" in err
    assert "Traceback" not in err
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")  # weights_only=True inside
    if where.group(2):  # mid-epoch: epochs done, and the steps done of the stopped one
        assert (ckpt["epoch"], ckpt["step"]) == (int(where.group(2)) - 1, int(where.group(3)))
        assert 1 <= ckpt["step"] <= 8
    else:
        assert (ckpt["epoch"], ckpt["step"]) == (int(where.group(4)), 0)
    assert main(["train", "--resume", str(run)]) == 0
    final = load_checkpoint(run / "checkpoints" / "last.pt")
    assert final["epoch"] == 6
    assert_same_weights(final["state_dict"], reference["ckpt"]["state_dict"])
    # the interrupted epoch's train loss and accuracy cover all of it, as if it had never stopped
    assert records(run) == reference["records"]


def test_second_ctrl_c_abandons_at_once(folder, tmp_path):
    run = tmp_path / "run"
    rc, err = interrupt(folder, run, [signal.SIGINT, signal.SIGINT])
    assert rc == EXIT_SIGINT, err
    assert "Traceback" not in err
    last = run / "checkpoints" / "last.pt"
    # Abandoned at once (nothing saved in the first epoch), or, had the step ended between the two signals,
    # saved: never a broken or half-written file.
    assert "imgclf: interrupted" in err or "resume with:" in err
    if last.exists():
        load_checkpoint(last)
    assert not list(run.glob(f"**/.*{TMP_SUFFIX}"))
