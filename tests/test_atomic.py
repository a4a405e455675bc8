"""Atomic writes (issue 3, point 2): SIGKILL a training process at random instants, many times, half of them
while a file is being written; after every kill last.pt/best.pt load with weights_only=True and
metrics.jsonl/config.json are whole. The run, resumed after each kill, ends exactly like one never killed.

Starting a Python with torch takes seconds, so a driver process imports imgclf once and forks each training
process from it: every child is a real `imgclf train` process (`cli.main` after fork), killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import write_class_folder

HERE = Path(__file__).resolve().parent
KILLS = 20
EPOCHS = 60  # enough that the kills are spent before a quiet machine finishes the run
MODES = ("start-up", "checkpoint-write", "epochs", "any-write")


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
    assert len(kills) >= KILLS // 2, report  # the run may finish before all kills are spent, not this early
    assert sum(k["writing"].startswith((".last.pt", ".best.pt")) for k in kills) >= 2, report  # mid-save kills
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
        started = (run / "checkpoints" / "last.pt").exists()
        stale = set(_temporaries(run))  # left by earlier kills
        pid = _fork_cli(resume if started else fresh)
        mode = MODES[i % len(MODES)]
        writing = ""
        deadline = time.monotonic() + 30
        if mode == "start-up":  # anywhere in the first half second: loading, config.json, first steps
            time.sleep(rng.uniform(0.0, 0.5))
        elif mode == "epochs":  # anywhere in the epoch after one or two more have been recorded
            target = _recorded(run) + rng.choice([1, 2])
            while _recorded(run) < target and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.05))
        else:  # the moment a new temporary file appears (a write in progress), or a few milliseconds later
            prefixes = (".last.pt.", ".best.pt.") if mode == "checkpoint-write" else (".",)
            while not writing and time.monotonic() < deadline:
                writing = next((n for n in set(_temporaries(run)) - stale if n.startswith(prefixes)), "")
            time.sleep(rng.choice([0.0, rng.uniform(0.0, 0.003)]))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):  # it had ended by itself
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                report["problems"].append(f"kill {i}: the training process failed with exit status {code}")
            last_epoch = check(f"after kill {i - 1}, the run's end")
            break
        epoch = check(f"kill {i} ({mode})")
        if epoch < last_epoch:
            report["problems"].append(f"kill {i}: last.pt went back from epoch {last_epoch} to {epoch}")
        last_epoch = epoch
        report["kills"].append({"mode": mode, "writing": writing, "last_epoch": epoch})
    last = run / "checkpoints" / "last.pt"
    finish = [] if last_epoch == EPOCHS else [resume if last.exists() else fresh]
    for argv in [*finish, [*args, "--out", str(out / "straight")]]:
        code = os.waitstatus_to_exitcode(os.waitpid(_fork_cli(argv), 0)[1])
        if code != 0:
            report["problems"].append(f"{argv[:3]} exited with {code}")
    check("the end")
    leftovers = _temporaries(run)
    if leftovers:
        report["problems"].append(f"temporary files left behind: {leftovers}")
    print(json.dumps(report), flush=True)


def _recorded(run: Path) -> int:
    """Epochs in metrics.jsonl (0 before the first)."""
    try:
        return (run / "metrics.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


def _temporaries(run: Path) -> list[str]:
    """Names of the temporary files of atomic writes in the run folder and its checkpoints folder."""
    return sorted(p.name for d in (run, run / "checkpoints") if d.is_dir() for p in d.iterdir()
                  if p.name.endswith(".tmp"))


def _fork_cli(argv: list[str]) -> int:
    pid = os.fork()
    if pid == 0:  # the child: a training process, quiet
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            from imgclf.cli import main

            code = main(argv)
        finally:
            os._exit(code)
    return pid
