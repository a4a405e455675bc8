"""Hostile picture folders (issue 14.3, 14.5, 14.6): symlink loops, links into other classes and splits, FIFOs,
devices and sockets named like pictures, file names that are not UTF-8 or hold a newline, unreadable folders
and pictures. Nothing hangs, nothing is read twice or under the wrong label, every problem is one line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import tempfile
import traceback
from pathlib import Path

import pytest
from conftest import run_cli, write_class_folder

from imgclf.cli import main
from imgclf.config import DataConfig
from imgclf.errors import UserError
from imgclf.sources import list_images, load_data

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def within(seconds: int):
    """Fail, instead of hanging the test run, when the block takes longer than `seconds`."""
    def alarm(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def identities(files) -> set[tuple[int, int]]:
    return {(st.st_dev, st.st_ino) for st in map(os.stat, files)}


def test_symlink_loops_neither_hang_nor_multiply_pictures(tmp_path, capsys):
    root = write_class_folder(tmp_path / "data", ["a", "b"], 6)
    for link, target in (("a/x", "."), ("a/y", "."), ("b/up", ".."), ("b/deep/upup", "../..")):
        (root / link).parent.mkdir(exist_ok=True)
        (root / link).symlink_to(target)
    with within(60):  # two `ln -s . x` made os.walk(followlinks=True) run for ever
        data = load_data(DataConfig(data=str(root)))
    err = capsys.readouterr().err
    files = data.train.files + data.val.files
    assert len(files) == len(set(files)) == 12 and len(identities(files)) == 12
    assert sorted(map(str, list_images(root / "a"))) == sorted(str(root / "a" / f"{i:04d}.png") for i in range(6))
    for link in ("a/x", "a/y", "b/up", "b/deep/upup"):
        assert err.count(f"imgclf: not following the link {root / link}: it leads back up to ") == 1, err


def test_links_into_validation_or_another_class_are_not_followed(tmp_path, capsys):
    root = tmp_path / "data"
    write_class_folder(root / "train", ["a", "b"], 6, seed=1)
    write_class_folder(root / "val", ["a", "b"], 3, seed=2)
    write_class_folder(root / "pool", ["p"], 2, seed=3)  # pictures kept beside the splits, linked in: used
    (root / "train" / "a" / "leak").symlink_to("../../val/a")
    (root / "train" / "a" / "all-val").symlink_to("../../val")
    (root / "train" / "a" / "stolen.png").symlink_to("../b/0000.png")
    (root / "train" / "b" / "pooled.png").symlink_to("../../pool/p/0000.png")
    os.link(root / "val" / "b" / "0000.png", root / "train" / "b" / "hard-linked.png")
    data = load_data(DataConfig(data=str(root)))
    err = capsys.readouterr().err
    assert len(data.val) == 6 and len(data.train) == 6 + 6 + 1  # + pooled.png; not the hard link
    assert not identities(data.train.files) & identities(data.val.files)  # no validation picture trains
    b_files = [f for f, label in zip(data.train.files, data.train.labels.tolist(), strict=True) if label == 1]
    assert str(root / "train" / "b" / "0000.png") in b_files  # the linked picture keeps its own label
    for link in ("leak", "all-val", "stolen.png"):
        assert f"imgclf: not following the link {root / 'train' / 'a' / link}: it leads to " in err, err
    assert "1 picture(s) met a second time (through links) were used once" in err


def test_a_class_folder_linking_to_the_data_folder_is_one_clear_error(tmp_path):
    root = write_class_folder(tmp_path / "data", ["a", "b"], 3)
    (root / "c").symlink_to(root)
    with within(60), pytest.raises(UserError, match=f"the class folder {root} holds another class folder, "
                                                    f"{root / 'a'} \\(a link to the data folder\\?\\)"):
        load_data(DataConfig(data=str(root)))


def special_files(folder: Path) -> list[Path]:
    """A FIFO, a character device and a socket, each named like a picture, in `folder`."""
    os.mkfifo(folder / "fifo.jpg")
    (folder / "zero.png").symlink_to("/dev/zero")
    short = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))  # a socket's path must be short
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(short / "s"))
    server.close()
    os.rename(short / "s", folder / "sock.png")
    short.rmdir()
    return [folder / "fifo.jpg", folder / "sock.png", folder / "zero.png"]


@pytest.mark.slow
def test_fifo_device_and_socket_named_like_pictures_are_skipped_never_opened(tmp_path, capsys):
    root = tmp_path / "data"
    write_class_folder(root / "train", ["a", "b"], 6, seed=1)
    write_class_folder(root / "test", ["a", "b"], 3, seed=2)
    special = special_files(root / "train" / "b")
    run = tmp_path / "run"
    with within(300):  # a FIFO named x.jpg blocked train for ever
        code = main(["train", "--data", str(root), "--model", "tutorial_cnn", "--epochs", "1", "--device", "cpu",
                     "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 0, err
    kinds = {"fifo.jpg": "a FIFO", "sock.png": "a socket", "zero.png": "a character device"}
    for path in special:
        assert err.count(f"imgclf: skipping {path}: not a regular file ({kinds[path.name]}); never opened") == 1
    assert [json.loads(line)["skipped_files"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [3]
    with within(120), contextlib.redirect_stdout(io.StringIO()) as out:  # predict's folder walk: the same
        code = main(["predict", str(run / "checkpoints" / "best.pt"), str(root / "train"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1  # some inputs could not be answered
    assert len(out.getvalue().splitlines()) == 12
    for path in special:
        assert err.count(f"imgclf: {path}: not a regular file ({kinds[path.name]})") == 1, err


@pytest.mark.slow
def test_file_names_that_are_not_utf8_or_hold_a_newline(tmp_path, capsys):
    root = write_class_folder(tmp_path / "data", ["a", "b", os.fsdecode(b"caf\xe9")], 6)
    odd = [os.fsdecode(bytes(root / "a") + b"/caf\xe9-latin1.png"), str(root / "b" / "new\nline.png")]
    for name, source in zip(odd, (root / "a" / "0000.png", root / "b" / "0000.png"), strict=True):
        Path(name).write_bytes(source.read_bytes())
    (root / "a" / "broken\n.png").write_bytes(b"not a picture")
    run = tmp_path / "run"
    code = main(["train", "--data", str(root), "--model", "tutorial_cnn", "--epochs", "1", "--device", "cpu",
                 "--out", str(run), "--val-fraction", "0.01"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"imgclf: skipping {root / 'a' / 'broken'}\\n.png: " in err  # one line, the newline shown as \n
    data = load_data(DataConfig(data=str(root), val_fraction=0.01), progress=False)
    assert set(odd) <= set(data.train.files + data.val.files)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        main(["predict", str(run / "checkpoints" / "best.pt"), str(root), "--device", "cpu"])
    lines = out.getvalue().splitlines()
    assert len(lines) == 20 and any(line.startswith(f"{root / 'a'}/caf\\xe9-latin1.png  ") for line in lines)
    assert any(line.startswith(f"{root / 'b'}/new\\nline.png  ") for line in lines)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        main(["predict", str(run / "checkpoints" / "best.pt"), str(root), "--device", "cpu", "--json"])
    paths = [json.loads(line)["path"] for line in out.getvalue().splitlines()]
    assert set(odd) <= set(paths)  # JSON keeps the exact name (os.fsencode gives the bytes back)
    assert data.classes == ["a", "b", "caf\\xe9"]  # a class name is printable text, in any locale
    r = run_cli("predict", run / "checkpoints" / "best.pt", root, "--device", "cpu", "--topk", "3",
                env={"PYTHONIOENCODING": "utf-8:strict", "OMP_NUM_THREADS": "1"})  # as in a UTF-8 locale
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # 1: broken\n.png
    assert len(r.stdout.splitlines()) == 20 and "caf\\xe9" in r.stdout


def as_other_user(fn, *args):
    """`fn(*args)` run where permissions apply: as this user when it is not root, else in a child process
    that has become `nobody` (root reads every file). Returns what `fn` returns (text), or its exception's
    one-line text prefixed by the exception's name."""
    if os.geteuid() != 0:
        return _call(fn, *args)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, _call(fn, *args).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    return text


