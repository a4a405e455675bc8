"""Multi-label classification (issue 23) on real pictures: imgclf against a one-vs-rest baseline in plain torch.

The set: 2x2 mosaics of CIFAR-10 training pictures downscaled to 16x16 (so 32x32 mosaics), each tile one of
five classes (airplane, automobile, bird, cat, ship) or, a quarter of the time, blank; a mosaic's labels are
the classes it shows (tests/test_multilabel.py's `make_mosaics`, fixed seeds). `--train` mosaics (a fifth
held out for validation, which chooses the thresholds) from CIFAR pictures 0-3999 of each class, `--test`
mosaics from pictures 4000-4999, which training never sees.

  imgclf    `imgclf train --labels train.csv` (the task detected from the CSV), then `imgclf eval` on the test
            mosaics at the thresholds the checkpoint keeps
  baseline  this file's own loop: one binary network per class (one-vs-rest), each the same architecture as
            imgclf's tutorial_cnn written out in plain torch, AdamW and binary cross-entropy on the
            training mosaics (the same 80%), no augmentation, the same epochs and batch size

Printed: test mAP (mean over classes of the average precision), micro AP, and imgclf's macro F1 at its
thresholds. Run it with nothing else running:

    .venv/bin/python benchmarks/multilabel.py [--train 2000] [--test 500] [--epochs 15]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import PYTHON, ROOT, machine  # noqa: E402
from conftest import shared_dataset  # noqa: E402
from test_multilabel import MOSAIC_CLASSES, make_mosaics, write_csv  # noqa: E402

from imgclf.metrics import average_precision  # noqa: E402


def imgclf_map(folder: Path, args) -> dict:
    run, env = folder / "run", {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    common = ["--device", "cpu", "--precision", "fp32", "--cache-dir", str(folder / "cache")]
    subprocess.run([PYTHON, "-m", "imgclf", "train", "--data", str(folder / "train"), "--labels",
                    str(folder / "train.csv"), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                    "--optimizer", "adamw", "--lr", "0.003", "--weight-decay", "0.01", "--monitor", "val_map",
                    "--seed", "0", "--out", str(run), *common], check=True, env=env, stdout=subprocess.DEVNULL)
    out = subprocess.run([PYTHON, "-m", "imgclf", "eval", str(run / "checkpoints" / "best.pt"), "--data",
                          str(folder / "test"), "--labels", str(folder / "test.csv"), "--json", *common[:2]],
                         check=True, env=env, capture_output=True, text=True).stdout
    return json.loads(out)


def pixels(folder: Path, rows: list) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    x = torch.stack([torch.from_numpy(np.array(Image.open(folder / f).convert("RGB"))).permute(2, 0, 1)
                     for f, _ in rows]).float() / 255
    y = torch.tensor([[c in labels for c in MOSAIC_CLASSES] for _, labels in rows], dtype=torch.float32)
    return x, y


def tutorial_cnn() -> nn.Module:
    """imgclf's tutorial_cnn (note 21) for 3x32x32 pictures and one output, in plain torch."""
    return nn.Sequential(nn.Conv2d(3, 32, 5, padding=2), nn.MaxPool2d(2), nn.Conv2d(32, 32, 5, padding=2),
                         nn.MaxPool2d(2), nn.Conv2d(32, 64, 5, padding=2), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(1024, 64), nn.Linear(64, 1))


def one_vs_rest_map(train: tuple, test: tuple, args) -> dict:
    """One binary network per class, trained alone; the test AP of each."""
    (x, y), (tx, ty) = train, test
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x, tx = (x - mean) / std, (tx - mean) / std
    keep, _ = held_out(len(x))
    aps = []
    for c in range(len(MOSAIC_CLASSES)):
        torch.manual_seed(c)
        net = tutorial_cnn()
        opt = torch.optim.AdamW(net.parameters(), lr=0.003, weight_decay=0.01)
        for _ in range(args.epochs):
            order = keep[torch.randperm(len(keep))]
            for i in range(0, len(order), args.batch_size):
                idx = order[i : i + args.batch_size]
                loss = nn.functional.binary_cross_entropy_with_logits(net(x[idx]).squeeze(1), y[idx, c])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            aps.append(average_precision(net(tx).squeeze(1).sigmoid(), ty[:, c]))
    scores = dict(zip(MOSAIC_CLASSES, aps, strict=True))
    return {"map": sum(aps) / len(aps), "ap": scores}


def held_out(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same 80 / 20 rows as imgclf's random split of a multi-label CSV (seed 0)."""
    from imgclf.labelsets import random_split

    keep, held = random_split(count, fraction=0.2, seed=0)
    return torch.tensor(keep), torch.tensor(held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    print(machine())
    torch.set_num_threads(1)
    cifar = shared_dataset("cifar10")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = make_mosaics(cifar, folder / "train", count=args.train, seed=0)
        test_rows = make_mosaics(cifar, folder / "test", count=args.test, seed=1, start=4000)
        write_csv(folder / "train.csv", rows)
        write_csv(folder / "test.csv", test_rows)
        ours = imgclf_map(folder, args)
        print(f"imgclf tutorial_cnn, {args.epochs} epochs: test mAP {ours['map']:.4f}, micro AP {ours['micro_ap']:.4f}, "
              f"macro F1 {ours['macro_f1']:.4f} at the validation thresholds, exact match {ours['exact_match']:.2%}",
              flush=True)
        base = one_vs_rest_map(pixels(folder / "train", rows), pixels(folder / "test", test_rows), args)
        per = ", ".join(f"{c} {ap:.3f}" for c, ap in base["ap"].items())
        print(f"one-vs-rest baseline (plain torch, 5 x tutorial_cnn): test mAP {base['map']:.4f} ({per})")
        share = sum(any(labels) for _, labels in test_rows) / len(test_rows)
        prevalence = np.mean([[c in labels for c in MOSAIC_CLASSES] for _, labels in test_rows])
        print(f"test mosaics: {len(test_rows)}, {share:.1%} with a label; chance mAP about {prevalence:.3f} "
              f"(each class's share of pictures)")


if __name__ == "__main__":
    main()
