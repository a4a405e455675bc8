"""imgclf.cli: every numeric flag of every command is checked before the command runs, one line and exit 2
for any value outside its range (0, -1, NaN, infinities, huge); a closed pipe ends a command quietly;
argparse lives in cli.py alone, and building the parser imports nothing heavy."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf import cli
from imgclf.checkpoint import build_checkpoint, save_checkpoint
from imgclf.cli import build_parser, main
from imgclf.config import TrainConfig
from imgclf.errors import EXIT_USAGE
from imgclf.models import TutorialCNN

SRC = Path(__file__).resolve().parents[1] / "src" / "imgclf"
HUGE = {int: "1" + "0" * 30, float: "1e308"}
VALUES = ("0", "-1", "nan", "inf", "-inf", "huge")

# (command, flag): the boundary values the flag accepts (the command then fails on its missing input instead).
# Every other boundary value must be refused in one line naming the flag.
ACCEPTED = {
    ("train", "--img-size"): set(), ("train", "--val-fraction"): set(), ("train", "--crop-pad"): {"0"},
    ("train", "--channels"): set(), ("lr-find", "--channels"): set(),
    ("train", "--store-size"): set(), ("train", "--progressive-resize"): set(), ("train", "--crop-scale"): set(), ("train", "--random-erasing"): {"0"},
    ("train", "--mixup"): {"0", "huge"}, ("train", "--cutmix"): {"0", "huge"}, ("train", "--mix-switch"): {"0"},
    ("train", "--batch-size"): set(), ("train", "--eval-batch-size"): set(), ("train", "--lr"): {"huge"},
    ("train", "--momentum"): {"0"}, ("train", "--weight-decay"): {"0", "huge"},
    ("train", "--warmup-epochs"): {"0", "huge"}, ("train", "--label-smoothing"): {"0"},
    ("train", "--epochs"): set(), ("train", "--patience"): set(), ("train", "--seed"): {"0"},
    ("train", "--log-every"): {"huge"}, ("train", "--stop-after"): set(), ("train", "--val-every"): {"0"},
    ("train", "--freeze-epochs"): {"0"}, ("train", "--backbone-lr-scale"): set(),
    ("train", "--ema-decay"): {"0"},
    ("train", "--whiten-bias-epochs"): {"0"}, ("train", "--warmup-start"): {"0"}, ("train", "--lr-end"): {"0"},
    ("train", "--folds"): set(), ("train", "--fold"): set(),
    ("train", "--lr-base-batch"): set(), ("train", "--clip-grad"): {"0", "huge"}, ("train", "--accumulate"): set(),
    ("lr-find", "--freeze-epochs"): {"0"}, ("lr-find", "--backbone-lr-scale"): set(),
    ("cache", "--older-than"): {"0", "huge"},
    ("eval", "--val-fraction"): set(), ("eval", "--batch-size"): set(),
    ("predict", "--topk"): {"huge"}, ("predict", "--batch-size"): set(),
    ("predict", "--every"): {"huge"}, ("predict", "--fps"): {"huge"},
    ("samples", "--per-class"): {"huge"},
    ("inspect", "--num-classes"): set(),
    ("serve", "--port"): set(), ("serve", "--topk"): {"huge"}, ("serve", "--max-upload-mb"): {"huge"},
    ("serve", "--max-batch"): set(), ("serve", "--max-megapixels"): set(),
    ("export", "--calibration-size"): set(),
    ("show", "--per-class"): set(), ("show", "--random"): set(), ("show", "--seed"): {"0"},
    ("show", "--img-size"): set(), ("show", "--val-fraction"): set(),
    ("features", "--seed"): {"0"}, ("features", "--max-channels"): {"huge"},
    ("lr-find", "--start-lr"): set(), ("lr-find", "--end-lr"): {"huge"}, ("lr-find", "--steps"): {"huge"},
    ("lr-find", "--img-size"): set(), ("lr-find", "--val-fraction"): set(), ("lr-find", "--crop-pad"): {"0"},
    ("lr-find", "--store-size"): set(), ("lr-find", "--progressive-resize"): set(), ("lr-find", "--crop-scale"): set(), ("lr-find", "--random-erasing"): {"0"},
    ("lr-find", "--mixup"): {"0", "huge"}, ("lr-find", "--cutmix"): {"0", "huge"}, ("lr-find", "--mix-switch"): {"0"},
    ("lr-find", "--batch-size"): set(), ("lr-find", "--eval-batch-size"): set(), ("lr-find", "--momentum"): {"0"},
    ("lr-find", "--weight-decay"): {"0", "huge"}, ("lr-find", "--warmup-epochs"): {"0", "huge"},
    ("lr-find", "--label-smoothing"): {"0"}, ("lr-find", "--seed"): {"0"},
    ("lr-find", "--whiten-bias-epochs"): {"0"}, ("lr-find", "--warmup-start"): {"0"}, ("lr-find", "--lr-end"): {"0"},
    ("tune", "--trials"): {"huge"}, ("tune", "--timeout"): {"huge"}, ("tune", "--startup-trials"): {"0", "huge"},
    ("tune", "--heartbeat"): set(), ("tune", "--nproc-per-node"): set(),
    **{(command, flag): set() for command in ("embed", "similar", "duplicates", "review")
       for flag in ("--val-fraction", "--batch-size")},
    ("similar", "-k"): set(), ("duplicates", "--threshold"): {"0", "-1"},
    ("review", "--folds"): set(), ("review", "--epochs"): set(),
    ("predict", "--reject-below"): {"0"}, ("serve", "--reject-below"): {"0"}, ("export", "--reject-below"): {"0"},
    ("eval", "--reject-precision"): set(),
}
ACCEPTED.update({("tune", flag): values for (command, flag), values in list(ACCEPTED.items())
                 if command == "train" and flag not in ("--stop-after", "--folds", "--fold")})  # tune takes
# train's flags but those: a trial is one run


def subcommands() -> dict:
    return build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public way


def numeric_flags() -> dict[tuple[str, str], type]:
    return {(name, a.option_strings[0]): getattr(a.type, "number", a.type) for name, p in subcommands().items()
            for a in p._actions if getattr(a.type, "number", a.type) in (int, float)}  # noqa: SLF001 (number: --batch-size N|auto)


def one_line(capsys, run) -> str:
    """Run `run()` (a call of main), expect exit status 2 and one line on stderr; return that line."""
    try:
        code = run()
    except SystemExit as exit_:  # argparse's own refusals (not a number) end the program
        code = exit_.code
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("imgclf") and "Traceback" not in err, err
    return err.strip()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A checkpoint of an untrained TutorialCNN for 16x16 pictures of 3 classes, and a picture."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = TutorialCNN(num_classes=3, in_channels=3, img_size=16)
    ckpt = build_checkpoint(model_name="tutorial_cnn", classes=["a", "b", "c"], channels=3, size=16,
                            mean=[0.5] * 3, std=[0.25] * 3, config=TrainConfig().to_dict(),
                            state={"state_dict": model.state_dict()})
    save_checkpoint(root / "tiny.pt", ckpt)
    picture = root / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(picture)
    return {"root": root, "checkpoint": root / "tiny.pt", "picture": picture}


@pytest.fixture(scope="module")
def taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def base_args(command: str, root: Path, port: int) -> list[str]:
    """Arguments with which `command` fails at once, in one line, on a missing input once its flags pass."""
    nowhere, missing = str(root / "nowhere"), str(root / "missing.pt")
    return {
        "train": ["--data", nowhere, "--out", str(root / "run"), "--device", "cpu"],
        "lr-find": ["--data", nowhere, "--out", str(root / "lr.png"), "--device", "cpu"],
        "eval": [missing, "--data", nowhere, "--device", "cpu"],
        "predict": [missing, str(root / "picture.png"), "--device", "cpu"],
        "samples": [nowhere],
        "inspect": [missing],
        "serve": [missing, "--port", str(port)],
        "export": [missing, "--format", "onnx", "--int8"],
        "show": [nowhere],
        "features": [missing, str(root / "picture.png")],
        "cache": ["list", "--cache-dir", str(root / "missing.pt")],
        "embed": [missing, nowhere, "--out", str(root / "emb"), "--device", "cpu"],
        "similar": [missing, str(root / "picture.png"), nowhere, "--device", "cpu"],
        "duplicates": [missing, nowhere, "--out", str(root / "dup"), "--device", "cpu"],
        "review": [missing, nowhere, "--out", str(root / "review"), "--device", "cpu"],
        "tune": ["--space", str(root / "missing.yaml"), "--data", nowhere, "--out", str(root / "tune"),
                 "--device", "cpu"],
    }[command]


def test_every_numeric_flag_has_its_boundaries_listed():
    assert set(numeric_flags()) == set(ACCEPTED)


@pytest.fixture(scope="module")
def flags() -> dict[tuple[str, str], type]:
    return numeric_flags()


@pytest.fixture(scope="module")
def parser():
    """One parser for the ~130 cases below: build_parser is a pure function of the code (~8 ms a build), and
    parse_args leaves the parser as it was."""
    return build_parser()


@pytest.mark.parametrize("command, flag", sorted(ACCEPTED), ids=lambda v: v)
def test_boundary_values_are_one_line_and_exit_2(command, flag, tiny, taken_port, flags, parser, tmp_path,
                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # whatever a command would write by default lands here
    monkeypatch.setattr(cli, "build_parser", lambda: parser)  # main's own code path, with the parser built once
    kind = flags[command, flag]
    for value in VALUES:
        text = HUGE[kind] if value == "huge" else value
        argv = [command, *base_args(command, tiny["root"], taken_port), flag, text]
        line = one_line(capsys, lambda argv=argv: main(argv))
        if value not in ACCEPTED[command, flag]:
            assert flag in line, (value, line)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["inspect", "features"])
def test_input_size_is_bounded(command, tiny, capsys):
    for text, words in [("0x32x32", "malformed size"), ("3xnanx32", "malformed size"),
                        ("65x32x32", "at most 64 channels"), ("3x4097x32", "4096 pixels a side"),
                        ("3x32x" + HUGE[int], "too large")]:
        argv = [command, "tutorial_cnn", *(["x.png"] if command == "features" else []), "--input-size", text]
        assert words in one_line(capsys, lambda argv=argv: main(argv))


def test_log_every_and_eval_batch_size_zero_are_one_line(capsys):
    assert one_line(capsys, lambda: main(["train", "--log-every", "0"])) == (
        "imgclf: error: --log-every must be at least 1, got 0")
    assert one_line(capsys, lambda: main(["train", "--eval-batch-size", "0"])) == (
        "imgclf: error: --eval-batch-size must be at least 1, got 0")


CHILD = """
import sys
from imgclf.cli import main
code = main(sys.argv[1:])
print(",".join(m for m in ("torch", "matplotlib", "torchvision") if m in sys.modules) or "lean")
sys.exit(code)
"""


def test_flags_are_checked_before_anything_heavy_is_imported():
    for argv in (["train", "--log-every", "0"], ["predict", "x.pt", "y.png", "--topk", "0"],
                 ["serve", "x.pt", "--max-upload-mb", "nan"], ["lr-find", "--data", "x", "--steps", "5"],
                 ["show", "x", "--per-class", "0"], []):
        r = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, timeout=120)
        assert r.stdout.splitlines()[-1] == "lean", (argv, r.stdout, r.stderr)
        assert r.returncode == (EXIT_USAGE if argv else 0), r.stderr


@pytest.mark.slow
def test_predict_into_a_closed_pipe_ends_quietly(tiny):
    """`imgclf predict ... | head -1`: the reader goes away after one line; imgclf stops without a word."""
    pictures = [str(tiny["picture"])] * 3000  # far more output than a pipe buffers
    producer = subprocess.Popen([sys.executable, "-m", "imgclf", "predict", str(tiny["checkpoint"]), *pictures,
                                 "--device", "cpu", "--json", "--batch-size", "8"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.Popen(["head", "-1"], stdin=producer.stdout, stdout=subprocess.PIPE)
    producer.stdout.close()  # head holds the only reading end now
    first, _ = head.communicate(timeout=300)
    err = producer.stderr.read()
    producer.wait(timeout=300)
    assert json.loads(first)["path"] == str(tiny["picture"])
    assert err == b"" and producer.returncode == 0


def test_a_broken_pipe_in_process_is_a_quiet_end(monkeypatch, capsys):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["models"]) == 0
    assert capsys.readouterr().err == ""


def sources_matching(pattern: str) -> list[str]:
    return sorted(p.name for p in SRC.glob("*.py") if re.search(pattern, p.read_text(), re.M))


def test_argparse_only_in_cli():
    assert sources_matching(r"^\s*(import argparse|from argparse import)|\bNamespace\b") == ["cli.py"]
    # the library never reaches back into the command line
    assert sources_matching(r"^\s*(from imgclf\.cli import|import imgclf\.cli|from imgclf import cli)") == [
        "__main__.py"]


def test_export_formats_offered_are_the_ones_export_writes():
    from imgclf import cli, formats

    export = cli.build_parser()._subparsers._group_actions[0].choices["export"]
    assert next(a.choices for a in export._actions if a.dest == "export_format") == tuple(formats.FORMATS)
