"""The decode-once cache at scale (issue 12.6): built chunk by chunk into a memory map, continued after a
SIGKILL instead of restarted, and never left corrupt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import write_class_folder

from imgclf import cache as cache_mod
from imgclf.cache import cached_split
from imgclf.sources import list_images

CHILD = """
import sys
from pathlib import Path
from imgclf import cache
cache.BUILD_CHUNK = 16
files = sorted(Path(sys.argv[1]).rglob("*.png"))
split, _ = cache.cached_split(files, [0] * len(files), size=12, channels=3, cache_root=Path(sys.argv[2]),
                              progress=False)
print(len(split))
"""


@pytest.mark.slow
def test_a_killed_build_is_continued_not_restarted_and_never_corrupt(tmp_path, monkeypatch):
    folder = write_class_folder(tmp_path / "pics", ["a"], 400, size=12)
    root = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(root)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    progress = None
    while time.monotonic() < deadline and child.poll() is None:  # kill once some chunks, not all, are done
        progress = next(root.glob(".partial-*/progress.json"), None)
        if progress is not None and '"done": 16' not in progress.read_text():
            break
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    if child.returncode == 0:
        pytest.skip("the build finished before it could be killed (a very fast machine)")
    assert not list(root.glob("*/meta.json"))  # nothing that looks finished
    done = __import__("json").loads(progress.read_text())["done"]
    assert 0 < done < 400
    files = list_images(folder)
    decoded = []
    real = cache_mod._decode_many

    def counting(chunk, **kwargs):
        decoded.extend(chunk)
        return real(chunk, **kwargs)

    monkeypatch.setattr(cache_mod, "_decode_many", counting)
    monkeypatch.setattr(cache_mod, "BUILD_CHUNK", 16)
    split, bad = cached_split(files, [0] * len(files), size=12, channels=3, cache_root=root, progress=False)
    assert len(decoded) == 400 - done and not bad  # only what was left
    monkeypatch.setattr(cache_mod, "BUILD_CHUNK", 4096)
    fresh, _ = cached_split(files, [0] * len(files), size=12, channels=3, cache_root=tmp_path / "fresh",
                            progress=False)
    assert torch.equal(split.images, fresh.images) and split.files == fresh.files
    assert not list(root.glob(".partial-*"))


def test_memory_stays_flat_while_a_large_cache_builds(tmp_path, monkeypatch):
    """Pictures go straight into the memory-mapped file: no array of the whole set is ever held."""
    folder = write_class_folder(tmp_path / "pics", ["a"], 64, size=12)
    files = list_images(folder)
    allocated = []
    real_empty = np.empty

    def watching_empty(shape, *args, **kwargs):
        allocated.append(int(np.prod(shape)))
        return real_empty(shape, *args, **kwargs)

    monkeypatch.setattr(cache_mod, "BUILD_CHUNK", 8)
    monkeypatch.setattr(cache_mod.np, "empty", watching_empty)
    split, _ = cached_split(files, [0] * 64, size=12, channels=3, cache_root=tmp_path / "c", progress=False)
    assert len(split) == 64 and max(allocated) <= 8 * 3 * 12 * 12  # one chunk at a time
