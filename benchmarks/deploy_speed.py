"""Deploying on this CPU: the checkpoint (fp32, bf16), ONNX (fp32, int8) and OpenVINO (fp32, int8), side by side.

Two models: resnet18 at 224 on the ants/bees photos (trained from scratch here: no pretrained weights offline;
the comparison is int8 against float of the same model) and the notes' network (tutorial_cnn) on the CIFAR-10
folders. For each format: accuracy on the held-out split, images/s at batch 64 and the latency of one picture
(model compute on decoded uint8 pictures, medians of alternated rounds), and the export's own time. ONNX files
are timed in both runtimes (ONNX Runtime, OpenVINO), the evidence for predict's choice of runtime. Then
`imgclf predict` with the fastest resnet18 export against the notes' section-31 loop on the ants/bees val photos
(as benchmarks/predict_speed.py), and the first answer of the command for one picture.

    python benchmarks/deploy_speed.py --hymenoptera $(../shared/data/get hymenoptera) \
        --cifar $(../shared/data/get cifar10) --work /tmp/deploy
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from _common import PYTHON, check, machine, run_measured
from predict_speed import first_line_seconds, notes_loop

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name -> (data flag, training arguments)
    "resnet18": ("hymenoptera", ["--model", "resnet18", "--img-size", "224", "--epochs", "15", "--batch-size", "32"]),
    "tutorial_cnn": ("cifar", ["--model", "tutorial_cnn", "--epochs", "2"]),
}


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def checkpoint(name: str, data: str, work: Path) -> Path:
    """WORK/NAME/checkpoints/best.pt, trained now unless a former run left it."""
    out = work / name
    best = out / "checkpoints" / "best.pt"
    if not best.is_file():
        m = check(run_measured([PYTHON, "-m", "imgclf", "train", "--data", data, *MODELS[name][1], "--out", str(out)]),
                  f"training {name}")
        print(f"trained {name} on {data} in {m.seconds:.0f}s", flush=True)
    return best


def exports(ckpt: Path) -> dict[str, tuple[Path, float]]:
    """Every deploy format of `ckpt`, written beside it now: {label: (file, seconds to export)}."""
    from imgclf.export import export_checkpoint

    made = {}
    for fmt in ("onnx", "openvino"):
        for int8 in (False, True):
            start = time.perf_counter()
            exported = export_checkpoint(ckpt, fmt, int8=int8, force=True)  # a rerun replaces its exports
            made[f"{fmt} {'int8' if int8 else 'fp32'}"] = (exported.path, time.perf_counter() - start)
            print(exported.describe(), flush=True)
    return made


def variants(ckpt: Path, made: dict) -> dict[str, object]:
    """label -> a Predictor: the checkpoint in fp32 and bf16, each export in each runtime that can run it."""
    from imgclf.predict import Predictor

    out = {f"checkpoint {p}": Predictor.from_path(ckpt, device="cpu", precision=p) for p in ("fp32", "bf16")}
    for label, (path, _) in made.items():
        runtimes = ("onnxruntime", "openvino") if label.startswith("onnx") else ("openvino",)
        for runtime in runtimes:
            out[f"{label} ({runtime})"] = Predictor.from_path(path, runtime=runtime)
    return out


def held_out(ckpt: Path):
    """The held-out split of the checkpoint's data set, decoded as predict decodes pictures."""
    from imgclf.checkpoint import load_checkpoint
    from imgclf.config import DataConfig
    from imgclf.evaluate import _choose
    from imgclf.sources import load_data

    saved = load_checkpoint(ckpt)
    inp, recorded = saved["input"], saved["config"]["data"]
    cfg = DataConfig(data=recorded["data"], val_fraction=recorded["val_fraction"])
    data = load_data(replace(cfg, img_size=inp["size"], augment="none"), img_size=inp["size"],
                     channels=inp["channels"], progress=False)
    name, split = _choose(data, None, cfg.data)
    return name, split, len(data.classes)


def timings(predictor, images, rounds: int, batch: int = 64) -> tuple[float, float]:
    """(images/s at `batch`, seconds for one picture): medians over `rounds` passes."""
    import torch

    x = torch.as_tensor(images)
    predictor.probabilities(x[:batch])  # warm-up: first-call compilation, allocations
    predictor.probabilities(x[:1])
    speed, latency = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            predictor.probabilities(x[i : i + batch])
        speed.append(len(x) / (time.perf_counter() - start))
        for i in range(5):
            start = time.perf_counter()
            predictor.probabilities(x[i : i + 1])
            latency.append(time.perf_counter() - start)
    return statistics.median(speed), statistics.median(latency)


