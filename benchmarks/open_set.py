"""Open-set rejection (issue 25, point 4): pictures of classes a network never saw, how many are answered
"unknown", and at what cost on the known classes.

A pets network (cats vs dogs) is shown its own held-out pets and pictures of other things: the ants/bees photos
and CIFAR-10 airplanes, ships and trucks (32 px, upscaled by imgclf's decoding). Every picture is decoded as
`imgclf predict` decodes it (embed.decode_pictures). Five "is it known" scores, higher = more familiar:

  calibrated  max softmax(z / T), T the checkpoint's temperature: what --reject-below compares
  raw         max softmax(z)
  max-logit   max z
  energy      logsumexp(z)
  knn         cosine similarity to the k-th nearest training embedding (the head's input, imgclf.embed)

For each score the cut is chosen on the run's validation split so that 95% (90%) of its pictures are kept;
then on known test pictures (pets test files the run never read) the share kept and their accuracy, on the
unknown pictures the share rejected, and the AUROC known-test vs unknown (threshold-free).

  python benchmarks/open_set.py --checkpoint /work/bench/runs/base/checkpoints/best.pt
  python benchmarks/open_set.py            # trains its own small pets network first (a few minutes on a CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from imgclf.embed import data_config, decode_pictures, load_for, open_network, unit_rows  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PICTURE = (".jpg", ".jpeg", ".png")
KEEPS = (0.95, 0.90)
SCORES = ("calibrated", "raw", "max-logit", "energy", "knn")


def get(name: str) -> Path:
    """A shared data set's folder (`../shared/data/get NAME`)."""
    return Path(subprocess.run([str(SHARED / "get"), name], check=True, capture_output=True,
                               text=True).stdout.strip())


def pictures(folder: Path, n: int | None = None) -> list[str]:
    """The first `n` picture files under `folder`, sorted (all for None)."""
    found = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in PICTURE)
    return found[:n]


