"""Where `imgclf predict` spends its time in float on a CPU, and what each lever gives (issue 26, item 3).

Decodes the pictures once (Predictor's own path, timed), then runs the same uint8 batches through each
candidate, alternated round by round: torch fp32 (predict's path: BatchNorm folded, channels-last), torch
bf16 autocast, and an ONNX export of the checkpoint in ONNX Runtime and in OpenVINO (fp32). Prints the ratio
to torch fp32, how many top-1 labels agree with it and the largest probability difference, with the load.

    python benchmarks/predict_levers.py CKPT MODEL.onnx FOLDER --limit 192
(MODEL.onnx from `imgclf export CKPT --format onnx`.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from _common import ROOT, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("onnx", help="the checkpoint exported by `imgclf export --format onnx`")
    parser.add_argument("folder", help="pictures")
    parser.add_argument("--limit", type=int, default=192, help="pictures used (%(default)s)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import numpy as np
    import torch

    from imgclf.checkpoint import load_checkpoint
    from imgclf.predict import ExportedPredictor, Predictor, expand_paths

    print(machine(), flush=True)
    files = expand_paths([args.folder])[: args.limit]
    ckpt = load_checkpoint(args.checkpoint)
    candidates = {"torch fp32": Predictor(ckpt, device="cpu", precision="fp32"),
                  "torch bf16": Predictor(ckpt, device="cpu", precision="bf16"),
                  "onnxruntime fp32": ExportedPredictor(args.onnx, "onnx", runtime="onnxruntime"),
                  "openvino fp32": ExportedPredictor(args.onnx, "onnx", runtime="openvino", precision="fp32")}
    start = time.perf_counter()
    x = torch.from_numpy(np.stack([candidates["torch fp32"]._decode(f) for f in files]))  # noqa: SLF001
    print(f"decoding {len(files)} pictures in one thread: {time.perf_counter() - start:.2f}s", flush=True)
    times: dict[str, list[float]] = {}
    outs = {}
    for r in range(args.rounds):
        for name, predictor in candidates.items():
            start = time.perf_counter()
            outs[name] = torch.cat([predictor.probabilities(x[i : i + 64]) for i in range(0, len(x), 64)])
            times.setdefault(name, []).append(time.perf_counter() - start)
        print(f"round {r}: " + "  ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items())
              + f"  load {os.getloadavg()[0]:.1f}", flush=True)
    ref, base = outs["torch fp32"], statistics.median(times["torch fp32"])
    for name, values in times.items():
        out = outs[name]
        print(f"{name:18s} {len(files) / statistics.median(values):6.1f} img/s  {base / statistics.median(values):.2f}x  "
              f"top-1 same {int((out.argmax(1) == ref.argmax(1)).sum())}/{len(ref)}  "
              f"max |dp| {float((out - ref).abs().max()):.1e}")


if __name__ == "__main__":
    main()
