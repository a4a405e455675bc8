"""The decode-once store (notes 06, 14): pictures decoded in worker processes into uint8 arrays, kept on disk.

A folder's pictures are decoded once into a cache keyed by their file list, sizes and modification times, so
later epochs and later runs never decode a JPEG again. A large cache is memory-mapped rather than read into
memory. The unit of data everywhere is a `Split`: uint8 images (N, C, H, W) with integer labels.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from imgclf.errors import UserError
from imgclf.transforms import BadImage, compute_mean_std, load_image

CACHE_FORMAT = 2
MMAP_BYTES = 2 << 30  # caches larger than this are memory-mapped, not read whole


@dataclass
class Split:
    images: torch.Tensor | np.ndarray  # uint8 (N, C, H, W); a read-only memmap when large
    labels: torch.Tensor  # int64 (N,)
    files: list[str] | None = None  # source file of each image (folders only)

    def __len__(self) -> int:
        return int(self.labels.shape[0])



def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgclf"


def _fingerprint(files: list[Path], labels: list[int], size: int, channels: int) -> str:
    h = hashlib.sha256(f"{CACHE_FORMAT}:{size}:{channels}".encode())
    for path, label in zip(files, labels, strict=True):
        st = path.stat()
        h.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    return h.hexdigest()[:24]


def cached_split(files: list[Path], labels: list[int], *, size: int, channels: int, cache_root: Path,
                 progress: bool) -> tuple[Split, list[tuple[str, str]]]:
    """Decode `files` once into `cache_root/<fingerprint>/`; later calls read (or memory-map) the result."""
    key = _fingerprint(files, labels, size, channels)
    folder = cache_root / key
    if not (folder / "meta.json").is_file():
        images, bad = _decode_many(files, size=size, channels=channels, progress=progress)
        bad_set = {f for f, _ in bad}
        kept = [i for i, f in enumerate(files) if str(f) not in bad_set]
        _write_cache(folder, images, [labels[i] for i in kept], [str(files[i]) for i in kept], bad)
    meta = json.loads((folder / "meta.json").read_text())
    images = np.load(folder / "images.npy", mmap_mode="r")
    if images.nbytes <= MMAP_BYTES:
        images = torch.from_numpy(np.load(folder / "images.npy"))
    for path, reason in meta["bad"] if progress else ():  # reported by the main process only
        print(f"imgclf: skipping {path}: {reason}", file=sys.stderr)
    split = Split(images, torch.tensor(meta["labels"], dtype=torch.int64), meta["files"])
    return split, [tuple(b) for b in meta["bad"]]


def _write_cache(folder: Path, images: np.ndarray, labels: list[int], files: list[str], bad) -> None:
    """Write into a temporary folder, then rename: a killed process never leaves half a cache."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        np.save(tmp / "images.npy", images)
        meta = {"labels": labels, "files": files, "bad": [list(b) for b in bad]}
        (tmp / "meta.json").write_text(json.dumps(meta))
        with contextlib.suppress(OSError):  # another process wrote the same cache first: theirs is as good
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_stats(split: Split, cache_root: Path, files: list[Path], size: int, channels: int):
    path = cache_root / f"stats-{_fingerprint(files, [0] * len(files), size, channels)}.json"
    if path.is_file():
        stats = json.loads(path.read_text())
        return tuple(stats["mean"]), tuple(stats["std"])
    mean, std = compute_mean_std(split.images)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"mean": mean, "std": std}))
    os.replace(tmp, path)
    return mean, std


def _decode_one(job: tuple[str, int, int]):
    path, size, channels = job
    try:
        return load_image(path, size=size, channels=channels), None
    except BadImage as err:
        return None, str(err)


def _decode_many(files: list[Path], *, size: int, channels: int, progress: bool):
    """Decode pictures in worker processes into uint8 (N, C, size, size); return it and the (file, reason) skipped."""
    jobs = [(str(f), size, channels) for f in files]
    out = np.empty((len(files), channels, size, size), dtype=np.uint8)
    bad, kept = [], 0
    workers = min(len(os.sched_getaffinity(0)), 8, max(1, len(files) // 256))
    iterator = _pool_map(jobs, workers)
    if progress and len(files) > 1000:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(files), desc="decoding (once, cached)", unit="img",
                        disable=not sys.stderr.isatty(), leave=False)
    for (path, _, _), (arr, reason) in zip(jobs, iterator, strict=True):
        if arr is None:
            bad.append((path, reason))
        else:
            out[kept] = arr.transpose(2, 0, 1)
            kept += 1
    return out[:kept], bad


def _pool_map(jobs, workers: int) -> Iterator:
    if workers <= 1:
        yield from map(_decode_one, jobs)
        return
    with get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers) as pool:
        yield from pool.imap(_decode_one, jobs, chunksize=64)



def check_all(files: list[Path], *, size: int, channels: int) -> None:
    bad = [(f, r) for f, r in _decode_many(files, size=size, channels=channels, progress=False)[1]]
    if bad:
        listing = "; ".join(f"{f}: {r}" for f, r in bad)
        raise UserError(f"--strict-data: {len(bad)} unreadable file(s): {listing}")