def table(name: str, ckpt: Path, rounds: int, pictures: int) -> dict:
    """Accuracy, images/s and latency of every format of one model; returns {label: (path, img/s)}."""
    import numpy as np

    from imgclf.evaluate import score

    made = exports(ckpt)
    split_name, split, k = held_out(ckpt)
    images = np.asarray(split.images[:pictures])
    runs = variants(ckpt, made)
    rows = {label: {"acc": score(p.probabilities, split, k, 64)["acc"]} for label, p in runs.items()}
    for _ in range(rounds):  # alternated rounds: a change in the machine's load touches every format alike
        for label, predictor in runs.items():
            speed, latency = timings(predictor, images, 1)
            rows[label].setdefault("speed", []).append(speed)
            rows[label].setdefault("latency", []).append(latency)
    base = statistics.median(rows["checkpoint fp32"]["speed"])
    print(f"\n{name}: {len(split)} pictures of the {split_name} split; speed on {len(images)} decoded pictures, "
          f"batch 64; latency: one picture; medians of {rounds} alternated rounds; load average {load()}")
    print(f"  {'format (runtime)':<30} {'accuracy':>9} {'img/s':>8} {'x ckpt':>7} {'latency ms':>11} {'export s':>9}")
    for label, row in rows.items():
        speed, latency = statistics.median(row["speed"]), statistics.median(row["latency"])
        made_s = made.get(label.split(" (")[0], (None, None))[1]
        print(f"  {label:<30} {row['acc']:>9.2%} {speed:>8.1f} {speed / base:>6.2f}x {latency * 1e3:>11.1f} "
              f"{'' if made_s is None else f'{made_s:.0f}':>9}", flush=True)
    return {label: (made[label.split(" (")[0]][0], statistics.median(row["speed"]))
            for label, row in rows.items() if not label.startswith("checkpoint")
            and runs[label].runtime == _auto_runtime(label)}


def _auto_runtime(label: str) -> str:
    from imgclf.predict import choose_runtime

    return choose_runtime("openvino" if label.startswith("openvino") else "onnx")


def predict_against_notes(ckpt: Path, fastest: Path, folder: Path, rounds: int) -> None:
    """imgclf's Predictor on `fastest` against the notes' one-picture loop on the checkpoint, alternated."""
    from imgclf.checkpoint import load_checkpoint
    from imgclf.models import model_from_checkpoint
    from imgclf.predict import Predictor, expand_paths

    saved = load_checkpoint(ckpt)
    inp, files = saved["input"], expand_paths([str(folder)])
    model, predictor = model_from_checkpoint(saved), Predictor.from_path(fastest)
    speeds: dict[str, list[float]] = {"notes' loop (checkpoint)": [], f"imgclf predict {fastest.name}": []}
    for _ in range(rounds):
        start = time.perf_counter()
        notes = notes_loop(model, files, inp["size"], inp["mean"], inp["std"])
        speeds["notes' loop (checkpoint)"].append(len(files) / (time.perf_counter() - start))
        start = time.perf_counter()
        answers = predictor.predict([str(folder)], topk=1)
        speeds[f"imgclf predict {fastest.name}"].append(len(files) / (time.perf_counter() - start))
    same = sum(saved["classes"][a] == r.labels[0] for a, r in zip(notes, answers, strict=True))
    base = statistics.median(speeds["notes' loop (checkpoint)"])
    print(f"\npredict, {len(files)} photos of {folder} (decoding included), medians of {rounds} alternated rounds, "
          f"load average {load()}:")
    for label, values in speeds.items():
        print(f"  {label:<40} {statistics.median(values):7.1f} img/s  {statistics.median(values) / base:.2f}x")
    print(f"  same top-1 as the notes' loop: {same}/{len(files)}")
    whole = check(run_measured([PYTHON, "-m", "imgclf", "predict", str(fastest), str(folder)]), "imgclf predict")
    print(f"`imgclf predict {fastest.name} {folder}`: {whole.seconds:.2f}s wall for {len(files)} pictures "
          f"({len(files) / whole.seconds:.1f} img/s including start-up), peak RSS {whole.peak_rss_mb:.0f} MB")
    firsts = [first_line_seconds([PYTHON, "-m", "imgclf", "predict", str(fastest), files[0]]) for _ in range(3)]
    print(f"`imgclf predict {fastest.name} one.jpg`: first answer after "
          f"{statistics.median(f for f, _ in firsts):.2f}s (median of 3; exits after "
          f"{statistics.median(e for _, e in firsts):.2f}s); load average {load()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hymenoptera", required=True, help="hymenoptera_data (train/ and val/)")
    parser.add_argument("--cifar", required=True, help="CIFAR-10 folders (train/ and test/)")
    parser.add_argument("--work", required=True, help="where the checkpoints and exports are kept between runs")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    # the commands it launches (imgclf train, imgclf predict) run this checkout's code too
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    print(machine(), flush=True)
    work = Path(args.work)
    data = {"hymenoptera": args.hymenoptera, "cifar": args.cifar}
    ckpts = {name: checkpoint(name, data[flag], work) for name, (flag, _) in MODELS.items()}
    fastest = table("resnet18 at 224, ants/bees", ckpts["resnet18"], args.rounds, 128)
    table("tutorial_cnn (the notes' network) at 32, CIFAR-10 folders", ckpts["tutorial_cnn"], args.rounds, 2048)
    label, (path, _) = max(fastest.items(), key=lambda item: item[1][1])
    print(f"\nfastest resnet18 export in predict's own runtime: {label}")
    predict_against_notes(ckpts["resnet18"], path, Path(args.hymenoptera) / "val", args.rounds)
    print(f"load average at the end: {load()}")


if __name__ == "__main__":
    main()
