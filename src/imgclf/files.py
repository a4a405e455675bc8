"""Files a run writes: atomic writes (a reader, or a process killed mid-write, sees the old file or the new,
never half), and the run folder's claim (one training process per folder, and never a folder imgclf did not
make)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
import time
from pathlib import Path

from imgclf.errors import UserError, shown

TMP_SUFFIX = ".imgclf-tmp"  # the temporary files of `atomic_write`: .NAME.XXXXXXXX.imgclf-tmp
RUN_MARK = ".imgclf-run"  # in every run folder: imgclf made it; its training process locks it and writes its PID


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`: readers see the old file or the new, never half.
    A full disk is one UserError line naming `path` (nothing of the old file is lost)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)  # mkstemp makes owner-only files; give the result the permissions open() would
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        full = _disk_full(err, path.parent)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise UserError(f"no space left on device while writing {shown(path)}; free some space (the "
                            f"previous version of the file, if any, is kept) and try again") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _disk_full(err: BaseException, folder: Path) -> bool:
    """ENOSPC or EDQUOT; or a write error without its errno (torch.save's C++ writer says "unexpected pos")
    while the disk of `folder` has no room left (asked before the temporary file is removed)."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(err, RuntimeError | OSError):
        return False
    try:
        disk = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return False
    return disk.f_bavail * disk.f_frsize < 1 << 20


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def remove_temporaries(run_dir: Path) -> None:
    """Delete the temporary files `atomic_write` leaves in a run folder when its process is killed mid-write
    (its own names only: .NAME.XXXXXXXX.imgclf-tmp)."""
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        for path in folder.glob(f".*{TMP_SUFFIX}"):
            path.unlink(missing_ok=True)


def special_kind(mode: int) -> str | None:
    """What a file of this st_mode is when it is not a regular file ("a FIFO", "a device", ...), else None.
    Such a file is never opened as a picture: reading a FIFO waits forever, a device may never end."""
    if stat.S_ISREG(mode):
        return None
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def not_regular(path) -> str | None:
    """Why `path` cannot be read as a picture without opening it ("not a regular file (a FIFO)", "no such
    file"), or None for a regular file."""
    try:
        kind = special_kind(os.stat(path).st_mode)
    except FileNotFoundError:
        return "no such file"
    except OSError as err:
        return f"cannot read it: {(err.strerror or str(err)).lower()}"
    return None if kind is None else f"not a regular file ({kind})"


def is_run_folder(folder: Path) -> bool:
    """True when imgclf made `folder` for a run: it holds RUN_MARK, or (a run of an imgclf before the mark)
    checkpoints/last.pt or a config.json of imgclf's four sections."""
    folder = Path(folder)
    if (folder / RUN_MARK).is_file() or (folder / "checkpoints" / "last.pt").is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"data", "model", "optim", "run"} <= config.keys()


@contextlib.contextmanager
def claim_run_folder(folder: Path):
    """Hold the run folder `folder` for this process while the `with` block runs: make it (an empty or new
    folder) or check that imgclf made it, and take an exclusive lock on its RUN_MARK, which records this
    process's PID. One UserError line when `folder` holds files imgclf did not write, or another process
    holds it. The lock ends with the block, or with the process however it ends."""
    folder = Path(folder)
    existed = folder.is_dir()
    if existed and any(folder.iterdir()) and not is_run_folder(folder):
        raise UserError(f"--out {shown(folder)} is a folder of files that imgclf did not write; imgclf writes "
                        f"a run only into a new or empty folder, or its own: choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / RUN_MARK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(fd, folder)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield folder
    finally:
        # a run that wrote nothing (bad data, say) leaves the folder as it found it: empty, or not there
        with contextlib.suppress(OSError):
            if [p.name for p in folder.iterdir()] == [RUN_MARK]:
                (folder / RUN_MARK).unlink()
                if not existed:
                    folder.rmdir()
        os.close(fd)  # closing the file releases the lock


def refuse_if_in_use(folder: Path) -> None:
    """One UserError line when another process holds the run folder `folder` (`claim_run_folder`)."""
    mark = Path(folder) / RUN_MARK
    if not mark.is_file():
        return
    fd = os.open(mark, os.O_RDONLY)
    try:
        _lock(fd, Path(folder))
    finally:
        os.close(fd)


def run_folder_held(folder: Path) -> bool | None:
    """Whether a process holds the run folder `folder` now (`claim_run_folder`); None when that cannot be
    told: no RUN_MARK (a run of an imgclf before it), or no flock on this system. Asking takes a shared lock
    for an instant, which a process claiming the folder at that very instant would see as in use."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(Path(folder) / RUN_MARK, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)  # (a FIFO: no wait)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # (releases the shared lock)


def _lock(fd: int, folder: Path) -> None:
    try:
        import fcntl
    except ImportError:  # no flock on this system (Windows): the folder is not locked
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"{shown(folder)} is in use by another imgclf training process ({_holder(folder)}); "
                        f"wait for it to end, or choose another --out") from None


def _holder(folder: Path) -> str:
    """'PID n' of the process holding `folder`, as its RUN_MARK says (it writes it just after locking)."""
    for _ in range(20):
        with contextlib.suppress(OSError, ValueError):
            return f"PID {int((folder / RUN_MARK).read_text().split()[0])}"
        time.sleep(0.05)
    return "PID unknown"
