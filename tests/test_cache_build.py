"""The decode-once cache at scale (issue 12.6): built chunk by chunk into a memory map, continued after a
SIGKILL instead of restarted, and never left corrupt."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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


# ---------------------------------------------------------------- caches that heal (issue 14.5, 14.6)

def build(files, root, *, progress=False):
    return cached_split(files, [i % 2 for i in range(len(files))], size=12, channels=3, cache_root=root,
                        progress=progress)


@pytest.mark.parametrize("damage", ["torn meta.json", "meta.json of other counts", "truncated images.npy",
                                    "images.npy of another shape"])
def test_a_damaged_cache_is_named_and_built_again_by_itself(tmp_path, capsys, damage):
    files = list_images(write_class_folder(tmp_path / "pics", ["a", "b"], 5, size=12))
    good, _ = build(files, tmp_path / "c")
    folder = next(p for p in (tmp_path / "c").iterdir() if (p / "meta.json").is_file())
    if damage == "torn meta.json":
        (folder / "meta.json").write_text((folder / "meta.json").read_text()[:30])
    elif damage == "meta.json of other counts":
        (folder / "meta.json").write_text((folder / "meta.json").read_text().replace('"count": 10', '"count": 9'))
    elif damage == "truncated images.npy":
        with open(folder / "images.npy", "r+b") as f:
            f.truncate(500)
    else:
        np.save(folder / "images.npy", np.zeros((10, 3, 8, 8), dtype=np.uint8))
    split, _ = build(files, tmp_path / "c", progress=True)
    lines = capsys.readouterr().err.splitlines()
    damaged = "meta.json" if "meta" in damage else "images.npy"
    assert len(lines) == 1 and lines[0].startswith(f"imgclf: the cache file {folder / damaged} is damaged ("), lines
    assert lines[0].endswith("); building the cache again")
    assert torch.equal(split.images, good.images) and split.files == good.files
    build(files, tmp_path / "c", progress=True)  # healed: read as it is, nothing said
    assert capsys.readouterr().err == ""


def test_damaged_statistics_are_named_and_computed_again(tmp_path, capsys):
    from imgclf.cache import cached_stats

    files = list_images(write_class_folder(tmp_path / "pics", ["a", "b"], 4, size=12))
    split, _ = build(files, tmp_path / "c")
    first = cached_stats(split, tmp_path / "c", files, 12, 3)
    stats = next((tmp_path / "c").glob("stats-*.json"))
    stats.write_text('{"mean": [0.5')
    assert cached_stats(split, tmp_path / "c", files, 12, 3) == first
    assert capsys.readouterr().err.startswith(f"imgclf: the cache file {stats} is damaged (")
    assert cached_stats(split, tmp_path / "c", files, 12, 3) == first and capsys.readouterr().err == ""


def test_interrupted_builds_are_not_left_for_ever(tmp_path, monkeypatch, capsys):
    """A killed build of data that has changed since, or one nobody continued for a week, is removed by the
    next build (unless a process holds its lock); the build is fsynced before it is renamed into place."""
    pics = write_class_folder(tmp_path / "pics", ["a", "b"], 6, size=12)
    files = list_images(pics)
    root = tmp_path / "c"
    monkeypatch.setattr(cache_mod, "BUILD_CHUNK", 4)
    real = cache_mod._decode_many
    calls = []

    def killed_after_one_chunk(chunk, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # as a Ctrl+C or a kill part-way leaves it
        return real(chunk, **kwargs)

    monkeypatch.setattr(cache_mod, "_decode_many", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        build(files, root)
    monkeypatch.setattr(cache_mod, "_decode_many", real)
    (stale,) = root.glob(".partial-*")
    other = root / ".partial-0123456789abcdef01234567"  # another data set's, fresh, and one that is held
    other.mkdir()
    (other / "progress.json").write_text('{"source": "/elsewhere", "size": 12, "channels": 3, "done": 1}')
    held = root / ".partial-fedcba9876543210fedcba98"
    held.mkdir()
    (held / "progress.json").write_text(json.dumps({"source": str(pics), "size": 12, "channels": 3}))
    lock = open(held / "lock", "w")  # noqa: SIM115 - held until the end of the test
    fcntl.flock(lock, fcntl.LOCK_EX)
    (pics / "a" / "0000.png").write_bytes((pics / "b" / "0000.png").read_bytes())  # the data changed
    synced = []
    real_fsync = cache_mod._fsync
    monkeypatch.setattr(cache_mod, "_fsync", lambda p: (synced.append(Path(p).name), real_fsync(p)))
    split, _ = build(list_images(pics), root, progress=True)
    err = capsys.readouterr().err
    assert not stale.exists() and other.is_dir() and held.is_dir() and len(split) == 12
    assert f"imgclf: removed an interrupted cache build (0 MB) of {pics}: the data changed since" in err
    assert synced[0] == "images.npy" and synced[-1] == "c"  # the pictures first, the cache folder last
    lock.close()
    old = time.time() - cache_mod.STALE_PARTIAL_S - 60
    for path in (other, *other.iterdir()):
        os.utime(path, (old, old))
    build(files[:6], root, progress=True)  # any build removes the week-old one
    assert not other.exists() and "not continued for a week" in capsys.readouterr().err


FULL_DISK = """
import sys
from pathlib import Path
from imgclf.cli import main
sys.exit(main(["train", "--data", sys.argv[1], "--cache-dir", sys.argv[2], "--epochs", "1", "--device", "cpu",
               "--model", "tutorial_cnn", "--out", sys.argv[3]]))
"""


@pytest.mark.slow
def test_a_full_cache_disk_is_one_line_naming_the_folder(tmp_path):
    """The cache folder on a 256 KB tmpfs (mounted in a private mount namespace, where the system allows)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to mount a small tmpfs")
    data = write_class_folder(tmp_path / "data", ["a", "b"], 60, size=32)
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=256k tmpfs {disk}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    script = (f"mount -t tmpfs -o size=256k tmpfs {disk} && {sys.executable} -c '{FULL_DISK}' {data} {disk / 'cache'} "
              f"{tmp_path / 'run'}; code=$?; echo left: $(du -sk {disk} | cut -f1) KB; exit $code")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == (f"imgclf: error: no space left on device while building the cache in {disk / 'cache'}; "
                        f"free some space, or give a folder on a larger disk with --cache-dir")
    assert r.stdout.strip() == "left: 0 KB"  # the partial build was removed: the disk is not left full


def test_a_folder_of_links_gets_its_own_names_from_a_cache_another_folder_built(tmp_path):
    """The key follows links: two folders of links to the same pictures share one cache, and each gets its
    pictures under its own names (the first folder may be gone by then)."""
    write_class_folder(tmp_path / "pics", ["a"], 4)
    pictures = sorted((tmp_path / "pics" / "a").iterdir())
    for n in (1, 2):
        links = tmp_path / f"links{n}"
        links.mkdir()
        for p in pictures:
            (links / p.name).symlink_to(p)
        files = sorted(links.iterdir())
        split, _ = cached_split(files, [0] * len(files), size=8, channels=3, cache_root=tmp_path / "cache",
                                progress=False)
        assert split.files == [str(f) for f in files]
        shutil.rmtree(links)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one cache served both
