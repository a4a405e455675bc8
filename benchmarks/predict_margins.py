"""How far a checkpoint's logits under bf16 autocast are from its fp32 logits on real pictures: the
measurement behind predict.BF16_LOGIT_ERROR (the bound under which `predict` computes a picture again in
fp32). Prints the distribution of the largest per-picture |bf16 - fp32| logit, how many top-1 labels differ,
and how many pictures the bound sends back to fp32.

    python benchmarks/predict_margins.py CKPT FOLDER [FOLDER ...] --limit 1000
"""

from __future__ import annotations

import argparse
import sys

from _common import ROOT, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("folders", nargs="+", help="pictures")
    parser.add_argument("--limit", type=int, default=1000, help="pictures used (%(default)s)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import numpy as np
    import torch

    from imgclf.predict import BF16_LOGIT_ERROR, Predictor, expand_paths, recheck_rows

    print(machine(), flush=True)
    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu", precision="fp32")
    files = expand_paths(args.folders)[: args.limit]
    x = torch.from_numpy(np.stack([predictor._decode(f) for f in files]))  # noqa: SLF001
    exact, reduced = [], []
    with torch.inference_mode():
        for i in range(0, len(x), 64):
            batch = predictor.transform(x[i : i + 64], train=False, memory_format=torch.channels_last)
            exact.append(predictor.model(batch).float())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                reduced.append(predictor.model(batch).float())
    a, b = torch.cat(exact), torch.cat(reduced)
    error = (a - b).abs().max(1).values
    q = torch.quantile(error, torch.tensor([0.5, 0.99, 1.0])).tolist()
    again = recheck_rows(b, BF16_LOGIT_ERROR, predictor.task, predictor.reject_below)
    answered = torch.where(again, a.argmax(1), b.argmax(1))
    print(f"{len(files)} pictures: largest |bf16 - fp32| logit per picture: median {q[0]:.4f}, 99th percentile "
          f"{q[1]:.4f}, max {q[2]:.4f} (bound {BF16_LOGIT_ERROR}); largest |logit| median "
          f"{float(a.abs().max(1).values.median()):.2f}")
    print(f"top-1 bf16 alone = fp32 on {int((a.argmax(1) == b.argmax(1)).sum())}/{len(a)}; re-checked in fp32: "
          f"{int(again.sum())}; answered top-1 = fp32 on {int((answered == a.argmax(1)).sum())}/{len(a)}")


if __name__ == "__main__":
    main()
