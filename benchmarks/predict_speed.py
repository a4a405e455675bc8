"""`imgclf predict` against the notes' section-31 demo loop, on a folder of photos, alternated in one run.

The notes' loop takes one picture at a time: PIL open, convert to RGB, Resize + CenterCrop + ToTensor +
Normalize, reshape to a batch of one, `model.eval()`, `torch.no_grad()`, argmax. imgclf's Predictor decodes
in threads and predicts in batches under inference_mode. Both use the same checkpoint (resnet18 at 224,
trained for one epoch here unless --checkpoint is given; weights do not change the speed). Also timed: the
`imgclf predict` command on the whole folder and on one picture, from launch to its first line of output.

    python benchmarks/predict_speed.py --data $(/work/shared/data/get hymenoptera)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import PYTHON, ROOT, check, machine, run_measured


def notes_loop(model, files: list[str], size: int, mean, std) -> list[int]:
    import torch
    import torchvision
    from PIL import Image

    transform = torchvision.transforms.Compose([
        torchvision.transforms.Resize(size), torchvision.transforms.CenterCrop(size),
        torchvision.transforms.ToTensor(), torchvision.transforms.Normalize(mean, std)])
    answers = []
    for image_path in files:
        image = Image.open(image_path)
        image = image.convert("RGB")
        image = transform(image)
        image = torch.reshape(image, (1, 3, size, size))
        model.eval()
        with torch.no_grad():
            output = model(image)
        answers.append(int(output.argmax(1)))
    return answers


def first_line_seconds(args: list[str]) -> tuple[float, float]:
    """Seconds from launching `args` to its first line on stdout, and to its exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    proc.stdout.readline()
    first = time.perf_counter() - start
    proc.communicate()
    return first, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder with train/ and val/ (hymenoptera_data) or test/ "
                        "(pets: its 2,000 test photos are predicted)")
    parser.add_argument("--checkpoint", help="an imgclf checkpoint (default: train resnet18 for one epoch, or reuse "
                        "the one in --run-dir)")
    parser.add_argument("--run-dir", help="where that resnet18 run is kept between invocations (default: temporary)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    print(machine(), flush=True)
    sys.path.insert(0, str(ROOT / "src"))
    from imgclf.checkpoint import load_checkpoint
    from imgclf.models import model_from_checkpoint
    from imgclf.predict import Predictor, expand_paths

    tmp = tempfile.TemporaryDirectory()
    ckpt_path = args.checkpoint
    out = Path(args.run_dir or Path(tmp.name) / "run")
    if ckpt_path is None and (out / "checkpoints" / "last.pt").is_file():
        ckpt_path = str(out / "checkpoints" / "last.pt")
        print(f"checkpoint: {ckpt_path}")
    if ckpt_path is None:
        m = check(run_measured([PYTHON, "-m", "imgclf", "train", "--data", args.data, "--model", "resnet18",
                                "--img-size", "224", "--epochs", "1", "--batch-size", "32", "--out", str(out)]),
                  "training the resnet18 checkpoint")
        print(f"checkpoint: resnet18 trained 1 epoch on {args.data} in {m.seconds:.0f}s")
        ckpt_path = str(out / "checkpoints" / "last.pt")
    ckpt = load_checkpoint(ckpt_path)
    folder = Path(args.data) / ("val" if (Path(args.data) / "val").is_dir() else "test")
    files = expand_paths([str(folder)])
    inp = ckpt["input"]
    model = model_from_checkpoint(ckpt)
    predictors = {p: Predictor(ckpt, device="cpu", precision=p) for p in ("fp32", "auto")}
    print(f"{len(files)} pictures in {folder}; model {ckpt['model']['name']} at {inp['size']}; "
          f"imgclf predict batch {args.batch_size}")

    speeds: dict[str, list[float]] = {"notes' loop": [], **{f"imgclf --precision {p}": [] for p in predictors}}
    for _ in range(args.rounds):
        start = time.perf_counter()
        notes_answers = notes_loop(model, files, inp["size"], inp["mean"], inp["std"])
        speeds["notes' loop"].append(len(files) / (time.perf_counter() - start))
        for precision, predictor in predictors.items():
            start = time.perf_counter()
            results = predictor.predict([str(folder)], topk=1, batch_size=args.batch_size)
            speeds[f"imgclf --precision {precision}"].append(len(files) / (time.perf_counter() - start))
            same = sum(ckpt["classes"][a] == r.labels[0] for a, r in zip(notes_answers, results, strict=True))
            speeds.setdefault(f"same top-1 as the notes' loop, {precision}", []).append(same)
        print("   ".join(f"{k} {v[-1]:.1f} img/s" for k, v in speeds.items() if "same" not in k), flush=True)
    base = statistics.median(speeds["notes' loop"])
    print(f"medians of {args.rounds} rounds:")
    for name, values in speeds.items():
        if name.startswith("same"):
            print(f"  {name}: {min(values)}/{len(files)} pictures")
        else:
            print(f"  {name:<26} {statistics.median(values):6.1f} img/s  {statistics.median(values) / base:.2f}x")
    for precision, predictor in predictors.items():  # `auto`: bf16 where native, unsure pictures again in fp32
        print(f"  --precision {precision}: {predictor.dtype}, {predictor.rechecked / args.rounds:.0f} pictures a "
              f"round computed again in fp32")
    del model, predictors

    cmd = [PYTHON, "-m", "imgclf", "predict", ckpt_path, "--precision", "auto"]
    whole = check(run_measured([*cmd, str(folder), "--batch-size", str(args.batch_size)]), "imgclf predict")
    print(f"`imgclf predict CKPT {folder} --precision auto`: {whole.seconds:.2f}s wall for {len(files)} pictures "
          f"({len(files) / whole.seconds:.1f} img/s including start-up), peak RSS {whole.peak_rss_mb:.0f} MB")
    firsts = [first_line_seconds([*cmd, files[0]]) for _ in range(3)]
    print(f"`imgclf predict CKPT one.jpg --precision auto`: first answer after {statistics.median(f for f, _ in firsts):.2f}s "
          f"(median of 3; exits after {statistics.median(e for _, e in firsts):.2f}s)")
    print("load average at the end: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    tmp.cleanup()


if __name__ == "__main__":
    main()
