"""Fine-tuning from ImageNet weights: imgclf's defaults against fastai's `fine_tune` and timm's `train.py`.

The same network (timm's `tf_efficientnet_lite0`), the same ImageNet weights
(`../shared/data/pretrained/tf_efficientnet_lite0_imagenet.pth`), the same input size, epochs and seeds:

  imgclf  `imgclf train --model timm/tf_efficientnet_lite0 --pretrained FILE --img-size S --epochs E --seed N`,
          nothing else (its defaults; `--imgclf-flags` adds flags)
  fastai  fastai's documented fine-tune: `ImageDataLoaders.from_folder(item_tfms=Resize(S),
          batch_tfms=aug_transforms())`, `vision_learner` on the timm network with the weights loaded into its
          body and the weights' normalisation (mean = std = 0.5, what `vision_learner(pretrained=True)` adds),
          `learn.fine_tune(E - 1)` at its default lr: one frozen epoch, then E - 1 unfrozen, E passes in all
          as the others (`--fastai-epochs unfrozen`: `fine_tune(E)`, E + 1 passes, as its docs call it)
  timm    timm's `train.py` (not in the pip package: give its path with --timm-train) with `--pretrained
          --pretrained-path FILE --num-classes K --img-size S --epochs E --seed N` on its ImageFolder layout,
          plus `--timm-flags` (default `--warmup-epochs 1 --batch-size 32`: its default warm-up, 5 epochs,
          outlasts these runs, and its default batch, 128 with drop_last, trains the ants/bees one step an epoch)
  probe   a reference, not a contender: logistic regression on the frozen network's pooled features (the
          weights' eval transform), trained on the training pictures

on the ants/bees photos (224 px) and `pets` (160 px). Each run is its own process, one after the other;
printed per run: best and last validation accuracy over the epochs, training pictures per second (the
training phases only: pictures x epochs / seconds), wall time, peak resident memory of the process tree
(sampled every 0.2 s, data-loading workers included), and the load average when it started and ended.

fastai, timm and the probe run in a separate virtual environment (`--peers`, default /work/peers: torch,
torchvision, fastai, timm, scikit-learn); a peer whose environment is absent is skipped with one line.
Run it with nothing else running, e.g.:

    .venv/bin/python benchmarks/finetune.py --sets ants --seeds 0,1
    .venv/bin/python benchmarks/finetune.py --sets pets --pets-train 1000 --tools imgclf,fastai
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import PYTHON, ROOT, machine, run_tree_measured

# ../shared/data beside the project (a worktree deeper down finds it further up)
SHARED = next((p / "shared" / "data" for p in ROOT.parents if (p / "shared" / "data").is_dir()),
              ROOT.parent / "shared" / "data")
WEIGHTS = SHARED / "pretrained" / "tf_efficientnet_lite0_imagenet.pth"
ARCH = "tf_efficientnet_lite0"
EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}  # what every tool here reads (no GIF placeholders)
# name: (../shared/data/get NAME, folder under it, validation split, side, epochs)
SETS = {"ants": ("hymenoptera", "hymenoptera_data", "val", 224, 3), "pets": ("pets", "", "test", 160, 2)}


def pictures(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def data_folder(name: str, args, tmp: Path) -> Path:
    """The folder of set `name` (train/ + its validation split); with --pets-train N, a folder of links to
    the first N training pictures of each class (sorted by name) and the whole validation split."""
    get, sub, valid, _, _ = SETS[name]
    root = args.root.get(name) or Path(subprocess.run([str(SHARED / "get"), get], capture_output=True, text=True,
                                                      check=True).stdout.strip())
    root = root / sub if sub and (root / sub).is_dir() else root
    if name != "pets" or not args.pets_train:
        return root
    out = tmp / f"pets-{args.pets_train}"
    for split, limit in (("train", args.pets_train), (valid, None)):
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            (out / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in pictures(cls)[:limit]:
                (out / split / cls.name / f.name).symlink_to(f)
    return out


def load() -> float:
    return os.getloadavg()[0]


def run_imgclf(folder: Path, valid: str, size: int, epochs: int, seed: int, args, tmp: Path) -> dict:
    out = tmp / f"imgclf-{folder.name}-{seed}"
    start = ["--model", args.scratch] if args.scratch else ["--model", f"timm/{ARCH}", "--pretrained", str(args.weights)]
    cmd = [PYTHON, "-m", "imgclf", "train", "--data", str(folder), *start, "--img-size", str(size), "--epochs",
           str(epochs), "--seed", str(seed), "--device", args.device, "--out", str(out), *shlex.split(args.imgclf_flags)]
    wall, peak, r = run_tree_measured(cmd, env={"PYTHONPATH": str(ROOT / "src")})
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"accs": [rec["val_acc"] for rec in records], "train_seconds": sum(rec["train_seconds"] for rec in records),
            "wall": wall, "peak": peak, "said": [line for line in r.stderr.splitlines() if "pretrained" in line.lower()],
            "output": r.stdout + r.stderr}


def run_worker(kind: str, folder: Path, valid: str, size: int, epochs: int, seed: int, args) -> dict:
    """fastai or the probe, in the peers' Python, by this file's --worker mode."""
    cmd = [str(peers_python(args)), __file__, "--worker", kind, "--device", args.device, "--scratch", args.scratch, "--data", str(folder), "--valid", valid,
           "--w-size", str(size), "--w-epochs", str(epochs), "--w-seed", str(seed), "--weights", str(args.weights),
           "--fastai-epochs", args.fastai_epochs]
    wall, peak, r = run_tree_measured(cmd)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "wall": wall, "peak": peak}


def run_timm(folder: Path, valid: str, size: int, epochs: int, seed: int, args, tmp: Path) -> dict:
    classes = [p for p in (folder / "train").iterdir() if p.is_dir()]
    out = tmp / f"timm-{folder.name}-{seed}"
    cmd = [str(peers_python(args)), str(args.timm_train), "--data-dir", str(folder), "--train-split",
           "train", "--val-split", valid, "--model", ARCH, "--pretrained", "--pretrained-path", str(args.weights),
           "--num-classes", str(len(classes)), "--img-size", str(size), "--epochs", str(epochs), "--seed", str(seed),
           "--device", args.device, "--workers", str(os.cpu_count() or 1), "--output", str(out), "--experiment", "run",
           *shlex.split(args.timm_flags)]
    wall, peak, r = run_tree_measured(cmd)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    with open(out / "run" / "summary.csv") as f:
        accs = [float(row["eval_top1"]) / 100 for row in csv.DictReader(f)]
    # the last "Train:" line of each epoch carries the epoch's mean seconds per update; updates per epoch
    # from the same line: "Train: E [ i/N (100%)] ... Time: now, rate (mean s, mean rate)"
    last = {}
    for m in re.finditer(r"Train: (\d+) \[\s*(\d+)/(\d+) .*?Time: [\d.]+s,\s*[\d.]+/s\s+\(([\d.]+)s,",
                         r.stdout + r.stderr):
        last[int(m.group(1))] = int(m.group(3)) * float(m.group(4))
    return {"accs": accs, "train_seconds": sum(last.values()), "wall": wall, "peak": peak}


def fastai_worker(args) -> dict:
    """fastai's documented fine-tune, in this process (the peers' Python)."""
    import torch
    import torchvision
    from fastai.vision.all import (
        Callback,
        ImageDataLoaders,
        Normalize,
        Resize,
        accuracy,
        aug_transforms,
        set_seed,
        vision_learner,
    )

    class Clock(Callback):
        order = 60  # after the Recorder has written the epoch's metrics

        def before_fit(self):
            self.t = time.perf_counter()

        def before_train(self):
            self.t = time.perf_counter()

        def after_train(self):
            seconds.append(time.perf_counter() - self.t)

        def after_epoch(self):
            accs.append(float(self.recorder.values[-1][-1]))

    seconds, accs = [], []
    set_seed(args.w_seed, reproducible=True)
    # fastai's from-scratch default (--scratch) has no normalisation; a pretrained body gets its weights' stats
    norm = [] if args.scratch else [Normalize.from_stats([0.5] * 3, [0.5] * 3)]
    dls = ImageDataLoaders.from_folder(args.data, train="train", valid=args.valid, item_tfms=Resize(args.w_size),
                                       batch_tfms=[*aug_transforms(), *norm], seed=args.w_seed, device=args.device)
    if args.scratch:  # its learner on a random network, one-cycle at its default lr
        learn = vision_learner(dls, getattr(torchvision.models, args.scratch), pretrained=False, metrics=accuracy,
                               cbs=Clock())
        learn.fit_one_cycle(args.w_epochs)
        return {"accs": accs, "train_seconds": sum(seconds)}
    learn = vision_learner(dls, ARCH, pretrained=False, metrics=accuracy, cbs=Clock())
    missing, unexpected = learn.model[0].model.load_state_dict(torch.load(args.weights, weights_only=True),
                                                               strict=False)
    if missing or any(not k.startswith("classifier.") for k in unexpected):
        sys.exit(f"the weights do not fit fastai's body: missing {missing[:3]}, unexpected {unexpected[:3]}")
    learn.fine_tune(args.w_epochs - 1 if args.fastai_epochs == "total" else args.w_epochs)
    return {"accs": accs, "train_seconds": sum(seconds)}


def probe_worker(args) -> dict:
    """Logistic regression on the frozen network's pooled features, the weights' own eval transform."""
    import numpy as np
    import timm
    import torch
    from sklearn.linear_model import LogisticRegression
    from torchvision import datasets

    model = timm.create_model(ARCH, num_classes=1000)
    model.load_state_dict(torch.load(args.weights, weights_only=True))
    model.reset_classifier(0)
    model.eval()
    config = timm.data.resolve_data_config({"input_size": (3, args.w_size, args.w_size)}, model=model)
    transform = timm.data.create_transform(**config)

    def features(split: str):
        ds = datasets.ImageFolder(str(args.data / split), transform, is_valid_file=lambda p: Path(p).suffix.lower()
                                  in EXTENSIONS)
        loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=os.cpu_count() or 1)
        with torch.inference_mode():
            out = [(model(x).numpy(), y.numpy()) for x, y in loader]
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    start = time.perf_counter()
    x, y = features("train")
    seconds = time.perf_counter() - start
    xv, yv = features(args.valid)
    clf = LogisticRegression(max_iter=5000).fit(x, y)
    return {"accs": [float((clf.predict(xv) == yv).mean())], "train_seconds": seconds, "config": str(config)}


def peers_python(args) -> Path:
    """The peers' Python: --peers is a virtual environment or a Python executable."""
    return args.peers if args.peers.is_file() else args.peers / "bin" / "python"


