"""imgclf's photo recipe against today's flip-crop recipe and a plain torchvision-reference pipeline, side by side.

On a folder of photos (default: the `pets` cats and dogs of ../shared/data), the same network (torchvision's
resnet18 from scratch), the same optimiser, schedule, label smoothing, batch size, precision and epochs:

  photo      `imgclf train` with its defaults for photos (the photo recipe)
  flip-crop  `imgclf train --augment flip-crop` (the recipe imgclf had for everything before)
  reference  this file's own loop, the way torchvision's classification reference trains: ImageFolder +
             DataLoader with worker processes, RandomResizedCrop, flip, TrivialAugmentWide, RandomErasing,
             MixUp/CutMix (`--ref-mix`), the eval preset Resize + CenterCrop

With `--finetune FOLDER` (default: the ants/bees photos), the photo variant's best.pt then serves as a local
pretrained file (`--pretrained`) for fine-tuning on that folder, photo recipe against flip-crop, same flags.

Each runs in its own process, one after the other; printed: validation accuracy after the last epoch,
training pictures per second (the epochs' training time only), wall time, and peak memory of the whole
process tree (sampled every 0.2 s, workers included). Run it with nothing else running:

    .venv/bin/python benchmarks/photo_recipe.py [--epochs 4] [--img-size 128] [--variants photo,flip-crop,reference]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import PYTHON, ROOT, machine, run_tree_measured

SHARED = ROOT.parent / "shared" / "data"
COMMON = "--model resnet18 --optimizer sgd --lr 0.05 --momentum 0.9 --weight-decay 5e-4 --label-smoothing 0.1 " \
         "--schedule onecycle --warmup-epochs 1"


def imgclf_variant(data: Path, out: Path, args, extra: str) -> dict:
    cmd = [PYTHON, "-m", "imgclf", "train", "--data", str(data), "--img-size", str(args.img_size),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
           "--out", str(out), *shlex.split(COMMON), *shlex.split(extra)]
    wall, peak, r = run_tree_measured(cmd)
    if r.returncode != 0:
        sys.exit(f"imgclf {extra} failed:\n{r.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = sum(rec["train_seconds"] for rec in records)
    n = len(list((data / "train").rglob("*.jpg")))
    return {"acc": records[-1]["val_acc"], "ips": n * len(records) / seconds, "wall": wall, "peak": peak,
            "accs": [rec["val_acc"] for rec in records]}


def reference_variant(data: Path, args) -> dict:
    cmd = [PYTHON, __file__, "--reference-child", "--data", str(data), "--img-size", str(args.img_size),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
           "--workers", str(args.workers), "--ref-mix", str(args.ref_mix)]
    wall, peak, r = run_tree_measured(cmd)
    if r.returncode != 0:
        sys.exit(f"reference failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {**out, "wall": wall, "peak": peak}


def reference_child(args) -> None:
    """The torchvision-reference way, in this process: per-picture PIL transforms in DataLoader workers."""
    import torch
    from torch import nn
    from torchvision import datasets, models
    from torchvision.transforms import v2

    from imgclf.optim import lr_factor, param_groups
    from imgclf.runtime import autocast_factory, resolve_precision

    torch.manual_seed(args.seed)
    size = args.img_size
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    train_tf = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True),
                           v2.RandomHorizontalFlip(), v2.TrivialAugmentWide(), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(mean, std), v2.RandomErasing(0.25)])
    eval_tf = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size),
                          v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    train_set = datasets.ImageFolder(str(args.data / "train"), train_tf)
    val_dir = next(args.data / n for n in ("val", "valid", "validation", "test") if (args.data / n).is_dir())
    val_set = datasets.ImageFolder(str(val_dir), eval_tf)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, num_workers=args.workers)
    classes = len(train_set.classes)
    mix = v2.RandomChoice([v2.MixUp(alpha=0.2, num_classes=classes), v2.CutMix(alpha=1.0, num_classes=classes)])
    model = models.resnet18(num_classes=classes).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(model, 5e-4), lr=0.05, momentum=0.9, nesterov=True)
    total = args.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps=total, warmup_steps=len(loader), schedule="onecycle"))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    autocast = autocast_factory(torch.device("cpu"), resolve_precision("auto", torch.device("cpu")))
    train_seconds, seen, accs = 0.0, 0, []
    for _ in range(args.epochs):
        model.train()
        start = time.perf_counter()
        for x, y in loader:
            if args.ref_mix:
                x, y = mix(x, y)
            with autocast():
                loss = loss_fn(model(x.contiguous(memory_format=torch.channels_last)).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(x)
        train_seconds += time.perf_counter() - start
        model.eval()
        right = count = 0
        with torch.inference_mode(), autocast():
            for x, y in val_loader:
                right += int((model(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum())
                count += len(y)
        accs.append(right / count)
        print(f"reference epoch {len(accs)}: {accs[-1]:.2%}", file=sys.stderr, flush=True)
    print(json.dumps({"acc": accs[-1], "ips": seen / train_seconds, "accs": accs}))


def finetune(args, weights: Path, tmp: Path) -> None:
    """Fine-tune from `weights` on another photo folder: the photo recipe against flip-crop."""
    folder = Path(args.finetune)
    if args.finetune == "hymenoptera":
        folder = Path(subprocess.run([str(SHARED / "get"), "hymenoptera"], capture_output=True, text=True,
                                     check=True).stdout.strip())
    print(f"fine-tuning on {folder} from the photo run's best.pt (--pretrained), {args.finetune_flags}")
    for name, extra in (("photo", ""), ("flip-crop", "--augment flip-crop")):
        out = tmp / f"finetune-{name}"
        cmd = [PYTHON, "-m", "imgclf", "train", "--data", str(folder), "--model", "resnet18", "--pretrained",
               str(weights), "--img-size", str(args.img_size), "--seed", str(args.seed), "--out", str(out),
               *shlex.split(args.finetune_flags), *shlex.split(extra)]
        wall, peak, r = run_tree_measured(cmd)
        if r.returncode != 0:
            sys.exit(f"fine-tuning {name} failed:\n{r.stderr[-3000:]}")
        accs = [json.loads(line)["val_acc"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        print(f"{name:<10} val acc {accs[-1]:.2%} (per epoch {' '.join(f'{a:.1%}' for a in accs)})  wall {wall:.0f}s  "
              f"peak memory {peak:.0f} MB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="a folder of photos: train/<class>/ + val/ or test/ (pets)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="reference: DataLoader worker processes (2)")
    parser.add_argument("--ref-mix", type=int, default=1, help="reference: 1 = MixUp/CutMix as the issue asks (1)")
    parser.add_argument("--variants", default="photo,flip-crop,reference")
    parser.add_argument("--extra", default="", help="more imgclf flags for the photo variant")
    parser.add_argument("--finetune", default="hymenoptera", help="a photo folder to fine-tune on from the photo "
                        "variant's weights ('hymenoptera': the ants/bees photos; 'none': skip)")
    parser.add_argument("--finetune-flags", default="--epochs 5 --lr 0.01 --batch-size 32",
                        help="imgclf flags of the fine-tuning runs")
    parser.add_argument("--reference-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.data is None:
        args.data = Path(subprocess.run([str(SHARED / "get"), "pets"], capture_output=True, text=True,
                                        check=True).stdout.strip())
    if args.reference_child:
        return reference_child(args)
    print(machine())
    print(f"data {args.data}; resnet18 from scratch at {args.img_size} px, batch {args.batch_size}, "
          f"{args.epochs} epochs, seed {args.seed}; {COMMON}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            if name == "reference":
                results[name] = reference_variant(args.data, args)
            else:
                extra = {"photo": args.extra, "flip-crop": "--augment flip-crop"}[name]
                results[name] = imgclf_variant(args.data, Path(tmp) / name, args, extra)
            r = results[name]
            print(f"{name:<10} val acc {r['acc']:.2%} (per epoch {' '.join(f'{a:.1%}' for a in r['accs'])})  "
                  f"train {r['ips']:.0f} img/s  wall {r['wall']:.0f}s  peak memory {r['peak']:.0f} MB", flush=True)
        if "photo" in results and "reference" in results:
            p, ref = results["photo"], results["reference"]
            print(f"photo / reference: accuracy {100 * (p['acc'] - ref['acc']):+.2f} points, training speed "
                  f"{p['ips'] / ref['ips']:.2f}x, peak memory {p['peak'] / ref['peak']:.2f}x")
        if args.finetune != "none" and "photo" in results:
            finetune(args, Path(tmp) / "photo" / "checkpoints" / "best.pt", Path(tmp))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return None


if __name__ == "__main__":
    main()
