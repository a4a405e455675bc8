"""The decode-once store (notes 06, 14): pictures decoded in worker processes into uint8 arrays, kept on disk.

A folder's pictures are decoded once into a cache keyed by their file list, sizes and modification times, so
later epochs and later runs never decode a JPEG again. A large cache is memory-mapped rather than read into
memory. The unit of data everywhere is a `Split`: uint8 images (N, C, H, W) with integer labels.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from imgclf.bands import ChannelMismatch, decode, describe, is_plain, probe, storage_dtype
from imgclf.errors import UserError, shown
from imgclf.files import atomic_write_text, not_regular
from imgclf.transforms import PLAIN, BadImage, Decoding, compute_mean_std

CACHE_FORMAT = 3
MMAP_BYTES = 2 << 30  # caches larger than this are memory-mapped, not read whole
BUILD_CHUNK = 4096  # pictures decoded between two records of a cache build's progress


@dataclass
class Split:
    images: torch.Tensor | np.ndarray  # uint8 (N, C, H, W), uint16 for 16-bit pictures; a read-only memmap when large
    labels: torch.Tensor  # int64 (N,)
    files: list[str] | None = None  # source file of each image (folders only)

    def __len__(self) -> int:
        return int(self.labels.shape[0])



def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgclf"


def _fingerprint(files: list[Path], labels: list[int], size: int, channels: int, decoding: Decoding = PLAIN,
                 depth: int = 8) -> str:
    # 8-bit caches decoded as imgclf's own (PLAIN) keep the key they always had; a pretrained network's
    # decoding (its tag) and 16-bit pictures (imgclf.bands) are told apart
    h = hashlib.sha256(f"{CACHE_FORMAT}:{size}:{channels}{decoding.tag()}{':16' if depth == 16 else ''}".encode())
    folders: dict[Path, Path] = {}  # each folder resolved once: Path.resolve per file cost ~2 s on 60,000 files
    for path, label in zip(files, labels, strict=True):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):  # a link is keyed by what it points to, as Path.resolve gives
            st, real = path.stat(), path.resolve()
        else:
            parent = folders.get(path.parent) or folders.setdefault(path.parent, path.parent.resolve())
            real = parent / path.name
        h.update(os.fsencode(real) + f"\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    return h.hexdigest()[:24]


def cached_split(files: list[Path], labels: list[int], *, size: int, channels: int, cache_root: Path,
                 progress: bool, decoding: Decoding = PLAIN, depth: int = 8) -> tuple[Split, list[tuple[str, str]]]:
    """Decode `files` once (as `decoding` says: bands.decode) into `cache_root/<fingerprint>/`; later calls
    read (or memory-map) the result: uint8 pictures, uint16 with `depth` 16. The fingerprint covers the
    decoding and the depth: pictures resized another way never share a cache.

    Pictures skipped as unreadable are tried again when the cache is reused (a file unreadable once, for
    lack of permission say, may be fixed since); if one now decodes, the cache is built anew. A damaged
    cache (a torn meta.json, a truncated images.npy) is named in one line and built anew by itself."""
    key = _fingerprint(files, labels, size, channels, decoding, depth)
    folder = cache_root / key
    for retry in (False, True):
        if not (folder / "meta.json").is_file():
            _build(folder, files, labels, size=size, channels=channels, progress=progress, decoding=decoding,
                   depth=depth)
        try:
            meta, images = _open(folder, size, channels, depth)
        except DamagedCache as err:
            if retry:  # built just now and unreadable already: the disk itself is at fault
                raise UserError(f"the cache just built in {folder} cannot be read back ({err}); check the disk, "
                                f"or give another --cache-dir") from None
            if progress:
                print(f"imgclf: the cache file {shown(err.path)} is damaged ({err}); building the cache again",
                      file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        if retry or not _skipped_now_readable(meta, size, channels, decoding, depth):
            break
        shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.utime(folder / "meta.json")  # when it was last used, for `imgclf cache prune`
    if images.nbytes <= MMAP_BYTES:
        images = torch.from_numpy(np.array(images))  # read whole, writable
    for path, reason in meta["bad"] if progress else ():  # reported by the main process only
        print(f"imgclf: skipping {shown(path)}: {shown(reason)}", file=sys.stderr)
    split = Split(images, torch.tensor(meta["labels"], dtype=torch.int64), _callers_files(meta, files))
    return split, [tuple(b) for b in meta["bad"]]


def _callers_files(meta: dict, files: list[Path]) -> list[str]:
    """The kept pictures named as this caller names them: the key follows links, so another folder of links to
    the same pictures (since deleted, maybe) may have built the cache. Caches built before "kept_index" was
    recorded keep their builder's names."""
    kept = meta.get("kept_index")
    if (isinstance(kept, list) and len(kept) == meta["count"]
            and all(type(i) is int and 0 <= i < len(files) for i in kept)):
        return [str(files[i]) for i in kept]
    return meta["files"]


