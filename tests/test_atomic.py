"""Atomic writes (issue 3, point 2): SIGKILL a training process at many instants, a quarter of them while a
checkpoint is being written and a quarter while any file is; after every kill last.pt/best.pt load with
weights_only=True and metrics.jsonl/config.json are whole. The run, resumed after each kill, ends exactly like
one never killed.

Starting a Python with torch takes seconds, so a driver process imports imgclf once and forks each training
process from it: every child is a real `imgclf train` process (`cli.main` after fork), killed with SIGKILL.
The instants come from the child's progress, not from the clock, so that a fast or a slow machine kills at the
same points: the driver reads the child's stderr line by line, and the child says when it is about to rename a
finished temporary file over a run file, or is halfway through writing a checkpoint, and waits there until the
driver lets it go on (or kills it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_class_folder

from imgclf.files import TMP_SUFFIX

HERE = Path(__file__).resolve().parent
KILLS = 20
EPOCHS = 24  # only the `epochs` kills let the run advance, by 2 epochs at most: it never ends before them
MODES = ("start-up", "checkpoint-write", "epochs", "any-write")
PAUSE = "@@test_atomic pause"  # the child's announcement: PAUSE <half|whole> <temporary file name>
WATCHED = ("config.json", "metrics.jsonl", "best.pt", "last.pt")  # the run files written atomically


@pytest.mark.slow
def test_sigkill_at_random_instants_never_breaks_the_run(tmp_path):
    data = tmp_path / "data"
    write_class_folder(data / "train", ["a", "b", "c"], 11, seed=1)  # 33 pictures, 2 steps of 16 per epoch
    write_class_folder(data / "test", ["a", "b", "c"], 4, seed=2)
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_atomic; test_atomic.driver()"
    proc = subprocess.run([sys.executable, "-c", code, str(data), str(tmp_path), str(KILLS), "20251125"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["problems"] == [], report
    kills = report["kills"]
    assert len(kills) >= KILLS // 2, report
    assert len(kills) == KILLS, report  # every kill is spent before the run ends, however fast the machine
    assert sum(k["writing"].startswith((".last.pt", ".best.pt")) for k in kills) >= 2, report  # mid-save kills
    assert sum(k["writing"].startswith((".last.pt", ".best.pt")) for k in kills) >= KILLS // 4, report
    assert {k["writing"].split(".")[1] for k in kills if k["writing"]} >= {"config", "metrics", "last"}, report
    assert all(k["left"] for k in kills if k["writing"]), report  # killed mid-write: the temporary file was left
    assert len({k["last_epoch"] for k in kills}) >= 3, report  # the kills fell all along the run
    # It ended exactly where a run that was never killed ends (nothing lost, nothing done twice).
    for name in ("last.pt", "best.pt"):
        killed, straight = (torch.load(tmp_path / run / "checkpoints" / name, weights_only=True)
                            for run in ("killed", "straight"))
        assert killed["epoch"] == straight["epoch"] and killed["best_score"] == straight["best_score"], name
        for key, value in straight["state_dict"].items():
            assert torch.equal(value, killed["state_dict"][key]), (name, key)
        if name == "last.pt":
            assert killed["epoch"] == EPOCHS
    volatile = {"images_per_s", "train_seconds", "epoch_seconds", "time"}
    lines = [[{k: v for k, v in json.loads(line).items() if k not in volatile}
              for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("killed", "straight")]
    assert lines[0] == lines[1]


# ---------------------------------------------------------------- the driver (a separate process)

def driver() -> None:
    """argv: DATA OUT KILLS SEED. Prints one JSON line: the kills and any problem found after them."""
    data, out, kills, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    import torch._dynamo  # noqa: F401 - what the children would import at start-up, imported once here
    import torch.utils.tensorboard  # noqa: F401

    import imgclf.train  # noqa: F401
    from imgclf.checkpoint import load_checkpoint
    from imgclf.cli import build_parser

    build_parser()  # imports the subcommand modules

    torch.set_num_threads(1)
    rng = random.Random(seed)
    run = out / "killed"
    args = ["train", "--data", str(data), "--epochs", str(EPOCHS), "--batch-size", "16", "--lr", "0.02",
            "--seed", "5", "--device", "cpu", "--log-every", "1"]
    fresh, resume = [*args, "--out", str(run)], ["train", "--resume", str(run)]
    report: dict = {"kills": [], "problems": []}
    last_epoch = 0

    def check(after: str) -> int:
        """Every file a reader may open is whole; returns the epoch of last.pt (0 if none yet)."""
        epoch = 0
        for name in ("last.pt", "best.pt"):
            path = run / "checkpoints" / name
            if path.exists():
                try:
                    ckpt = load_checkpoint(path)  # torch.load(weights_only=True)
                    torch.load(path, weights_only=True)
                    epoch = ckpt["epoch"] if name == "last.pt" else epoch
                except Exception as err:  # noqa: BLE001 - any failure is the finding
                    report["problems"].append(f"{after}: {name}: {err}")
        for name in ("config.json", "metrics.jsonl"):
            path = run / name
            if path.exists():
                try:
                    lines = [json.loads(line) for line in path.read_text().splitlines()] if name.endswith("l") \
                        else [json.loads(path.read_text())]
                    if name == "metrics.jsonl" and [r["epoch"] for r in lines] != list(range(1, len(lines) + 1)):
                        report["problems"].append(f"{after}: metrics.jsonl epochs {[r['epoch'] for r in lines]}")
                except (ValueError, KeyError) as err:
                    report["problems"].append(f"{after}: {name} is not whole: {err}")
        return epoch

    for i in range(kills):
        if last_epoch == EPOCHS:
            break  # finished between kills
        child = Child(resume if (run / "checkpoints" / "last.pt").exists() else fresh)
        mode = MODES[i % len(MODES)]
        writing = kill_point(child, mode, turn=i // len(MODES), rng=rng)
        if writing is None:
            report["problems"].append(f"kill {i} ({mode}): no progress within {PATIENCE_S} s")
            writing = ""
        status = child.kill()
        left = bool(writing) and any((d / writing).exists() for d in (run, run / "checkpoints"))
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):  # it had ended by itself
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                report["problems"].append(f"kill {i}: the training process failed with exit status {code}")
            last_epoch = check(f"after kill {i - 1}, the run's end")
            break
        epoch = check(f"kill {i} ({mode}, {writing or 'no write'})")
        if epoch < last_epoch:
            report["problems"].append(f"kill {i}: last.pt went back from epoch {last_epoch} to {epoch}")
        last_epoch = epoch
        report["kills"].append({"mode": mode, "writing": writing, "left": left, "last_epoch": epoch})
    last = run / "checkpoints" / "last.pt"
    finish = [] if last_epoch == EPOCHS else [resume if last.exists() else fresh]
    for argv in [*finish, [*args, "--out", str(out / "straight")]]:
        code = os.waitstatus_to_exitcode(os.waitpid(_fork_cli(argv)[0], 0)[1])
        if code != 0:
            report["problems"].append(f"{argv[:3]} exited with {code}")
    check("the end")
    leftovers = _temporaries(run)
    if leftovers:
        report["problems"].append(f"temporary files left behind: {leftovers}")
    print(json.dumps(report), flush=True)


PATIENCE_S = 300  # for one kill point to come: a bound for a stuck child, not a timing the test depends on


def kill_point(child: Child, mode: str, *, turn: int, rng: random.Random) -> str | None:
    """Follow the child's progress up to the point where `mode` kills it on its `turn`-th use, releasing every
    pause before it. Returns the temporary file being written at that point ('' when none), or None when no
    progress came for PATIENCE_S.

    start-up: at the fork, or at the child's first, second or third line of stderr (at random): before any
    epoch ends. epochs: 1-3 lines (at random) after the first or second epoch is saved (last.pt renamed):
    these kills let the run advance. checkpoint-write: at the 1st, 2nd, 3rd or 4th pause in a checkpoint
    write, in turn (best.pt, when it improved, is written before last.pt; each pauses halfway and before its
    rename). any-write: at the 1st, 2nd, ... 5th pause in any atomic write, in turn (config.json comes first,
    then metrics.jsonl, then the checkpoints)."""
    if mode == "start-up":
        lines_left, epochs_left = rng.randrange(4), 0
    elif mode == "epochs":
        lines_left, epochs_left = rng.randrange(1, 4), rng.choice([1, 2])  # a line after: the rename is done
    else:
        pauses_left = 1 + turn % (4 if mode == "checkpoint-write" else 5)
    deadline = time.monotonic() + PATIENCE_S
    while True:
        if mode in ("start-up", "epochs") and epochs_left == 0 and lines_left == 0:
            return ""
        line = child.next_line(deadline)
        if line is None:
            return "" if child.ended else None  # the run ended by itself: the kill finds it gone
        paused = line.split()[3] if line.startswith(PAUSE) else None
        if mode in ("start-up", "epochs"):
            if epochs_left == 0:
                lines_left -= 1
                if lines_left == 0:
                    return paused or ""
            elif paused and paused.startswith(".last.pt.") and line.split()[2] == "whole":
                epochs_left -= 1  # released below: last.pt of one more epoch
        elif paused and (mode == "any-write" or paused.startswith((".last.pt.", ".best.pt."))):
            pauses_left -= 1
            if pauses_left == 0:
                return paused
        if paused:
            child.go()


class Child:
    """A forked training process whose stderr comes back line by line, and whose writes pause (see `_pausing`)."""

    def __init__(self, argv: list[str]):
        self.pid, self.report, self.gate = _fork_cli(argv, watched=True)
        self.buffer, self.ended = b"", False

    def next_line(self, deadline: float) -> str | None:
        """The child's next line of stderr; None when its output ended or `deadline` passed."""
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if self.ended or left <= 0 or not select.select([self.report], [], [], left)[0]:
                return None
            chunk = os.read(self.report, 65536)
            self.ended = not chunk
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode(errors="replace")

    def go(self) -> None:
        with contextlib.suppress(BrokenPipeError):  # it ended meanwhile
            os.write(self.gate, b"g")

    def kill(self) -> int:
        os.kill(self.pid, signal.SIGKILL)
        _, status = os.waitpid(self.pid, 0)
        os.close(self.report)
        os.close(self.gate)
        return status