def describe(name: str, tool: str, seed: int, n_train: int, epochs: int, res: dict, loads: tuple) -> str:
    head = f"{name:<5} {tool:<7} seed {seed}"
    if "error" in res:
        return f"{head}  failed: {res['error']}"
    accs = res["accs"]
    ips = n_train * (1 if tool == "probe" else epochs) / max(res["train_seconds"], 1e-9)
    per = " ".join(f"{a:.1%}" for a in accs)
    return (f"{head}  best {max(accs):.2%}  last {accs[-1]:.2%}  ({per})  train {ips:.1f} img/s  wall "
            f"{res['wall']:.0f} s  peak {res['peak']:.0f} MB  load {loads[0]:.2f}->{loads[1]:.2f}")


def benchmark(args) -> None:
    print(machine())
    have_peers = peers_python(args).exists()
    tools = args.tools.split(",")
    if args.scratch:
        tools = [t for t in tools if t in ("imgclf", "fastai")]
        print(f"from scratch: {args.scratch} (imgclf --model {args.scratch}; fastai vision_learner(pretrained=False) "
              f"+ fit_one_cycle(E), item_tfms=Resize(S), aug_transforms()); device {args.device}")
    print(f"network {ARCH}, weights {args.weights}; imgclf flags: {args.imgclf_flags or '(defaults)'}; timm flags: "
          f"{args.timm_flags}; fastai: fine_tune({'E-1' if args.fastai_epochs == 'total' else 'E'})")
    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.sets.split(","):
            _, _, valid, size, epochs = SETS[name]
            size = args.size.get(name, size)
            epochs = args.epochs.get(name, epochs)
            folder = data_folder(name, args, tmp)
            n_train = len(pictures(folder / "train"))
            print(f"{name}: {folder}, {n_train} training and {len(pictures(folder / valid))} validation pictures, "
                  f"{size} px, {epochs} epochs", flush=True)
            for tool in tools:
                if tool != "imgclf" and not have_peers:
                    print(f"{name:<5} {tool:<7} skipped: no peers' environment at {args.peers}", flush=True)
                    continue
                if tool == "timm" and not args.timm_train.exists():
                    print(f"{name:<5} {tool:<7} skipped: no timm train.py at {args.timm_train}", flush=True)
                    continue
                for seed in args.seeds if tool != "probe" else args.seeds[:1]:
                    before = load()
                    if tool == "imgclf":
                        res = run_imgclf(folder, valid, size, epochs, seed, args, tmp)
                    elif tool == "timm":
                        res = run_timm(folder, valid, size, epochs, seed, args, tmp)
                    else:
                        res = run_worker(tool, folder, valid, size, epochs, seed, args)
                    loads = (before, load())
                    print(describe(name, tool, seed, n_train, epochs, res, loads), flush=True)
                    for line in res.get("said", []):
                        print(f"      imgclf said: {line}")
                    results.append({"set": name, "tool": tool, "seed": seed, "n_train": n_train, "epochs": epochs,
                                    "size": size, "load": loads, **res})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def per_set(text: str, cast) -> dict:
    """"ants=5,pets=3" -> {"ants": 5, "pets": 3}."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in SETS or not value:
            raise SystemExit(f"expected NAME=VALUE with NAME in {', '.join(SETS)}, got {item!r}")
        out[key] = cast(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="ants,pets", help="ants, pets or both (ants,pets)")
    parser.add_argument("--tools", default="imgclf,fastai,timm,probe")
    parser.add_argument("--seeds", default="0,1", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--epochs", default={}, type=lambda s: per_set(s, int), metavar="SET=N,...",
                        help="epochs per set (ants=3,pets=2)")
    parser.add_argument("--size", default={}, type=lambda s: per_set(s, int), metavar="SET=PX,...",
                        help="input side per set (ants=224,pets=160)")
    parser.add_argument("--pets-train", type=int, default=0, help="the first N training pictures of each pets "
                        "class (0: all 4,000)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--peers", type=Path, default=Path("/work/peers"), help="virtual environment of the peers")
    parser.add_argument("--timm-train", type=Path, default=Path("/work/peers/timm_train.py"),
                        help="timm's train.py (from github.com/huggingface/pytorch-image-models)")
    parser.add_argument("--imgclf-flags", default="", help="more imgclf flags (none: its defaults)")
    parser.add_argument("--timm-flags", default="--warmup-epochs 1 --batch-size 32",
                        help="more timm train.py flags (its default warm-up, 5 epochs, outlasts these runs; its "
                        "default batch, 128 with drop_last, gives the ants/bees one step an epoch)")
    parser.add_argument("--fastai-epochs", default="total", choices=("total", "unfrozen"),
                        help="total: fine_tune(E-1), E passes as the others; unfrozen: fine_tune(E)")
    parser.add_argument("--json", help="also write every run's figures to this file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for every tool")
    parser.add_argument("--root", default={}, type=lambda s: per_set(s, lambda v: Path(v).resolve()), metavar="SET=FOLDER,...",
                        help="a set's folder given directly (else ../shared/data/get finds it)")
    parser.add_argument("--scratch", default="", metavar="ARCH",
                        help="from scratch instead: torchvision ARCH (e.g. resnet18), imgclf against fastai's "
                        "fit_one_cycle, no weights")
    parser.add_argument("--worker", choices=("fastai", "probe"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--valid", help=argparse.SUPPRESS)
    for hidden in ("--w-size", "--w-epochs", "--w-seed"):
        parser.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one peer run, in the peers' Python: one JSON line
        print(json.dumps(fastai_worker(args) if args.worker == "fastai" else probe_worker(args)))
        return
    benchmark(args)


if __name__ == "__main__":
    main()
