"""Make `fashion-mnist-mini`, the small real data set shipped inside the package (imgclf samples/train
`--data fashion-mnist-mini`): a stratified subset of Fashion-MNIST (Zalando Research, MIT licence), 600 train
and 100 test pictures per class, as the four standard IDX .gz files.

    python tools/make_fashion_mini.py /path/to/fashion-mnist [src/imgclf/datasets/fashion-mnist-mini]

The subset is reproducible: a fixed seed picks the pictures, they keep the original order, and the gzip
headers carry no time stamp, so running it again writes byte-identical files.
"""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np

PER_CLASS = {"train": 600, "t10k": 100}
SEED = 20170825  # Fashion-MNIST's publication date; any fixed number would do


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        _, _, ndim = struct.unpack(">HBB", f.read(4))
        dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes(), compresslevel=9, mtime=0))


def stratified(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` indices of every class, drawn without replacement, returned in their original order."""
    picked = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def main(source: Path, out: Path) -> None:
    rng = np.random.default_rng(SEED)
    out.mkdir(parents=True, exist_ok=True)
    for split, per_class in PER_CLASS.items():
        images = read_idx(source / f"{split}-images-idx3-ubyte.gz")
        labels = read_idx(source / f"{split}-labels-idx1-ubyte.gz")
        keep = stratified(labels, per_class, rng)
        write_idx(out / f"{split}-images-idx3-ubyte.gz", images[keep])
        write_idx(out / f"{split}-labels-idx1-ubyte.gz", labels[keep])
        print(f"{split}: {len(keep)} of {len(labels)} pictures, {per_class} per class")


if __name__ == "__main__":
    default_out = Path(__file__).resolve().parents[1] / "src/imgclf/datasets/fashion-mnist-mini"
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else default_out)
