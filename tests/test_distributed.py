"""Issue 5: torchrun with 2 gloo processes gives what one process gives, writes one set of logs, and
ends with a clear error when a process dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_class_folder

from imgclf.errors import EXIT_DISTRIBUTED

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "imgclf"]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_and_two(common: list, tmp_path: Path) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """`imgclf COMMON` in one process (tmp_path/single) and under torchrun with two (tmp_path/double), both
    succeeding; returns the two run folders and torchrun's result."""
    single, double = tmp_path / "single", tmp_path / "double"
    r1 = run_cli(*common, "--out", single, env={"OMP_NUM_THREADS": "1"})
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([*TORCHRUN, *map(str, common), "--out", str(double)], capture_output=True, text=True,
                        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r2.returncode == 0, r2.stderr[-3000:]
    return single, double, r2


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    classes = ["a", "b", "c"]
    write_class_folder(root / "train", classes, 24, seed=3)  # 72 pictures: global batches 16,16,16,16,8
    write_class_folder(root / "test", classes, 9, seed=4)  # 27: ranks evaluate 14 and 13, no padding
    return root


@pytest.mark.slow
def test_two_gloo_processes_match_one(folder, tmp_path):
    common = ["train", "--data", folder, "--epochs", "2", "--batch-size", "16", "--seed", "5", "--device", "cpu",
              "--precision", "fp32"]  # bf16 would round the two processes' partial sums differently
    single, double, r2 = _one_and_two(common, tmp_path)
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
    # the same files, but for the temperature fit (single process only: under torchrun it is skipped, said)
    assert names(double) == [n for n in names(single) if n not in ("calibration", "reliability")]
    # the distributed checkpoint serves a single process
    r = run_cli("eval", double / "checkpoints" / "last.pt", "--data", folder, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(b[-1]["val_acc"], abs=1e-9)
    # and resuming under DDP continues it
    r3 = subprocess.run([*TORCHRUN, "train", "--resume", str(double), "--epochs", "3"], capture_output=True,
                        text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert [r["epoch"] for r in _records(double)] == [1, 2, 3]



@pytest.mark.slow
def test_two_gloo_processes_match_one_with_several_labels_per_picture(tmp_path):
    """Multi-label under torchrun: every validation picture's probabilities are gathered from both processes
    before average precision and the thresholds are computed, so the figures are one process's."""
    root = tmp_path / "pics"
    write_class_folder(root, ["a", "b", "c"], 24, seed=3)
    # labels: the picture's colour class, and "b" as well on every third picture of "a"
    rows = [f"{p.relative_to(root).as_posix()},{p.parent.name}{' b' if p.parent.name == 'a' and i % 3 == 0 else ''}"
            for i, p in enumerate(sorted(root.rglob("*.png")))]
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,labels\n" + "\n".join(rows) + "\n")
    common = ["train", "--data", root, "--labels", csv, "--epochs", "2", "--batch-size", "16", "--seed", "5",
              "--device", "cpu", "--precision", "fp32", "--cache-dir", tmp_path / "cache"]
    single, double, r2 = _one_and_two(common, tmp_path)
    a, b = _records(single), _records(double)
    assert [r["val_count"] for r in b] == [r["val_count"] for r in a]  # every picture counted once
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "val_map", "val_micro_ap"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-4), key
        assert rb["val_thresholds"] == pytest.approx(ra["val_thresholds"], abs=1e-4)

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


class Output:
    """A process's combined stdout and stderr, read line by line in a thread, so that a test can wait for a line."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append(None)  # end of output
            self.changed.notify_all()

    def wait_for(self, words: str, timeout: float = 300) -> bool:
        """Whether a line holding `words` comes before the output ends (or the generous timeout passes)."""
        with self.changed:
            return self.changed.wait_for(lambda: any(line is None or words in line for line in self.lines),
                                         timeout) and any(line and words in line for line in self.lines)

    def text(self) -> str:
        self.thread.join(timeout=60)
        return "".join(line for line in self.lines if line)


def big_folder(root: Path) -> Path:
    """200 pictures: 25 steps of 8 an epoch, 50 epochs: far more than a test waits for."""
    write_class_folder(root / "train", ["a", "b"], 100, seed=6, size=32)
    write_class_folder(root / "test", ["a", "b"], 20, seed=7, size=32)
    return root


TRAIN_LONG = ["train", "--epochs", "50", "--batch-size", "8", "--device", "cpu"]


@pytest.mark.slow
def test_killed_process_ends_the_job(folder, tmp_path):
    big = big_folder(tmp_path / "big")
    proc = subprocess.Popen([*TORCHRUN, *TRAIN_LONG, "--data", str(big), "--out", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = Output(proc)
    try:
        # well into training: rank 0 reports a step (after both ranks have joined and trained together)
        assert output.wait_for(" step "), output.text()[-3000:]
        workers = _children(proc.pid)
        assert len(workers) == 2, "torchrun did not start two workers"
        os.kill(max(workers), signal.SIGKILL)
        proc.wait(timeout=180)  # the job ends: nothing hangs
    finally:
        if proc.poll() is None:
            proc.kill()
    text = output.text()
    assert proc.returncode != 0
    assert "SIGKILL" in text or "failed" in text.lower(), text[-2000:]
    # torchrun reports the killed worker as the root cause, and then stops the survivor itself (which may
    # print imgclf's message first, or not): the survivor's own exit status is checked without torchrun below.
    assert "exitcode  : -9" in text, text[-2000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("killed", [0, 1], ids=["main-killed", "other-killed"])
def test_the_survivor_of_a_killed_process_exits_4_with_one_line(tmp_path, killed):
    """The two ranks started as torchrun starts them (its environment variables), without torchrun's agent,
    which would stop the survivor itself: the survivor must find out, say so in one line, and exit with
    EXIT_DISTRIBUTED."""
    big = big_folder(tmp_path / "big")
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "imgclf", *TRAIN_LONG, "--data", str(big), "--out",
                                       str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=env))
    outputs = [Output(p) for p in procs]
    survivor = 1 - killed
    try:
        assert outputs[0].wait_for(" step "), outputs[0].text()[-3000:]  # training together
        procs[killed].kill()
        procs[survivor].wait(timeout=180)  # a collective fails at once (gloo), or times out: never a hang
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = outputs[survivor].text()
    assert procs[survivor].returncode == EXIT_DISTRIBUTED, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("imgclf: error: ")]
    assert len(errors) == 1, text[-3000:]
    assert errors[0].startswith(f"imgclf: error: rank {survivor}: another process of the distributed job failed")
    assert errors[0].endswith("the whole job stops") and "Traceback" not in text, text[-3000:]
