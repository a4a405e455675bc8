"""The notes' training loop against `imgclf train` on the same network and data, alternated in one run.

Each round runs the notes' loop (benchmarks/notes_loop.py: per-sample PIL decoding, batch 64, fp32,
SGD 0.01, no_grad evaluation) and then each imgclf variant, for the same number of epochs, as separate
processes. Printed per run: training images/s, evaluation images/s, test accuracy after the last epoch,
wall seconds of the whole command and its peak resident memory; then the ratios (medians over rounds).

    python benchmarks/train_speed.py --data $(/work/shared/data/get cifar10) --epochs 3 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import PYTHON, ROOT, check, machine, run_measured

VARIANTS = ["--recipe notes", "--recipe notes --precision fp32"]


def notes_run(data: str, epochs: int) -> dict:
    m = check(run_measured([PYTHON, str(ROOT / "benchmarks" / "notes_loop.py"), "--data", data,
                            "--epochs", str(epochs)]), "the notes' loop")
    epochs_out = [json.loads(line) for line in m.stdout.splitlines() if line.startswith("{")]
    return {"name": "notes' loop", "train_ips": statistics.median(e["train_images_per_s"] for e in epochs_out),
            "eval_ips": statistics.median(e["eval_images_per_s"] for e in epochs_out),
            "acc": epochs_out[-1]["test_acc"], "wall": m.seconds, "rss": m.peak_rss_mb}


def imgclf_run(data: str, epochs: int, flags: str, n_train: int, n_test: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        m = check(run_measured([PYTHON, "-m", "imgclf", "train", "--data", data, "--epochs", str(epochs),
                                "--out", str(out), *shlex.split(flags)]), f"imgclf train {flags}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_s = [n_train / r["images_per_s"] for r in records]
    eval_s = [r["epoch_seconds"] - t for r, t in zip(records, train_s, strict=True)]
    return {"name": f"imgclf {flags}", "train_ips": statistics.median(r["images_per_s"] for r in records),
            "eval_ips": n_test / statistics.median(eval_s), "acc": records[-1]["val_acc"], "wall": m.seconds,
            "rss": m.peak_rss_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a CIFAR-10 folder with train/ and test/")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--variant", action="append", help=f"imgclf train flags (default: {VARIANTS})")
    args = parser.parse_args()
    variants = args.variant or VARIANTS
    print(machine(), flush=True)
    sys.path.insert(0, str(ROOT / "src"))
    from imgclf.config import DataConfig
    from imgclf.sources import load_data

    start = time.perf_counter()
    data = load_data(DataConfig(data=args.data), progress=False)  # decode once into the cache, untimed below
    print(f"cache ready in {time.perf_counter() - start:.1f}s ({len(data.train)} train / {len(data.val)} test)")
    n_train, n_test = len(data.train), len(data.val)
    del data

    results: dict[str, list[dict]] = {}
    print(f"{'run':<58} {'train img/s':>11} {'eval img/s':>10} {'acc':>7} {'wall s':>7} {'peak RSS':>9}")
    for _ in range(args.rounds):
        runs = [lambda: notes_run(args.data, args.epochs)]
        runs += [lambda f=f: imgclf_run(args.data, args.epochs, f, n_train, n_test) for f in variants]
        for run in runs:
            r = run()
            results.setdefault(r["name"], []).append(r)
            print(f"{r['name']:<58} {r['train_ips']:>11.0f} {r['eval_ips']:>10.0f} {r['acc']:>7.2%} "
                  f"{r['wall']:>7.1f} {r['rss']:>6.0f} MB", flush=True)

    base = results.pop("notes' loop")
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    print(f"\nafter {args.epochs} epochs, medians of {args.rounds} round(s); ratios against the notes' loop:")
    for name, rs in results.items():
        print(f"{name:<58} train {med(rs, 'train_ips') / med(base, 'train_ips'):.2f}x  "
              f"eval {med(rs, 'eval_ips') / med(base, 'eval_ips'):.2f}x  "
              f"wall {med(base, 'wall') / med(rs, 'wall'):.2f}x  "
              f"accuracy {med(rs, 'acc'):.2%} vs {med(base, 'acc'):.2%}  peak RSS {max(r['rss'] for r in rs):.0f} MB")


if __name__ == "__main__":
    main()