class DamagedCache(Exception):
    """A cache file that cannot be what `_build` wrote; `path` names it, the message says why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(reason)
        self.path = path


def _open(folder: Path, size: int, channels: int, depth: int = 8) -> tuple[dict, np.ndarray]:
    """(meta, images) of a finished cache, checked against each other; DamagedCache when they do not fit."""
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text())
        count = meta["count"]
        if not (isinstance(count, int) and count >= 0 and len(meta["labels"]) == len(meta["files"]) == count
                and all(isinstance(b, list) and len(b) == 2 for b in meta["bad"])
                and len(meta.get("bad_ctime") or meta["bad"]) == len(meta["bad"])):
            raise ValueError("its counts do not agree")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DamagedCache(path, str(err).splitlines()[0][:160] if str(err) else type(err).__name__) from None
    path = folder / "images.npy"
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DamagedCache(path, str(err).splitlines()[0][:160] if str(err) else type(err).__name__) from None
    if images.dtype != storage_dtype(depth) or images.ndim != 4 or images.shape[0] < count or \
            images.shape[1:] != (channels, size, size):
        raise DamagedCache(path, f"it holds {images.dtype} {tuple(images.shape)}, not {count} pictures of "
                                 f"{channels}x{size}x{size}")
    return meta, images[:count]


def _skipped_now_readable(meta: dict, size: int, channels: int, decoding: Decoding = PLAIN, depth: int = 8) -> bool:
    """Whether a picture the build skipped decodes now. Tried again: every skipped file whose status changed
    since the build (its ctime: a chmod, say, which leaves the cache key alone), and the first 64 in any
    case (for what changed elsewhere: a folder's permissions, a codec installed)."""
    stamps = meta.get("bad_ctime") or [None] * len(meta["bad"])
    changed = [path for (path, _), was in zip(meta["bad"], stamps, strict=False) if _ctime(path) != was]
    candidates = dict.fromkeys([*changed, *(path for path, _ in meta["bad"][:64])])
    return any(_decode_one((path, size, channels, decoding, depth))[0] is not None for path in candidates)


def _ctime(path: str) -> int | None:
    """When the status of `path` last changed (permissions, contents), None when it cannot be read."""
    try:
        return os.stat(path).st_ctime_ns
    except OSError:
        return None


def _build(folder: Path, files: list[Path], labels: list[int], *, size: int, channels: int, progress: bool,
           decoding: Decoding = PLAIN, depth: int = 8) -> None:
    """`_build_in` with a full disk, or a cache folder that cannot be written, said in one line."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(folder, source_of(files), size, channels, progress=progress, decoding=decoding,
                               depth=depth)
        _build_in(folder, files, labels, size=size, channels=channels, progress=progress, decoding=decoding,
                  depth=depth)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            shutil.rmtree(folder.parent / f".partial-{folder.name}", ignore_errors=True)  # give the space back
            raise UserError(f"no space left on device while building the cache in {shown(folder.parent)}; free "
                            f"some space, or give a folder on a larger disk with --cache-dir") from None
        raise UserError(f"cannot write the cache in {shown(folder.parent)}: {(err.strerror or str(err)).lower()}"
                        f"; give a writable folder with --cache-dir") from None


def source_of(files: list[Path]) -> str:
    """The folder common to `files`, which a cache build records (for `imgclf cache list`)."""
    return str(Path(os.path.commonpath([str(f) for f in files]))) if files else ""


def _build_in(folder: Path, files: list[Path], labels: list[int], *, size: int, channels: int,
              progress: bool, decoding: Decoding = PLAIN, depth: int = 8) -> None:
    """Decode `files` chunk by chunk straight into a memory-mapped file in `.partial-<key>/` beside `folder`
    (memory stays flat however many pictures there are), recording after each chunk how far it got, so that
    a build killed half-way is continued, not restarted, by the next run; then rename it to `folder`.
    A lock on the partial folder makes a second process wait instead of writing into the same files.
    The pictures' file is given all its disk space first (a full disk is an error now, not a crash when a
    mapped page cannot be written), and everything is fsynced before the rename."""
    work = folder.parent / f".partial-{folder.name}"
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "meta.json").is_file():  # another process finished it while this one waited
            return
        state = _progress(work, len(files))
        state.update(source=source_of(files), size=size, channels=channels, **_decoding_entry(decoding),
                     **_depth_entry(depth))
        shape = (len(files), channels, size, size)
        if not state["done"]:
            np.lib.format.open_memmap(work / "images.npy", mode="w+", dtype=storage_dtype(depth), shape=shape).flush()
            _reserve(work / "images.npy")
        meter = _Meter(len(files), state["done"], enabled=progress and len(files) > 1000)
        for start in range(state["done"], len(files), BUILD_CHUNK):
            chunk = files[start : start + BUILD_CHUNK]
            arrays, bad = _decode_many(chunk, size=size, channels=channels, progress=False, decoding=decoding,
                                       depth=depth)
            # mapped for this chunk only: the pages written leave this process's resident memory with it
            images = np.lib.format.open_memmap(work / "images.npy", mode="r+")
            images[state["kept"] : state["kept"] + len(arrays)] = arrays
            images.flush()
            del images
            bad_set = {f for f, _ in bad}
            state["kept_index"] += [start + i for i, f in enumerate(chunk) if str(f) not in bad_set]
            state.update(done=start + len(chunk), kept=state["kept"] + len(arrays), bad=state["bad"] + bad,
                         bad_ctime=state["bad_ctime"] + [_ctime(f) for f, _ in bad])
            atomic_write_text(work / "progress.json", json.dumps(state))
            meter.update(state["done"])
        meta = {"count": state["kept"], "labels": [labels[i] for i in state["kept_index"]],
                "files": [str(files[i]) for i in state["kept_index"]], "kept_index": state["kept_index"], "bad": [list(b) for b in state["bad"]],
                "bad_ctime": state["bad_ctime"], "source": state["source"], "size": size, "channels": channels,
                **_decoding_entry(decoding), **_depth_entry(depth)}
        _fsync(work / "images.npy")
        atomic_write_text(work / "meta.json", json.dumps(meta))
        (work / "progress.json").unlink()
        _fsync(work)
        os.replace(work, folder)
        _fsync(folder.parent)
        meter.close()


def _decoding_entry(decoding: Decoding) -> dict:
    """What a cache's records say of its decoding: nothing for PLAIN (as before), else its tag."""
    return {"decoding": decoding.tag()} if decoding.tag() else {}