def _call(fn, *args) -> str:
    try:
        return str(fn(*args))
    except Exception as err:  # noqa: BLE001 - the test compares the text
        return f"{type(err).__name__}: {err}" + ("" if isinstance(err, UserError) else traceback.format_exc())


@pytest.fixture
def shared_tmp():
    """A folder another user can enter and write in (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="imgclf-perm-", dir="/tmp"))
    folder.chmod(0o777)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        with contextlib.suppress(OSError):
            path.chmod(0o777 if path.is_dir() else 0o666)
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _open_all(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)


def _load(root: Path, cache: Path) -> str:
    data = load_data(DataConfig(data=str(root), cache_dir=str(cache)), progress=False)
    return json.dumps({"train": len(data.train), "val": len(data.val), "skipped": data.skipped})


def test_unreadable_folders_are_named_not_called_empty(shared_tmp):
    root = write_class_folder(shared_tmp / "data", ["a", "b"], 6)
    _open_all(shared_tmp)
    (root / "b").chmod(0o000)
    out = as_other_user(_load, root, shared_tmp / "cache")
    assert out == f"UserError: cannot read {root / 'b'}: permission denied; check its permissions", out
    (root / "b").chmod(0o777)
    root.chmod(0o000)
    out = as_other_user(_load, root, shared_tmp / "cache")
    assert out == f"UserError: cannot read {root}: permission denied; check its permissions", out
    root.chmod(0o777)
    write_class_folder(root / "a" / "more", ["deeper"], 2)
    _open_all(root)
    (root / "a" / "more").chmod(0o000)  # a sub-folder of a class: skipped with its reason, the rest used
    result = json.loads(as_other_user(_load, root, shared_tmp / "cache"))
    assert result["train"] + result["val"] == 12
    assert result["skipped"] == [[str(root / "a" / "more"), "cannot read this folder: permission denied"]]
    result = json.loads(as_other_user(_expand, root))  # predict's folder walk says the same
    assert result == {"paths": 12, "err": f"imgclf: skipping {root / 'a' / 'more'}: cannot read this folder: "
                                          f"permission denied\n"}


def _expand(folder: Path) -> str:
    from imgclf.predict import expand_paths

    with contextlib.redirect_stderr(io.StringIO()) as err:
        paths = expand_paths([str(folder)])
    return json.dumps({"paths": len(paths), "err": err.getvalue()})


def test_a_picture_unreadable_once_is_used_once_readable(shared_tmp):
    """The cache records the skip; a reused cache tries the skipped pictures again (issue 14.6)."""
    root = write_class_folder(shared_tmp / "data", ["a", "b"], 6)
    _open_all(shared_tmp)
    locked = root / "a" / "0003.png"
    locked.chmod(0o000)
    first = json.loads(as_other_user(_load, root, shared_tmp / "cache"))
    assert first["train"] + first["val"] == 11 and first["skipped"][0][0] == str(locked)
    assert "permission denied" in first["skipped"][0][1].lower()
    locked.chmod(0o644)  # fixed: the same files, sizes and times, so the same cache key
    second = json.loads(as_other_user(_load, root, shared_tmp / "cache"))
    assert second["train"] + second["val"] == 12 and second["skipped"] == []


def test_a_fixed_picture_is_found_among_many_skipped(shared_tmp):
    """Every skipped picture whose status changed (a chmod changes its ctime) is tried again, not only the
    first 64 of the skip list."""
    root = shared_tmp / "data"
    write_class_folder(root / "train", ["a", "b"], 40, size=8)
    write_class_folder(root / "val", ["a", "b"], 2, size=8)
    _open_all(shared_tmp)
    locked = [root / "train" / c / f"{i:04d}.png" for c in ("a", "b") for i in range(35)]
    for path in locked:
        path.chmod(0o000)
    first = json.loads(as_other_user(_load, root, shared_tmp / "cache"))
    assert first["train"] == 10 and len(first["skipped"]) == 70
    assert first["skipped"][-1][0] == str(locked[-1])  # the last in the skip list
    locked[-1].chmod(0o644)
    second = json.loads(as_other_user(_load, root, shared_tmp / "cache"))
    assert second["train"] == 11 and len(second["skipped"]) == 69