def _pausing(gate: int) -> None:
    """In the child: before renaming a temporary file over a run file, and halfway through writing a
    checkpoint's temporary file, say so on stderr and wait for a byte on `gate` (the driver's go-ahead)."""
    real_replace, real_save = os.replace, torch.save

    def pause(stage: str, path) -> None:
        os.write(2, f"{PAUSE} {stage} {Path(path).name}\n".encode())
        os.read(gate, 1)

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name in WATCHED:
            pause("whole", src)
        return real_replace(src, dst, *args, **kwargs)

    def save(obj, f, *args, **kwargs):
        if not isinstance(f, str | os.PathLike) or not Path(f).name.startswith((".last.pt.", ".best.pt.")):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(f, "wb") as out:  # the same bytes, written in two halves with a pause between
            out.write(data[: len(data) // 2])
            out.flush()
            pause("half", f)
            out.write(data[len(data) // 2 :])

    os.replace, torch.save = replace, save


def _temporaries(run: Path) -> list[str]:
    """Names of the temporary files of atomic writes in the run folder and its checkpoints folder."""
    return sorted(p.name for d in (run, run / "checkpoints") if d.is_dir() for p in d.iterdir()
                  if p.name.endswith(TMP_SUFFIX))


def _fork_cli(argv: list[str], *, watched: bool = False) -> tuple[int, int | None, int | None]:
    """Fork an `imgclf ARGV` process, quiet. Watched: its stderr comes back through a pipe and its writes
    pause (`_pausing`); returns (pid, read end of its stderr, write end of its gate)."""
    report_r, report_w = os.pipe() if watched else (None, None)
    gate_r, gate_w = os.pipe() if watched else (None, None)
    pid = os.fork()
    if pid == 0:  # the child: a training process
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(report_w if watched else devnull, 2)
            if watched:
                os.close(report_r)
                os.close(gate_w)
                _pausing(gate_r)
            from imgclf.cli import main

            code = main(argv)
        finally:
            os._exit(code)
    if watched:
        os.close(report_w)
        os.close(gate_r)
    return pid, report_r, gate_w