def _depth_entry(depth: int) -> dict:
    """What a cache's records say of its depth: nothing for 8 bits (as before)."""
    return {"depth": depth} if depth != 8 else {}


def _reserve(path: Path) -> None:
    """Allocate the whole of `path` on disk now (ENOSPC here, not a SIGBUS when a mapped page is written)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: written as used
            raise
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


STALE_PARTIAL_S = 7 * 86400  # an interrupted build no process has touched for this long is removed


def _remove_stale_partials(folder: Path, source: str, size: int, channels: int, *, progress: bool,
                           decoding: Decoding = PLAIN, depth: int = 8) -> None:
    """Remove interrupted builds (`.partial-*` beside `folder`) that no process is working on and that this
    build replaces (the same source folder, side and channels, but other files: the data changed since)
    or that nobody has continued for STALE_PARTIAL_S; a killed build is never left for ever."""
    for work in folder.parent.glob(".partial-*"):
        state = own_cache(work)  # never a symbolic link, nor a folder imgclf did not make
        if work.name == f".partial-{folder.name}" or state is None:
            continue
        same = isinstance(state, dict) and (state.get("source"), state.get("size"), state.get("channels"),
                                            state.get("decoding", ""), state.get("depth", 8)) == \
            (source, size, channels, decoding.tag(), depth)
        with contextlib.suppress(OSError):
            if not same and time.time() - max(p.stat().st_mtime for p in (work, *work.iterdir())) < STALE_PARTIAL_S:
                continue
            with open(work / "lock", "a") as lock:
                try:  # a build in progress holds this lock: leave it alone
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                mb = sum(p.stat().st_size for p in work.iterdir()) / 2**20
                shutil.rmtree(work, ignore_errors=True)
            if progress:
                why = "the data changed since" if same else "not continued for a week"
                print(f"imgclf: removed an interrupted cache build ({mb:.0f} MB) of {shown(state.get('source', '?'))}"
                      f": {why}", file=sys.stderr)


def _progress(work: Path, total: int) -> dict:
    """How far an earlier, killed build of this cache got (nothing, when it left no readable record)."""
    fresh = {"done": 0, "kept": 0, "kept_index": [], "bad": [], "bad_ctime": []}
    try:
        state = json.loads((work / "progress.json").read_text())
        done, kept, kept_index, bad = state["done"], state["kept"], state["kept_index"], state["bad"]
        fits = all(isinstance(v, int) for v in (done, kept)) and isinstance(kept_index, list) and \
            isinstance(bad, list) and len(kept_index) == kept <= done <= total and \
            len(state.setdefault("bad_ctime", [None] * len(bad))) == len(bad)
        return state if fits and (work / "images.npy").is_file() else fresh
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return fresh


class _Meter:
    """Progress of a cache build: a tqdm bar on a terminal, else a line every tenth, each with the time left."""

    def __init__(self, total: int, done: int, *, enabled: bool):
        self.total, self.start_done, self.start, self.enabled = total, done, time.perf_counter(), enabled
        self.next_tenth, self.bar = done * 10 // max(total, 1) + 1, None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc="decoding (once, cached)", unit="img", leave=False)
        elif enabled and done:
            print(f"imgclf: continuing an interrupted cache build at {done:,}/{total:,} pictures", file=sys.stderr)

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        elif self.enabled and done * 10 // self.total >= self.next_tenth:
            self.next_tenth = done * 10 // self.total + 1
            rate = (done - self.start_done) / max(time.perf_counter() - self.start, 1e-9)
            left = (self.total - done) / max(rate, 1e-9)
            print(f"imgclf: decoded {done:,}/{self.total:,} pictures (once, cached), {rate:.0f}/s, "
                  f"about {left / 60:.1f} min left", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cached_stats(split: Split, cache_root: Path, files: list[Path], size: int, channels: int,
                 decoding: Decoding = PLAIN, depth: int = 8):
    path = cache_root / f"stats-{_fingerprint(files, [0] * len(files), size, channels, decoding, depth)}.json"
    try:
        stats = json.loads(path.read_text())
        mean, std = tuple(map(float, stats["mean"])), tuple(map(float, stats["std"]))
        if len(mean) == len(std) == channels:
            return mean, std
        raise ValueError(f"{len(mean)} channels, not {channels}")
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"imgclf: the cache file {shown(path)} is damaged ({shown(str(err))}); computing it again",
              file=sys.stderr)
    mean, std = compute_mean_std(split.images)
    with contextlib.suppress(OSError):  # a cache that cannot be written costs time, not the run
        atomic_write_text(path, json.dumps({"mean": mean, "std": std}))
    return mean, std


def _decode_one(job: tuple[str, int, int, Decoding, int]):
    path, size, channels, decoding, depth = job
    problem = not_regular(path)  # a FIFO named x.jpg would block the build forever; a device never ends
    if problem is not None:
        return None, problem
    try:
        return decode(path, size=size, channels=channels, depth=depth, decoding=decoding), None
    except ChannelMismatch as err:  # a picture of another kind is a mistake in the data set, not a bad file
        raise UserError(f"{shown(path)} has {err}, the channels of this run's pictures; keep one kind of "
                        f"picture in a data set, or give --channels to match them") from None
    except BadImage as err:
        found = probe(path) if is_plain(channels, depth) else None  # only for a failure: what the file is
        if found is not None and not found.fits(channels):
            raise UserError(f"{shown(path)} has {describe(found)}, not the {channels} of this run's pictures; "
                            f"give --channels {found.natural} for such pictures, or remove it") from None
        return None, str(err)


def _decode_many(files: list[Path], *, size: int, channels: int, progress: bool, decoding: Decoding = PLAIN,
                 depth: int = 8):
    """Decode pictures (as `decoding` says) in worker processes into uint8 (N, C, size, size) (uint16 at
    `depth` 16); return it and the (file, reason) skipped."""
    jobs = [(str(f), size, channels, decoding, depth) for f in files]
    out = np.empty((len(files), channels, size, size), dtype=storage_dtype(depth))
    bad, kept = [], 0
    workers = min(len(os.sched_getaffinity(0)), max(1, len(files) // 256))  # every core, for a large set
    iterator = _pool_map(jobs, workers)
    if progress and len(files) > 1000:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(files), desc="checking", unit="img",
                        disable=not sys.stderr.isatty(), leave=False)
    for (path, *_), (arr, reason) in zip(jobs, iterator, strict=True):
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



def check_all(files: list[Path], *, size: int, channels: int, depth: int = 8) -> None:
    bad = [(f, r) for f, r in _decode_many(files, size=size, channels=channels, depth=depth, progress=False)[1]]
    if bad:
        listing = "; ".join(f"{f}: {r}" for f, r in bad)
        raise UserError(f"--strict-data: {len(bad)} unreadable file(s): {listing}")



# ---------------------------------------------------------------- `imgclf cache list | prune`

KEY_CHARS, KEY_LENGTH = frozenset("0123456789abcdef"), 24  # a cache's folder is named by its fingerprint
CACHE_FILES = frozenset({"meta.json", "images.npy", "lock", "progress.json"})  # all a cache folder ever holds
META_KEYS = frozenset({"count", "labels", "files", "bad", "source", "size", "channels"})  # what _build_in records


def _is_key(name: str) -> bool:
    return len(name) == KEY_LENGTH and set(name) <= KEY_CHARS


def own_cache(folder: Path) -> dict | None:
    """The record of `folder` (its meta.json, or progress.json for an unfinished build) when it is one of
    imgclf's caches, else None. Only such a folder may ever be deleted, so it must be all of: a real folder
    (never a symbolic link, whose target could be anything), named by a fingerprint (`KEY`, or
    `.partial-KEY` for an unfinished build), holding nothing but regular files `_build_in` writes, and, when
    finished, a meta.json with every field `_build_in` records. A user's folder given as --cache-dir by
    mistake fails at least one of these."""
    partial = folder.name.startswith(".partial-")
    try:
        if not (_is_key(folder.name.removeprefix(".partial-")) and stat.S_ISDIR(folder.lstat().st_mode)):
            return None
        entries = {p.name: p.lstat().st_mode for p in folder.iterdir()}
        if not (set(entries) <= CACHE_FILES and all(stat.S_ISREG(m) for m in entries.values())):
            return None
        record = folder / ("progress.json" if partial else "meta.json")
        if partial and record.name not in entries:
            return {}  # killed before its first chunk was recorded
        meta = json.loads(record.read_bytes()[: 1 << 30])
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict) or not (partial or set(meta) >= META_KEYS):
        return None
    return meta


def _scan(cache_root: Path) -> tuple[list[dict], list[str]]:
    """(imgclf's caches under `cache_root` as `list_caches` describes them, names of the other folders)."""
    found, foreign = [], []
    with contextlib.suppress(OSError):
        for folder in sorted(Path(cache_root).iterdir()):
            meta = own_cache(folder)
            if meta is None:
                if folder.is_dir():
                    foreign.append(folder.name)
                continue
            with contextlib.suppress(OSError):
                stats = [p.stat() for p in folder.iterdir()]
                found.append({"key": folder.name.removeprefix(".partial-"), "path": str(folder),
                              "partial": folder.name.startswith(".partial-"), "source": meta.get("source", "?"),
                              "pictures": meta.get("count", meta.get("done", 0)), "side": meta.get("size"),
                              "bytes": sum(s.st_size for s in stats),
                              "last_used": max((s.st_mtime for s in stats), default=folder.stat().st_mtime)})
    return sorted(found, key=lambda c: -c["last_used"]), foreign


def list_caches(cache_root: Path) -> list[dict]:
    """Every decoded-folder cache of imgclf's (`own_cache`) under `cache_root`, newest use first: key, source
    folder, pictures, side, bytes on disk, last use (a time stamp), and whether it is an unfinished (killed)
    build. Anything else there is not listed."""
    return _scan(cache_root)[0]


def prune_caches(cache_root: Path, *, older_than_days: float = 30.0) -> list[dict]:
    """Delete the caches not used for `older_than_days` (0: all) and unfinished builds that no process is
    working on; return what was deleted (as `list_caches` describes it). Only imgclf's own caches
    (`own_cache`, checked again just before deleting) and stats files are ever deleted."""
    cutoff = time.time() - older_than_days * 86400
    removed = []
    for cache in list_caches(cache_root):
        if cache["last_used"] > cutoff and not cache["partial"]:
            continue
        folder = Path(cache["path"])
        with contextlib.suppress(OSError), open(folder / "lock", "a") as lock:
            try:  # a build in progress holds this lock: leave it alone
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if own_cache(folder) is None:  # changed since it was listed
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(cache)
    for path in Path(cache_root).glob("stats-*.json"):  # a few bytes each; rebuilt when needed
        with contextlib.suppress(OSError):
            st = path.lstat()
            if _is_key(path.name[6:-5]) and stat.S_ISREG(st.st_mode) and st.st_size < 4096 and \
                    st.st_mtime < cutoff:
                path.unlink()
    return removed


def caches_output(caches: list[dict], root: Path, action: str, *, as_json: bool = False) -> tuple[str, str]:
    """What `imgclf cache list|prune` prints: (standard output, standard error): a line (or a JSON object) per
    cache, and how many there are in `root` and their size."""
    if as_json:
        return "".join(json.dumps(cache) + "\n" for cache in caches), ""
    lines = []
    for c in caches:
        age = (time.time() - c["last_used"]) / 86400
        state = "unfinished build, " if c["partial"] else ""
        lines.append(f"{c['key']}  {c['bytes'] / 2**20:>8.1f} MB  {c['pictures']:>7} pictures  "
                     f"{state}used {age:.1f} days ago  {shown(c['source'])}\n")
    total = sum(c["bytes"] for c in caches) / 2**20
    verb = "in" if action == "list" else "deleted from"
    foreign = _scan(root)[1]
    note = f"imgclf: left alone {len(foreign)} folder(s) in {shown(root)} that are not imgclf caches: " \
           f"{', '.join(shown(name) for name in foreign[:3])}{', ...' if len(foreign) > 3 else ''}\n" if foreign else ""
    return "".join(lines), f"{note}{len(caches)} caches, {total:.1f} MB {verb} {root}\n"
