"""Atomic file writes: a reader (or a process killed mid-write) sees the old file or the new, never half."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)  # mkstemp makes owner-only files; give the result the permissions open() would
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def remove_temporaries(run_dir: Path) -> None:
    """Delete the temporary files `atomic_write` leaves in a run folder when its process is killed mid-write."""
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        for path in folder.glob(".*.tmp"):
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
