"""Issue 5: torchrun with 2 gloo processes gives what one process gives, writes one set of logs, and
ends with a clear error when a process dies."""

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
from conftest import run_cli, write_class_folder

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "imgclf"]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    classes = ["a", "b", "c"]
    write_class_folder(root / "train", classes, 24, seed=3)  # 72 pictures: global batches 16,16,16,16,8
    write_class_folder(root / "test", classes, 9, seed=4)  # 27: ranks evaluate 14 and 13, no padding
    return root


def test_two_gloo_processes_match_one(folder, tmp_path):
    common = ["train", "--data", folder, "--epochs", "2", "--batch-size", "16", "--seed", "5", "--device", "cpu",
              "--precision", "fp32"]  # bf16 would round the two processes' partial sums differently
    single, double = tmp_path / "single", tmp_path / "double"
    r1 = run_cli(*common, "--out", single, env={"OMP_NUM_THREADS": "1"})
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([*TORCHRUN, *map(str, common), "--out", str(double)], capture_output=True, text=True,
                        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "world size 2" in r2.stderr
    a, b = _records(single), _records(double)
    assert [r["val_count"] for r in b] == [27, 27]  # every test picture counted exactly once
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "val_acc", "train_acc"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-4), key
    wa = torch.load(single / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    wb = torch.load(double / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys()  # no `module.` prefixes
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-4)  # gradients summed in another order
    # exactly one set of logs: one event file, one line per epoch, only rank 0's files
    assert len(list(double.glob("events.out.tfevents.*"))) == 1
    assert len(b) == 2
    names = lambda run: sorted(p.name.split(".")[0] for p in run.iterdir())  # noqa: E731 - event names hold pids
    assert names(double) == names(single)
    # the distributed checkpoint serves a single process
    r = run_cli("eval", double / "checkpoints" / "last.pt", "--data", folder, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(b[-1]["val_acc"], abs=1e-9)
    # and resuming under DDP continues it
    r3 = subprocess.run([*TORCHRUN, "train", "--resume", str(double), "--epochs", "3"], capture_output=True,
                        text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert [r["epoch"] for r in _records(double)] == [1, 2, 3]


def test_a_last_batch_too_small_to_share_is_dropped():
    from imgclf.cache import Split
    from imgclf.loader import BatchLoader
    from imgclf.transforms import BatchTransform

    split = Split(torch.zeros(35, 1, 4, 4, dtype=torch.uint8), torch.arange(35))
    common = dict(batch_size=16, transform=BatchTransform((0.0,), (1.0,)), train=True, device=torch.device("cpu"))
    assert len(BatchLoader(split, world=1, **common)) == 3  # 16, 16, 3
    ranks = [BatchLoader(split, world=2, rank=r, **common) for r in (0, 1)]
    assert [[len(y) for _, y, _ in loader.epoch(0)] for loader in ranks] == [[8, 8], [8, 8]]  # 3 -> 2 + 1: dropped


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_killed_process_ends_the_job(folder, tmp_path):
    big = tmp_path / "big"
    write_class_folder(big / "train", ["a", "b"], 600, seed=6, size=32)
    write_class_folder(big / "test", ["a", "b"], 20, seed=7, size=32)
    proc = subprocess.Popen([*TORCHRUN, "train", "--data", str(big), "--epochs", "50", "--batch-size", "8",
                             "--device", "cpu", "--out", str(tmp_path / "run")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        workers: list[int] = []
        while time.time() < deadline and len(workers) < 2:
            workers = _children(proc.pid)
            time.sleep(0.5)
        assert len(workers) == 2, "torchrun did not start two workers"
        time.sleep(8)  # well into training
        os.kill(max(workers), signal.SIGKILL)
        start = time.time()
        output, _ = proc.communicate(timeout=180)
        assert time.time() - start < 180
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "SIGKILL" in output or "failed" in output.lower(), output[-2000:]