@torch.inference_mode()
def forward(net, paths: list[str], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, classes), head-input vectors (N, D)) of picture files decoded as predict decodes them."""
    logits, vectors = [], []
    handle = net.head.register_forward_pre_hook(lambda m, inputs: vectors.append(inputs[0].float().flatten(1)))
    try:
        for start in range(0, len(paths), batch):
            x = net.transform(torch.as_tensor(decode_pictures(net, paths[start:start + batch])).to(net.device),
                              train=False)
            with net.autocast():
                logits.append(net.model(x).float())
    finally:
        handle.remove()
    return torch.cat(logits).cpu().numpy(), torch.cat(vectors).cpu().numpy()


def scores(logits: np.ndarray, vectors: np.ndarray, temperature: float, train_unit: np.ndarray, k: int) -> dict:
    """Every score of SCORES for each row (higher = more familiar)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    sims = unit_rows(vectors) @ train_unit.T
    kth = -np.sort(-sims, axis=1)[:, k - 1]
    return {"calibrated": (z / temperature).softmax(1).amax(1).numpy(), "raw": z.softmax(1).amax(1).numpy(),
            "max-logit": z.amax(1).numpy(), "energy": z.logsumexp(1).numpy(), "knn": kth}


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(a known picture scores above an unknown one), ties counting half."""
    greater = (known[:, None] > unknown[None, :]).mean()
    return float(greater + 0.5 * (known[:, None] == unknown[None, :]).mean())


def cut_keeping(val: np.ndarray, keep: float) -> float:
    """The highest cut that keeps (score >= cut) at least a share `keep` of the validation scores `val`."""
    return float(np.sort(val)[::-1][max(int(np.ceil(keep * len(val))) - 1, 0)])


def known_sets(net, recorded: str, per_class: int) -> tuple[list, list, list, list]:
    """(train files, val files, test files, test labels): the run's own train and validation
    split, and `per_class` pets test pictures of each class that the run never read."""
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: a shared one may name the files of an
        # identical folder decoded earlier elsewhere (seen: a deleted temporary copy of the same pets)
        splits = {role: list(split.files) for role, split in
                  load_for(net, data_config(net, recorded, cache_dir=cache)).splits().items()}
    read = {str(Path(f).resolve()) for files in splits.values() for f in files}
    test, labels = [], []
    pets = get("pets") / "test"
    for index, name in enumerate(net.classes):
        unseen = [p for p in pictures(pets / name) if str(Path(p).resolve()) not in read][:per_class]
        test += unseen
        labels += [index] * len(unseen)
    return splits["train"], splits["val"], test, labels


def unknown_sets(per_set: int) -> dict[str, list[str]]:
    """Pictures of classes a pets network never saw: ants/bees photos and CIFAR-10 airplane, ship, truck."""
    ants = [p for p in pictures(SHARED / "hymenoptera_data") if "imageNotFound" not in p]
    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(len(ants), size=min(per_set, len(ants)), replace=False))
    cifar = get("cifar10") / "test"
    third = per_set // 3
    return {"ants/bees": [ants[i] for i in chosen],
            "cifar airplane/ship/truck": sum((pictures(cifar / c, third) for c in ("airplane", "ship", "truck")),
                                             [])}


def table(val: dict, test: dict, test_ok: np.ndarray, unknown: dict[str, dict]) -> list[dict]:
    """One row per score and kept share: cut, known kept and their accuracy, unknown rejected, AUROC."""
    rows = []
    everything = {name: np.concatenate([u[name] for u in unknown.values()]) for name in SCORES}
    for name in SCORES:
        for keep in KEEPS:
            cut = cut_keeping(val[name], keep)
            kept = test[name] >= cut
            row = {"score": name, "keep_val": keep, "cut": cut, "known_kept": float(kept.mean()),
                   "kept_acc": float(test_ok[kept].mean()) if kept.any() else float("nan"),
                   "unknown_rejected": float((everything[name] < cut).mean()),
                   "auroc": auroc(test[name], everything[name])}
            row.update({f"rejected {s}": float((u[name] < cut).mean()) for s, u in unknown.items()})
            rows.append(row)
    return rows


def measure(checkpoint: str, *, per_class: int = 150, per_set: int = 210, k: int = 10) -> dict:
    """The whole measurement for `checkpoint` (a pets network trained on a folder data set)."""
    net = open_network(checkpoint, device="cpu")
    recorded = net.recorded.get("data")
    temperature = float(torch.load(net.source, map_location="cpu", weights_only=True).get("temperature", 1.0))
    train, val, test, test_labels = known_sets(net, recorded, per_class)
    _, train_vectors = forward(net, train)
    train_unit = unit_rows(train_vectors)
    k = min(k, len(train))

    def scored(paths):
        logits, vectors = forward(net, paths)
        return logits, scores(logits, vectors, temperature, train_unit, k)

    _, val_scores = scored(val)
    test_logits, test_scores = scored(test)
    unknown = {name: scored(paths)[1] for name, paths in unknown_sets(per_set).items()}
    test_ok = test_logits.argmax(1) == np.asarray(test_labels)
    return {"checkpoint": str(checkpoint), "temperature": temperature, "k": k,
            "pictures": {"train": len(train), "val": len(val), "known_test": len(test),
                         **{name: len(next(iter(s.values()))) for name, s in unknown.items()}},
            "known_test_acc": float(test_ok.mean()),
            "rows": table(val_scores, test_scores, test_ok, unknown)}


def train_small(out: Path, per_class: int = 150) -> Path:
    """A small pets network: lite0 from the shared ImageNet weights, its new head trained 2 epochs at 128 px
    (--freeze-backbone: light on a CPU) on `per_class` train pictures of each class (and as many test pictures
    as validation)."""
    pets, data = get("pets"), out / "pets"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (data / split / name).mkdir(parents=True, exist_ok=True)
            for p in pictures(pets / split / name, per_class):
                (data / split / name / Path(p).name).symlink_to(p)
    run = out / "run"
    subprocess.run([sys.executable, "-m", "imgclf", "train", "--data", str(data), "--model",
                    "timm/tf_efficientnet_lite0", "--pretrained",
                    str(SHARED / "pretrained" / "tf_efficientnet_lite0_imagenet.pth"), "--freeze-backbone",
                    "--img-size", "128", "--epochs", "2", "--device", "cpu", "--seed", "0", "--out", str(run)], check=True)
    return run / "checkpoints" / "best.pt"


def markdown(result: dict) -> str:
    """The result as a Markdown table."""
    unknown = [key for key in result["rows"][0] if key.startswith("rejected ")]
    head = ["score", "val kept", "known test kept", "kept acc", "unknown rejected",
            *(u.replace("rejected ", "rej. ") for u in unknown), "AUROC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["score"], f"{r['keep_val']:.0%}", f"{r['known_kept']:.1%}", f"{r['kept_acc']:.1%}",
                 f"{r['unknown_rejected']:.1%}", *(f"{r[u]:.1%}" for u in unknown), f"{r['auroc']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a pets (cat, dog) checkpoint trained on a folder data set; "
                        "absent: train a small one first")
    parser.add_argument("--per-class", type=int, default=150, help="known test pictures of each class")
    parser.add_argument("--per-set", type=int, default=210, help="unknown pictures of each unknown set")
    parser.add_argument("--k", type=int, default=10, help="the k of the kNN score")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(train_small(Path(tmp)))
        result = measure(checkpoint, per_class=args.per_class, per_set=args.per_set, k=args.k)
    result["load_average"] = os.getloadavg()
    print(json.dumps({key: value for key, value in result.items() if key != "rows"}))
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
