"""imgclf against the standalone airbench94 reference on one GPU, alternately, seed by seed (issue 15).

For each seed: the reference (`reference_airbench.py`, 9.9 epochs, flip-and-shift TTA), then `imgclf train
--recipe fast` with the same seed, once for each run asked (`--epochs N`, or a named `--run` with its own
epochs and extra flags: the levers of issue 26, benchmarks/gpu_levers.sh). Both times are training seconds
only (the device synchronised; data loading, evaluation and saving excluded on both sides), each process
starting cold (cuDNN autotuning is inside both). The target is the reference's median TTA accuracy; imgclf's
time-to-accuracy is its training time when its final (TTA) accuracy reaches that target. Prints each run, then
a table of medians and their ratio to the reference. `--budget`: no new round of seeds is started when it
would likely end after that many seconds (the table then covers the rounds done). `--dry`: no reference (it
needs CUDA), imgclf on the CPU: checks the machinery on a small folder.

    python benchmarks/gpu_race.py --data CIFAR10_FOLDER [--seeds 3] [--epochs 10] [--flags "..."]
    python benchmarks/gpu_race.py --data CIFAR10_FOLDER --run "baseline:12:" --run "bf16:12:--bf16-weights"
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
FLAGS = "--recipe records --batch-size 1024 --lr 1.5 --device cuda"
REFERENCE = re.compile(r"seed (\d+): ([\d.]+) epochs in ([\d.]+)s, test accuracy ([\d.]+)%, with TTA ([\d.]+)%")


def reference(data: str, seed: int, epochs: float) -> tuple[float, float]:
    """(training seconds, TTA accuracy) of one reference run."""
    out = subprocess.run([sys.executable, str(HERE / "reference_airbench.py"), data, str(epochs), "1", str(seed)],
                         capture_output=True, text=True, check=True).stdout
    match = REFERENCE.search(out)
    if match is None:
        raise SystemExit(f"unexpected reference output:\n{out}")
    return float(match[3]), float(match[5]) / 100


def imgclf(data: str, seed: int, epochs: int, flags: str) -> tuple[float, float, list[float]]:
    """(training seconds, final accuracy, seconds of each epoch) of one `imgclf train` run."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "imgclf", "train", "--data", data, *shlex.split(flags), "--epochs", str(epochs),
               "--seed", str(seed), "--out", f"{tmp}/run"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"imgclf failed ({done.returncode}): {shlex.join(cmd)}\n{done.stderr[-3000:]}")
        records = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    seconds = [r["train_seconds"] for r in records]
    return sum(seconds), records[-1]["val_acc"], seconds


def parse_run(text: str) -> tuple[str, int, str]:
    """'LABEL:EPOCHS:EXTRA FLAGS' -> (label, epochs, extra flags)."""
    label, epochs, extra = (text.split(":", 2) + ["", ""])[:3]
    if not label or not epochs.isdigit():
        raise SystemExit(f"--run {text!r}: write LABEL:EPOCHS:EXTRA_FLAGS, e.g. 'bf16:12:--bf16-weights'")
    return label, int(epochs), extra


def summary(ref: list, ours: dict, runs: list, base: str) -> None:
    """The medians of every run, against the reference's when there is one."""
    ref_time = statistics.median(t for t, _ in ref) if ref else None
    target = statistics.median(a for _, a in ref) if ref else None
    print(f"\nimgclf {base} --seed S, {len(next(iter(ours.values())))} seeds each, and:")
    if ref:
        print(f"reference: median {ref_time:.2f} s to {target:.2%} (its median TTA accuracy: the target), "
              f"{len(ref)} seeds")
    print(f"{'run':<14} {'epochs':>6} {'median s':>9} {'accuracy':>9} {'s/epoch':>8} {'x ref':>6}  target  extra flags")
    for label, epochs, extra in runs:
        done = ours[label]
        if not done:
            continue
        time_, acc = statistics.median(t for t, _, _ in done), statistics.median(a for _, a, _ in done)
        steady = statistics.median(s for _, _, seconds in done for s in seconds[1:]) if epochs > 1 else float("nan")
        ratio = f"{time_ / ref_time:5.2f}x" if ref else "   n/a"
        reached = "n/a" if target is None else ("yes" if acc >= target else "NO")
        print(f"{label:<14} {epochs:>6} {time_:>9.2f} {acc:>9.2%} {steady:>8.3f} {ratio:>6}  {reached:<6}  {extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 folder with train/ and test/")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, action="append", help="imgclf's epochs (repeatable; default 10; "
                        "the reference runs 9.9)")
    parser.add_argument("--run", action="append", default=[], metavar="LABEL:EPOCHS:FLAGS",
                        help="a named imgclf run: its epochs and flags added to --flags (repeatable)")
    parser.add_argument("--reference-epochs", type=float, default=9.9)
    parser.add_argument("--flags", default=FLAGS, help=f"imgclf train flags (default: {FLAGS})")
    parser.add_argument("--budget", type=float, default=None, help="seconds: start no round of seeds likely to "
                        "end later")
    parser.add_argument("--dry", action="store_true", help="no reference; imgclf on the CPU (--device cpu)")
    args = parser.parse_args()
    runs = [parse_run(r) for r in args.run] or [(f"--epochs {e}", e, "") for e in args.epochs or [10]]
    base = args.flags.replace("--device cuda", "--device cpu") if args.dry else args.flags
    ref, ours = [], {label: [] for label, _, _ in runs}
    start, longest = time.perf_counter(), 0.0
    for seed in range(args.seeds):
        elapsed = time.perf_counter() - start
        if args.budget is not None and seed and elapsed + longest > args.budget:
            print(f"(stopping after {seed} seeds: {elapsed:.0f} s spent, a round takes up to {longest:.0f} s, "
                  f"budget {args.budget:.0f} s)")
            break
        if not args.dry:
            ref.append(reference(args.data, seed, args.reference_epochs))
            print(f"seed {seed}  reference: {ref[-1][0]:.2f} s, TTA accuracy {ref[-1][1]:.2%}", flush=True)
        for label, epochs, extra in runs:
            ours[label].append(imgclf(args.data, seed, epochs, f"{base} {extra}"))
            per_epoch = ", ".join(f"{s:.2f}" for s in ours[label][-1][2])
            print(f"seed {seed}  {label} ({epochs} epochs): {ours[label][-1][0]:.2f} s, accuracy "
                  f"{ours[label][-1][1]:.2%} (epochs: {per_epoch})", flush=True)
        longest = max(longest, time.perf_counter() - start - elapsed)
    summary(ref, ours, runs, base)
    print(f"wall time of the race: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
