"""The decode-once cache on a large folder of photos: memory while it builds, a SIGKILL half-way, and the rerun.

Writes N photo-like JPEGs (default 100,000, 160x120, two classes) into a scratch folder, then:
  1. starts `imgclf show` on it (which decodes the whole folder into the cache, as `train` would), kills it
     with SIGKILL once about 40% is decoded, and checks that nothing that looks finished was left;
  2. reruns it: the build continues from where it was killed; prints its wall time and peak memory;
  3. runs it once more: the cache is read, not built.
Memory: the peak over the process tree (workers included, sampled every 0.2 s) of anonymous resident memory
(RssAnon: what the process itself holds), and of all resident memory (VmRSS, which also counts the pages of
the memory-mapped cache file that were touched: page cache, given back under pressure). Run with nothing else running:

    .venv/bin/python benchmarks/cache_scale.py [--count 100000] [--img-size 96]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from _common import PYTHON, ROOT, machine, tree_memory_mb


def run_measured(args: list[str]):
    """Run `args`; (wall seconds, peak RssAnon MB, peak VmRSS MB, returncode, stderr)."""
    import threading

    start, peak = time.perf_counter(), [0.0, 0.0]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        done = threading.Event()

        def sample():
            while not done.is_set():
                anon, rss = tree_memory_mb(proc.pid)
                peak[0], peak[1] = max(peak[0], anon), max(peak[1], rss)
                done.wait(0.2)

        threading.Thread(target=sample, daemon=True).start()
        proc.wait()
        done.set()
        err.seek(0)
        return time.perf_counter() - start, peak[0], peak[1], proc.returncode, err.read()


def _write(job: tuple[Path, int]) -> None:
    from PIL import Image

    folder, i = job
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:120, 0:160]
    base = rng.uniform(40, 200, 3)
    pixels = base + 40 * np.sin(xx[..., None] / rng.uniform(5, 30) + rng.uniform(0, 6, 3)) + rng.normal(0, 12, (120, 160, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=85)


def make_folder(root: Path, count: int) -> None:
    jobs = []
    for c, name in enumerate(("cat", "dog")):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        jobs += [(folder, i) for i in range(c, count, 2)]
    with Pool(os.cpu_count()) as pool:
        pool.map(_write, jobs, chunksize=256)


def show_cmd(data: Path, cache: Path, size: int) -> list[str]:
    return [PYTHON, "-m", "imgclf", "show", str(data), "--img-size", str(size), "--cache-dir", str(cache),
            "--out", str(cache.parent / "show.png"), "--random", "8"]


def kill_half_way(cmd: list[str], cache: Path, fraction: float) -> tuple[int, int]:
    """Start `cmd`, SIGKILL it once a build's recorded progress passes `fraction`; (done, total) then."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = total = 0
    while proc.poll() is None:
        for progress in cache.glob(".partial-*/progress.json"):
            try:
                state = json.loads(progress.read_text())
            except (OSError, ValueError):
                continue
            total = max(total, len(state.get("kept_index", [])) + len(state.get("bad", [])))
            done = state["done"]
        if done and done >= fraction * (ARGS.count * 0.8):  # the train split is 80% of the folder
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    return done, proc.returncode


def main() -> None:
    print(machine())
    scratch = Path(tempfile.mkdtemp(prefix="imgclf-scale-"))
    try:
        data, cache = scratch / "photos", scratch / "cache"
        start = time.perf_counter()
        make_folder(data, ARGS.count)
        print(f"wrote {ARGS.count:,} JPEGs (160x120) in {time.perf_counter() - start:.0f}s")
        done, code = kill_half_way(show_cmd(data, cache, ARGS.img_size), cache, 0.4)
        finished = list(cache.glob("*/meta.json"))
        print(f"1. SIGKILL (exit {code}) after {done:,} pictures of the train split were recorded as decoded; "
              f"finished caches left: {len(finished)} (the val split may have finished first)")
        seconds, anon, rss, code, err = run_measured(show_cmd(data, cache, ARGS.img_size))
        print(f"2. rerun: exit {code}, {seconds:.0f}s wall, peak memory {anon:.0f} MB anonymous, {rss:.0f} MB "
              f"resident in all; 'continuing' said: {'continuing an interrupted cache build' in err}")
        seconds, anon, rss, code, err = run_measured(show_cmd(data, cache, ARGS.img_size))
        size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**30
        print(f"3. cached: exit {code}, {seconds:.1f}s wall, peak memory {anon:.0f} MB anonymous, {rss:.0f} MB "
              f"resident in all; cache {size:.2f} GB on disk; unfinished builds left: "
              f"{len(list(cache.glob('.partial-*')))}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--img-size", type=int, default=96)
    ARGS = parser.parse_args()
    sys.exit(main())
