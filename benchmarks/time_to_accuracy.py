"""Wall seconds from the `imgclf train` command to its reported test accuracy, on the CIFAR-10 folders.

For each --epochs value, one full command (`imgclf train --recipe fast --epochs N` by default), timed from
launch to exit; with --cold the decode cache is empty first (a fresh --cache-dir), so decoding the JPEGs
is included. Printed per run: each epoch's test accuracy with the seconds since launch at which it was
reported, the final accuracy, the wall time, and whether each --target was met within its --budget.

    python benchmarks/time_to_accuracy.py --data $(/work/shared/data/get cifar10) --epochs 2 --cold \\
        --target 0.85 --budget 240
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import time
from pathlib import Path

from _common import PYTHON, check, machine, run_measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a CIFAR-10 folder with train/ and test/")
    parser.add_argument("--epochs", type=int, action="append", help="epochs of one run (repeatable; default 8)")
    parser.add_argument("--flags", default="--recipe fast", help="imgclf train flags (default: --recipe fast)")
    parser.add_argument("--cold", action="store_true", help="start from an empty decode cache (decode included)")
    parser.add_argument("--target", type=float, action="append", default=[], help="accuracy to reach, e.g. 0.85")
    parser.add_argument("--budget", type=float, action="append", default=[], help="seconds allowed per target")
    args = parser.parse_args()
    print(machine(), flush=True)
    for epochs in args.epochs or [8]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            cache = ["--cache-dir", str(Path(tmp) / "cache")] if args.cold else []
            cmd = [PYTHON, "-m", "imgclf", "train", "--data", args.data, *shlex.split(args.flags),
                   "--epochs", str(epochs), "--out", str(out), *cache]
            launched = time.time()
            m = check(run_measured(cmd), "imgclf train")
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        print(f"\n$ imgclf train --data CIFAR {args.flags} --epochs {epochs}{' (cold cache)' if args.cold else ''}")
        training = 0.0
        for r in records:
            training += r.get("train_seconds", 0.0)
            shown = f"test accuracy {r['val_acc']:.2%}" if "val_acc" in r else "not evaluated (--val-every)"
            print(f"  epoch {r['epoch']:>2}: {shown} at {r['time'] - launched:7.1f}s "
                  f"({r['images_per_s']:.0f} train img/s, {training:.2f}s of training so far)")
        final = records[-1]["val_acc"]
        print(f"  final {final:.2%} in {m.seconds:.1f}s wall, {training:.2f}s of it training "
              f"(peak RSS {m.peak_rss_mb:.0f} MB)")
        for target, budget in zip(args.target, args.budget or [float("inf")] * len(args.target), strict=False):
            met = final >= target and m.seconds <= budget
            print(f"  target {target:.0%} in {budget:.0f}s: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
