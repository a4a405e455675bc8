"""The third hardening pass (issue 24): each test reproduces what a careless or hostile user did."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import write_class_folder

from imgclf.cache import cached_split
from imgclf.cli import main
from imgclf.config import DataConfig
from imgclf.sources import load_data

LONG_AGO = 1_000_000_000  # 2001: older than any --older-than


def _age(path: Path) -> None:
    for p in [*path.rglob("*"), path]:
        os.utime(p, (LONG_AGO, LONG_AGO), follow_symlinks=False)


# ---------------------------------------------------------------- 24.1, 24.3: cache prune deletes only its own

def test_cache_prune_deletes_only_imgclfs_own_caches(tmp_path, capsys):
    cache = tmp_path / "cache"
    load_data(DataConfig(data=str(write_class_folder(tmp_path / "d", ["a", "b"], 4)), cache_dir=str(cache)),
              progress=False)
    ours = [p.parent for p in cache.glob("*/meta.json")]
    # a user's old folders in a mistyped --cache-dir: one with a meta.json, one named like a cache but holding
    # a photo too, one like a cache's meta.json but missing fields; and a stats-like note
    user = {"photos2019": {"meta.json": "{}", "a.jpg": "x"},
            "0123456789abcdef01234567": {"meta.json": (ours[0] / "meta.json").read_text(), "a.jpg": "x"},
            "89abcdef0123456789abcdef": {"meta.json": json.dumps({"count": 0, "labels": [], "files": []})}}
    for name, files in user.items():
        for file, text in files.items():
            (cache / name).mkdir(exist_ok=True)
            (cache / name / file).write_text(text)
    (cache / "stats-notes.json").write_text("{}")
    _age(cache)
    assert main(["cache", "prune", "--older-than", "1", "--cache-dir", str(cache)]) == 0
    err = capsys.readouterr().err
    assert ours and not any(p.exists() for p in ours) and f"{len(ours)} caches" in err
    assert all((cache / name / file).is_file() for name, files in user.items() for file in files)
    assert (cache / "stats-notes.json").is_file() and not list(cache.glob("stats-*[0-9].json"))
    assert "imgclf: left alone 3 folder(s) in " in err and "that are not imgclf caches: 0123" in err


def test_cache_prune_and_builds_never_follow_a_partial_symlink(tmp_path, capsys):
    cache, victim = tmp_path / "cache", tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    (victim / "progress.json").write_text("{}")
    cache.mkdir()
    (cache / ".partial-0123456789abcdef01234567").symlink_to(victim, target_is_directory=True)
    _age(victim)
    files = sorted(write_class_folder(tmp_path / "d", ["a"], 3).rglob("*.png"))
    cached_split(files, [0] * 3, size=12, channels=3, cache_root=cache, progress=True)  # removes stale partials
    assert main(["cache", "prune", "--older-than", "0", "--cache-dir", str(cache)]) == 0
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt", "progress.json"]
    assert (cache / ".partial-0123456789abcdef01234567").is_symlink()
    assert "0123456789abcdef01234567" not in capsys.readouterr().out


# ---------------------------------------------------------------- 24.12: YAML that expands without end

BOMB = "model:\n  args:\n    a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"    {n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True))


def test_a_config_of_nested_aliases_or_deep_nesting_is_one_line(tmp_path, capsys):
    for name, text, said in [("bomb.yaml", BOMB, "line 4: YAML aliases (*a) are not accepted in a configuration "
                                                  "file; write the value out in full"),
                             ("deep.yaml", "model:\n  args:\n    a: " + "[" * 3000 + "]" * 3000,
                              "line 3: values nested over 64 deep are not accepted in a configuration file"),
                             ("space.yaml", "lr: &r [0.1, 0.2]\nbatch_size: *r\n", "line 2: YAML aliases (*r)")]:
        (tmp_path / name).write_text(text)
        command = ["tune", "--space", str(tmp_path / name)] if name == "space.yaml" else ["train", "--config"]
        if name != "space.yaml":
            command.append(str(tmp_path / name))
        assert main([*command, "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"imgclf: error: {tmp_path / name} {said}") and err.count("\n") == 1, err
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 24.15, 24.19, 24.24: imgclf runs

def _fake_run(folder: Path, *, status=None, metrics: str = "") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model": {"name": "m"}, "optim": {"epochs": 2}}))
    (folder / "metrics.jsonl").write_text(metrics)
    if status is not None:
        (folder / "status.json").write_text(json.dumps(status))
    return folder


def test_runs_lists_every_run_around_hostile_ones(tmp_path, capsys, monkeypatch):
    record = {"epoch": 1, "val_acc": 0.5, "epoch_seconds": 0.25}
    _fake_run(tmp_path / "list", status=[1])  # status.json a list
    _fake_run(tmp_path / "deep", metrics="[" * 100_000 + "]" * 100_000 + "\n" + json.dumps(record) + "\n")
    _fake_run(tmp_path / "absurd", metrics=json.dumps({**record, "epoch_seconds": 1e300, "val_acc": 10**400}))
    _fake_run(tmp_path / "types", status={"status": "finished", "started": "x"},
              metrics=json.dumps({**record, "epoch_seconds": "x"}))
    (tmp_path / "types" / "config.json").write_text(json.dumps({"model": 5, "optim": {"epochs": 1e300,
                                                                                      "monitor": [1]}}))
    _fake_run(tmp_path / "fine", status={"status": "finished"}, metrics=json.dumps(record))
    assert main(["runs", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert sorted(rows) == ["absurd", "deep", "fine", "list", "types"] and err == f"5 runs under {tmp_path}\n"
    assert rows["deep"][3:] == ["1/2", "val_acc", "0.5000", "(epoch", "1)", "0s", "crashed"]
    assert rows["absurd"][3:] == ["1/2", "-", "?", "crashed"]  # was 300 digits of hours; then a traceback
    assert rows["types"][1:] == ["?", "?", "1/?", "val_acc", "0.5000", "(epoch", "1)", "0s", "finished"]

    from imgclf import runs

    real = runs.summarize

    def failing(folder, root):
        if folder.name == "fine":
            raise ValueError("torn")
        return real(folder, root)

    monkeypatch.setattr(runs, "summarize", failing)
    assert main(["runs", str(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 4 and err == f"imgclf: skipping the run {tmp_path / 'fine'}: its files " \
                                                 f"cannot be read (ValueError: torn)\n"


def test_a_run_is_running_only_while_a_process_holds_its_lock(tmp_path, capsys):
    import socket

    from imgclf.files import RUN_MARK, claim_run_folder

    # status.json says running, by a process that is alive (this one): its PID, reused say, is no proof
    run = _fake_run(tmp_path / "r", status={"status": "running", "pid": os.getpid(), "host": socket.gethostname()})
    (run / RUN_MARK).write_text("1\n")
    assert main(["runs", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "crashed"
    with claim_run_folder(run):
        assert main(["runs", str(tmp_path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["status"] == "running"


# ---------------------------------------------------------------- 24.10, 24.24: URLs and standard input

def _trickling_server(first: bytes):
    """A server that answers each connection with `first`, then a byte every 50 ms for as long as it is read."""
    import socket
    import threading
    import time

    server = socket.create_server(("127.0.0.1", 0))

    def answer(conn):
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(first)
                while True:
                    time.sleep(0.05)
                    conn.sendall(b"x")
            except OSError:
                return

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_a_slow_server_cannot_keep_a_download_going(monkeypatch):
    import time

    import pytest

    from imgclf import predict
    from imgclf.transforms import BadImage

    monkeypatch.setattr(predict, "DOWNLOAD_TIMEOUT", 0.4)
    for first in (b"HTTP/1.0 200 OK\r\nX-Slow: ", b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n"):
        server = _trickling_server(first)  # slow in its headers, then in its body
        start = time.monotonic()
        with pytest.raises(BadImage, match=r"^could not fetch it \(not downloaded within 0.4 s\)$"):
            predict.fetch(f"http://127.0.0.1:{server.getsockname()[1]}/a.png")
        assert time.monotonic() - start < 1.5  # each read came within the socket's timeout: it waited for ever
        server.close()


def test_standard_input_over_the_limit_and_file_objects_never_named(monkeypatch):
    import io
    import sys
    import types

    from imgclf import predict
    from imgclf.transforms import PLAIN

    monkeypatch.setattr(predict, "MAX_DOWNLOAD", 1 << 20)
    decode = predict.Predictor._decode
    shape = types.SimpleNamespace(size=16, channels=3, depth=8, decoding=PLAIN)
    shape.prepare = lambda picture: predict.Predictor.prepare(shape, picture)  # _decode decodes by it
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(b"\x89PNG\r\n\x1a\n" + bytes(2 << 20))))
    assert decode(shape, "-") == "over the 1 MB limit for a picture read from standard input"  # was: truncated
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(b"no picture")))
    assert decode(shape, "-") == "not a readable picture (cannot identify image file)"  # was: <_io.BytesIO ...>


def test_a_hostile_mlflow_json_is_no_state(tmp_path):
    """A sibling of 24.19: RUN/mlflow.json a list, or nested thousands deep, was a traceback on --resume."""
    from imgclf.mlflowrun import read_state

    for text in ("[1]", "[" * 100_000 + "]" * 100_000, '"x"'):
        (tmp_path / "mlflow.json").write_text(text)
        assert read_state(tmp_path) is None
    (tmp_path / "mlflow.json").write_text('{"run_id": "r", "tracking_uri": "u"}')
    assert read_state(tmp_path) == {"run_id": "r", "tracking_uri": "u"}
