"""docs/guide.md runs: every `$ command` of its ```console blocks and every ```python block, in order, in one
working folder, on small synthetic stand-ins for $CIFAR, $ANTS and $PICTURE.

`imgclf` commands run in this process (one import of torch for all of them); `tensorboard` is started, asked
for its plugin list over HTTP and stopped; anything else runs in bash. Blocks marked ```console exact must
print exactly what the guide shows (their output does not depend on the data).

To refresh the outputs shown in the guide from real data (a person's step, not a test):
    CIFAR=... ANTS=... PICTURE=... .venv/bin/python tests/test_guide.py --refresh
(run in a scratch folder; GUIDE_KEEP="imgclf train" keeps the shown output of commands that start so).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide.md"
BLOCK = re.compile(r"^```(console|python|text)([^\n]*)\n(.*?)^```\n", re.S | re.M)
PLACEHOLDERS = ("CIFAR", "ANTS", "PICTURE")


def blocks(text: str) -> list[re.Match]:
    return list(BLOCK.finditer(text))


def console_commands(body: str) -> list[tuple[str, list[str]]]:
    """(command, shown output lines) for each `$ ` line of a console block."""
    out: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tensorboard(tokens: list[str]) -> tuple[int, str]:
    """Start the server as the guide does, on loopback (on another port if the guide's is taken), wait until it
    serves the scalars written before, stop it; return what it printed."""
    exe = Path(sys.executable).with_name("tensorboard")
    args = list(tokens[1:])
    port = int(args[args.index("--port") + 1]) if "--port" in args else 6006
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    except OSError:
        port = _free_port()
        args[args.index("--port") + 1] = str(port)
    proc = subprocess.Popen([str(exe), *args, "--host", "127.0.0.1", "--load_fast", "false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    code = 1
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugins_listing", timeout=5) as r:
                    if json.loads(r.read())["scalars"]["enabled"]:
                        code = 0
                        break
            except OSError:
                pass
            time.sleep(0.5)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    return code, "".join(line + "\n" for line in err.splitlines() if line.startswith("TensorBoard"))


def run_command(command: str) -> tuple[int, str]:
    """Run one guide command in the current folder and environment; return (exit status, output)."""
    from imgclf.cli import main

    tokens = [os.path.expandvars(t) for t in shlex.split(command)]
    if tokens[0] == "imgclf":
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            try:
                code = main(tokens[1:])
            except SystemExit as exit_:  # argparse errors and --version
                code = exit_.code if isinstance(exit_.code, int) else 1
        return code, buffer.getvalue()
    if tokens[0] == "tensorboard":
        return run_tensorboard(tokens)
    r = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    return r.returncode, r.stdout + r.stderr


def run_python(code: str) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compile(code, str(GUIDE), "exec"), {"__name__": "__guide__"})  # noqa: S102 - the guide's own code
    return buffer.getvalue()


def run_guide(text: str, *, on_result, keep: tuple[str, ...] = ()) -> None:
    """Run every block of the guide in order; call on_result(match, results) for each block. Commands that
    start with one of `keep` are not run: their shown output is kept (for refreshing without retraining)."""
    for match in blocks(text):
        kind = match.group(1)
        if kind == "console":
            results = []
            for command, shown in console_commands(match.group(3)):
                kept = any(command.startswith(prefix) for prefix in keep)
                code, output = (0, "\n".join(shown) + "\n") if kept else run_command(command)
                results.append((command, shown, code, output))
            on_result(match, results)
        elif kind == "python":
            shown_block = following_text(text, match)
            shown = shown_block.group(3).rstrip("\n").splitlines() if shown_block else []
            on_result(match, [(match.group(3), shown, 0, run_python(match.group(3)))])


def following_text(text: str, match: re.Match) -> re.Match | None:
    """The ```text block right after `match` (only blank lines between), which shows a snippet's output."""
    rest = text[match.end():]
    start = match.end() + len(rest) - len(rest.lstrip())
    following = BLOCK.match(text, start)
    return following if following and following.group(1) == "text" else None


def is_exact(text: str, match: re.Match) -> bool:
    """Whether the guide promises this output word for word (```console exact, or ```text exact after python)."""
    if match.group(1) == "python":
        shown = following_text(text, match)
        return bool(shown) and "exact" in shown.group(2)
    return "exact" in match.group(2)


# ---------------------------------------------------------------- the test

def make_data(root: Path) -> dict[str, str]:
    """Small stand-ins: CIFAR-like train/test folders (16x16, so that lr-find's 100 steps are quick),
    ants/bees train/val, one picture."""
    from conftest import write_class_folder

    classes = ["airplane", "cat", "ship"]
    write_class_folder(root / "cifar" / "train", classes, 8, size=16, seed=1)
    write_class_folder(root / "cifar" / "test", classes, 4, size=16, seed=2, fmt="jpg")
    write_class_folder(root / "ants" / "train", ["ants", "bees"], 8, size=40, seed=3, fmt="jpg")
    write_class_folder(root / "ants" / "val", ["ants", "bees"], 4, size=40, seed=4, fmt="jpg")
    return {"CIFAR": str(root / "cifar"), "ANTS": str(root / "ants"),
            "PICTURE": str(root / "cifar" / "test" / "cat" / "0000.jpg")}


@pytest.mark.slow
def test_every_command_and_snippet_of_the_guide_runs(tmp_path, monkeypatch):
    text = GUIDE.read_text()
    assert len(blocks(text)) >= 30
    sections = re.findall(r"^## (\d\d)", text, re.M)
    assert sections == [f"{i:02d}" for i in range(1, 32)]  # the notes' sections 01-31, in order
    for section in re.split(r"^## ", text, flags=re.M)[1:]:  # each with something to run
        assert re.search(r"^```(console|python)", section, re.M), section.splitlines()[0]
    for name, value in make_data(tmp_path / "data").items():
        monkeypatch.setenv(name, value)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    ran = []

    def check(match, results):
        for command, shown, code, output in results:
            where = f"guide line {text[: match.start()].count(chr(10)) + 1}: {command.splitlines()[0]}"
            assert code == 0, f"{where} exited {code}:\n{output}"
            if is_exact(text, match):
                assert output.rstrip("\n").splitlines() == shown, f"{where} printed other output:\n{output}"
            ran.append(command)

    run_guide(text, on_result=check)
    assert any(c.startswith("imgclf train") for c in ran) and any(c.startswith("tensorboard") for c in ran)
    for png in ("cifar10.png", "runs/c10/curves.png", "runs/c10/confusion.png", "runs/c10/mistakes.png", "lr_find.png"):
        assert (work / png).is_file(), png


# ---------------------------------------------------------------- refreshing the shown outputs from real data

def shorten(output: str, *, head: int = 14, tail: int = 4) -> str:
    """Long outputs are shown with their middle left out."""
    lines = output.rstrip("\n").splitlines()
    if len(lines) <= head + tail + 2:
        return output
    return "\n".join([*lines[:head], "...", *lines[-tail:]]) + "\n"


def refresh(path: Path = GUIDE) -> None:
    """Rewrite the outputs shown after each command (console) and in the ```text block after each python block."""
    text = path.read_text()
    replacements: list[tuple[int, int, str]] = []
    pending_python: list[str] = []

    def record(match, results):
        if match.group(1) == "console":
            exact = is_exact(text, match)
            body = "".join(f"$ {command}\n{output if exact else shorten(output)}"
                           + ("" if output.endswith("\n") or not output else "\n")
                           for command, _, code, output in results)
            replacements.append((match.start(3), match.end(3), body))
            for command, _, code, output in results:
                print(f"[{code}] $ {command}\n{output}", file=sys.stderr)
        else:
            pending_python.append(results[0][3])
            print(results[0][3], file=sys.stderr)

    run_guide(text, on_result=record, keep=tuple(p for p in os.environ.get("GUIDE_KEEP", "").split("|") if p))
    # each python block's output goes into the ```text block right after it
    python_blocks = [m for m in blocks(text) if m.group(1) == "python"]
    for m, output in zip(python_blocks, pending_python, strict=True):
        following = following_text(text, m)
        if following:
            replacements.append((following.start(3), following.end(3), output))
    for start, end, new in sorted(replacements, reverse=True):
        text = text[:start] + new + text[end:]
    path.write_text(text)


if __name__ == "__main__" and "--refresh" in sys.argv:
    sys.path.insert(0, str(Path(__file__).parent))
    missing = [name for name in PLACEHOLDERS if name not in os.environ]
    if missing:
        sys.exit(f"set {', '.join(missing)} first")
    refresh()
