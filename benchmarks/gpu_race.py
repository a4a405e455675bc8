"""imgclf against the standalone airbench94 reference on one GPU, alternately, seed by seed (issue 15).

For each seed: the reference (`reference_airbench.py`, 9.9 epochs, flip-and-shift TTA), then `imgclf train
--recipe fast` with the same seed. Both times are training seconds only (the device synchronised; data
loading, evaluation and saving excluded on both sides), each process starting cold (cuDNN autotuning is
inside both). The target is the reference's median TTA accuracy; imgclf's time-to-accuracy is its training
time when its final (TTA) accuracy reaches that target. Prints each run, the medians and their ratio.

    python benchmarks/gpu_race.py --data CIFAR10_FOLDER [--seeds 3] [--epochs 10] [--flags "..."]
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
from pathlib import Path

HERE = Path(__file__).parent
FLAGS = "--recipe fast --batch-size 1024 --lr 1.5 --device cuda"
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
            raise SystemExit(f"imgclf failed ({done.returncode}):\n{done.stderr[-3000:]}")
        records = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    seconds = [r["train_seconds"] for r in records]
    return sum(seconds), records[-1]["val_acc"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 folder with train/ and test/")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, action="append", help="imgclf's epochs (repeatable; default 10; "
                        "the reference runs 9.9)")
    parser.add_argument("--reference-epochs", type=float, default=9.9)
    parser.add_argument("--flags", default=FLAGS, help=f"imgclf train flags (default: {FLAGS})")
    args = parser.parse_args()
    epochs = args.epochs or [10]
    ref, ours = [], {e: [] for e in epochs}
    for seed in range(args.seeds):
        ref.append(reference(args.data, seed, args.reference_epochs))
        print(f"seed {seed}  reference: {ref[-1][0]:.2f} s, TTA accuracy {ref[-1][1]:.2%}", flush=True)
        for e in epochs:
            ours[e].append(imgclf(args.data, seed, e, args.flags))
            per_epoch = ", ".join(f"{s:.2f}" for s in ours[e][-1][2])
            print(f"seed {seed}  imgclf --epochs {e}: {ours[e][-1][0]:.2f} s, accuracy {ours[e][-1][1]:.2%} "
                  f"(epochs: {per_epoch})", flush=True)
    ref_time, target = statistics.median(t for t, _ in ref), statistics.median(a for _, a in ref)
    print(f"\nreference: median {ref_time:.2f} s to {target:.2%} (its median TTA accuracy: the target)")
    for e in epochs:
        our_time, our_acc = statistics.median(t for t, _, _ in ours[e]), statistics.median(a for _, a, _ in ours[e])
        steady = statistics.median(s for _, _, seconds in ours[e] for s in seconds[1:])
        reached = "target reached" if our_acc >= target else f"target NOT reached ({our_acc:.2%} < {target:.2%})"
        print(f"imgclf {args.flags} --epochs {e}: median {our_time:.2f} s, median accuracy {our_acc:.2%}, "
              f"{steady:.3f} s an epoch after the first; ratio {our_time / ref_time:.2f}x the reference; {reached}")

if __name__ == "__main__":
    main()
