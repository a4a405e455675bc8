"""Every bad input, one line (issue 3, points 6 and 7): one line on stderr, no traceback unless --debug, and
the documented exit codes (docs/usage.md, "Exit codes and safety"); a diverging run stops with exit status 3."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_class_folder

import imgclf.tasks
import imgclf.train
from imgclf.checkpoint import load_checkpoint
from imgclf.cli import main
from imgclf.errors import EXIT_DIVERGED, EXIT_PARTIAL, EXIT_USAGE, shown

ENV = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("errors-data")
    write_class_folder(root / "train", ["a", "b", "c"], 6, seed=1)
    write_class_folder(root / "test", ["a", "b", "c"], 2, seed=2)
    return root


@pytest.fixture(scope="module")
def checkpoint(folder, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("errors-run") / "run"
    assert main(["train", "--data", str(folder), "--epochs", "1", "--batch-size", "6", "--lr", "0.01",
                 "--device", "cpu", "--out", str(run)]) == 0
    return run / "checkpoints" / "last.pt"


def one_line(capsys, code: int, expected_code: int = EXIT_USAGE) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == expected_code, err
    assert len(lines) == 1, err
    assert lines[0].startswith("imgclf") and "Traceback" not in err
    return lines[0]


def train(*args) -> int:
    return main(["train", "--device", "cpu", *map(str, args)])


def test_unknown_model_names_the_valid_ones(folder, tmp_path, capsys):
    line = one_line(capsys, train("--data", folder, "--model", "resnet19", "--out", tmp_path / "r"))
    assert "unknown model 'resnet19'" in line
    assert "tutorial_cnn" in line and "resnet18" in line and "imgclf models" in line
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_unknown_data_set_names_the_valid_ones(tmp_path, capsys):
    line = one_line(capsys, train("--data", "cifar11", "--out", tmp_path / "r"))
    assert "'cifar11'" in line and "cifar10, cifar100, mnist, fashion-mnist" in line


@pytest.mark.parametrize("flags, words", [
    (["--img-size", "abc"], "argument --img-size: invalid int value: 'abc'"),
    (["--img-size", "4"], "--img-size must be 8..4096, got 4"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--optimizer", "lbfgs"], "argument --optimizer: invalid choice: 'lbfgs'"),
], ids=["size-not-a-number", "size-too-small", "batch-zero", "negative-lr", "unknown-optimizer"])
def test_malformed_values(folder, tmp_path, capsys, flags, words):
    try:
        code = train("--data", folder, "--out", tmp_path / "r", *flags)
    except SystemExit as exit_:  # argparse's own checks end the program (with a one-line message)
        code = exit_.code
    assert words in one_line(capsys, code)


def test_malformed_input_size_for_inspect():
    from imgclf.config import parse_size
    from imgclf.errors import UserError

    assert parse_size("1x28x28") == (1, 28, 28)
    for text in ("32", "3x32", "3xAx32", "0x32x32", ""):
        with pytest.raises(UserError, match="malformed size"):
            parse_size(text)


def test_missing_paths(tmp_path, checkpoint, capsys):
    nowhere = tmp_path / "nowhere"
    assert "is neither a built-in data set" in one_line(capsys, train("--data", nowhere, "--out", tmp_path / "r"))
    assert f"no such file: {nowhere}.pt" in one_line(capsys, main(["predict", f"{nowhere}.pt", str(tmp_path)]))
    assert f"no such file: {nowhere}.pt" in one_line(
        capsys, main(["eval", f"{nowhere}.pt", "--data", str(tmp_path)]))
    assert "nothing to resume" in one_line(capsys, train("--resume", nowhere))
    code = main(["predict", str(checkpoint), f"{nowhere}.jpg"])
    assert f"{nowhere}.jpg: no such file" in one_line(capsys, code, EXIT_PARTIAL)


def test_pretrained_file_that_does_not_exist(folder, tmp_path, capsys):
    line = one_line(capsys, train("--data", folder, "--pretrained", tmp_path / "w.pt", "--out", tmp_path / "r"))
    assert f"no such file: {tmp_path / 'w.pt'}" in line
    line = one_line(capsys, train("--data", folder, "--model", "resnet18", "--pretrained", tmp_path / "w.pt",
                                  "--out", tmp_path / "r"))
    assert "is neither a file nor a weights name of resnet18" in line


def test_out_folder_that_cannot_be_made(folder, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    line = one_line(capsys, train("--data", folder, "--epochs", 1, "--out", tmp_path / "file" / "run"))
    assert str(tmp_path / "file") in line


def test_checkpoint_for_another_number_of_classes(checkpoint, tmp_path, capsys):
    other = tmp_path / "other"
    write_class_folder(other / "train", ["cat", "dog"], 2)
    write_class_folder(other / "test", ["cat", "dog"], 2)
    line = one_line(capsys, main(["eval", str(checkpoint), "--data", str(other), "--device", "cpu"]))
    assert "was trained for 3 classes (a, b, c), but" in line and "has 2 (cat, dog)" in line


def test_files_that_are_not_checkpoints(tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert "cannot read" in one_line(capsys, main(["predict", str(text), str(tmp_path)]))
    weights = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    assert "is not an imgclf checkpoint" in one_line(capsys, main(["predict", str(weights), str(tmp_path)]))
    half = tmp_path / "half.pt"
    torch.save({"format": "imgclf-checkpoint", "w": torch.zeros(1000)}, half)
    half.write_bytes(half.read_bytes()[:1500])  # truncated, as a copy cut short would be
    assert "cannot read" in one_line(capsys, main(["eval", str(half), "--data", str(tmp_path)]))


def test_non_image_to_predict_is_named_and_the_others_predicted(checkpoint, folder, tmp_path, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("hello")
    good = folder / "test" / "a" / "0000.png"
    code = main(["predict", str(checkpoint), str(bad), str(good), "--device", "cpu"])
    out = capsys.readouterr()
    assert code == EXIT_PARTIAL
    # the path once, at the front: Pillow's own message names the file (or a file object) again
    assert out.err.strip().splitlines() == [f"imgclf: {bad}: not a readable picture (cannot identify image file)"]
    assert out.out.startswith(str(good))


@pytest.mark.slow
def test_real_processes_one_line_and_debug_traceback(tmp_path):
    r = run_cli("train", "--data", tmp_path / "nowhere", "--out", tmp_path / "r", env=ENV)
    assert r.returncode == EXIT_USAGE
    assert r.stderr.splitlines() == [f"imgclf: error: --data '{tmp_path / 'nowhere'}' is neither a built-in data "
                                     f"set (fashion-mnist-mini, cifar10, cifar100, mnist, fashion-mnist) nor an existing folder"]
    r = run_cli("train", "--debug", "--data", tmp_path / "nowhere", "--out", tmp_path / "r", env=ENV)
    assert r.returncode != 0
    assert "Traceback (most recent call last)" in r.stderr and "UserError" in r.stderr


def test_huge_learning_rate_stops_with_exit_3_naming_epoch_and_step(folder, tmp_path, capsys):
    code = train("--data", folder, "--epochs", 2, "--lr", "1e6", "--batch-size", 6, "--out", tmp_path / "r")
    err = capsys.readouterr().err
    assert code == EXIT_DIVERGED, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("imgclf: error: training diverged: loss became ") and " at epoch 1, step " in last
    assert "no checkpoint was written; try a lower --lr" in last and "Traceback" not in err


def test_divergence_keeps_the_last_good_checkpoint(folder, tmp_path, capsys, monkeypatch):
    """The loss turns NaN in the 2nd step of epoch 2: the run stops, and last.pt of epoch 1 stays, whole."""
    real = imgclf.tasks.SingleLabel.loss
    calls = {"n": 0}

    def poisoned(self, logits, y):
        calls["n"] += 1
        value = real(self, logits, y)
        return value * float("nan") if calls["n"] == 3 + 2 else value  # 3 steps per epoch

    monkeypatch.setattr(imgclf.tasks.SingleLabel, "loss", poisoned)
    run = tmp_path / "r"
    code = train("--data", folder, "--epochs", 3, "--batch-size", 6, "--lr", 0.01, "--out", run)
    err = capsys.readouterr().err
    assert code == EXIT_DIVERGED and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert f"training diverged: loss became nan at epoch 2, step 2; the last good checkpoint {run}/checkpoints/" \
           f"last.pt is kept; try a lower --lr" in line.replace(os.sep, "/")
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


# ---------------------------------------------------------------- never a broken model saved as good (issue 14, point 2)


@pytest.mark.parametrize("flags", [
    ["--lr", "inf"], ["--lr", "nan"], ["--lr", "0"], ["--momentum", "nan"], ["--momentum", "-5"], ["--momentum", "1"],
    ["--weight-decay", "inf"], ["--weight-decay", "-1"], ["--warmup-epochs", "-1"], ["--warmup-epochs", "nan"],
    ["--warmup-epochs", "inf"], ["--label-smoothing", "inf"], ["--ema-decay", "nan"], ["--mixup", "inf"],
    ["--cutmix", "-1"], ["--backbone-lr-scale", "nan"], ["--eval-batch-size", "0"], ["--log-every", "0"],
    ["--seed", str(10**30)], ["--seed", "-1"], ["--epochs", "0"], ["--batch-size", "-1"], ["--img-size", "99999"],
    ["--val-fraction", "nan"], ["--crop-scale", "0"], ["--random-erasing", "inf"], ["--patience", "0"],
    ["--stop-after", "-1"], ["--freeze-epochs", "-1"], ["--crop-pad", "-1"], ["--mix-switch", "nan"],
], ids=lambda flags: " ".join(flags))
def test_boundary_values_of_training_flags_are_one_line_naming_the_flag(folder, tmp_path, capsys, flags):
    code = train("--data", folder, "--out", tmp_path / "r", *flags)
    line = one_line(capsys, code)
    assert line.startswith(f"imgclf: error: {flags[0]} must be "), line
    assert not (tmp_path / "r").exists()


def test_an_infinite_figure_never_improves():
    improved = imgclf.tasks.SingleLabel([]).improved

    assert not improved(float("inf"), None, "val_loss") and not improved(float("nan"), None, "val_acc")
    assert not improved(float("-inf"), 0.5, "val_loss") and improved(0.4, 0.5, "val_loss")


@pytest.mark.parametrize("poison", ["val-loss", "weights"])
def test_a_non_finite_model_never_becomes_last_or_best(folder, tmp_path, capsys, monkeypatch, poison):
    """Epoch 2's validation loss is NaN, or its weights hold an infinity while the loss stays finite: the run
    stops with exit 3 saying so, and last.pt and best.pt stay those of epoch 1, finite."""
    real = imgclf.train.evaluate
    calls = {"n": 0}

    def poisoned(model, *args, **kwargs):
        calls["n"] += 1
        result = real(model, *args, **kwargs)
        if calls["n"] == 2 and poison == "val-loss":
            result["loss"] = float("nan")
        elif calls["n"] == 2:
            with torch.no_grad():
                next(model.parameters())[0, 0, 0, 0] = float("inf")  # (channels last: no flat view)
        return result

    monkeypatch.setattr(imgclf.train, "evaluate", poisoned)
    run = tmp_path / "r"
    code = train("--data", folder, "--epochs", 3, "--batch-size", 6, "--lr", 0.01, "--out", run)
    err = capsys.readouterr().err
    assert code == EXIT_DIVERGED and "Traceback" not in err, err
    what = ("the validation loss became nan after epoch 2" if poison == "val-loss" else
            "the weights features.0.weight became NaN or infinite in epoch 2")
    assert err.strip().splitlines()[-1] == (f"imgclf: error: training diverged: {what}; the last good checkpoint "
                                            f"{run / 'checkpoints' / 'last.pt'} is kept; try a lower --lr")
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(run / "checkpoints" / name)
        assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


@pytest.fixture
def non_finite_checkpoint(checkpoint, tmp_path) -> Path:
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["state_dict"]["classifier.2.bias"][1] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(ckpt, path)
    return path


NOT_FINITE = ("holds weights that are not finite (state_dict classifier.2.bias has NaN or infinite values): the run "
              "that saved it diverged; use an earlier checkpoint, or train again with a lower --lr")


@pytest.mark.parametrize("command", ["predict", "predict --json", "eval", "export", "resume"])
def test_a_checkpoint_with_non_finite_weights_is_refused_everywhere(folder, non_finite_checkpoint, tmp_path, capsys,
                                                                     command):
    path = non_finite_checkpoint
    if command == "resume":
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        path = path.rename(tmp_path / "run" / "checkpoints" / "last.pt")
    argv = {"predict": ["predict", str(path), str(folder / "test"), "--device", "cpu"],
            "predict --json": ["predict", str(path), str(folder / "test"), "--device", "cpu", "--json"],
            "eval": ["eval", str(path), "--data", str(folder), "--device", "cpu"],
            "export": ["export", str(path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
            "resume": ["train", "--resume", str(tmp_path / "run"), "--epochs", "2"]}[command]
    code = main(argv)
    out = capsys.readouterr()
    assert code == EXIT_USAGE and out.out == "", out
    assert out.err.splitlines() == [f"imgclf: error: {path} {NOT_FINITE}"]
    assert not (tmp_path / "m.onnx").exists()


def test_serve_refuses_non_finite_weights_before_serving(non_finite_checkpoint, capsys, monkeypatch):
    pytest.importorskip("uvicorn")
    import socket

    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: pytest.fail("it served"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["serve", str(non_finite_checkpoint), "--port", str(port), "--device", "cpu"])
    assert one_line(capsys, code) == f"imgclf: error: {non_finite_checkpoint} {NOT_FINITE}"


def test_predict_json_never_prints_nan(checkpoint, folder, capsys, monkeypatch):
    """Finite weights whose output still is not (an overflow): that picture is an error line, never NaN."""
    from imgclf.predict import Predictor

    monkeypatch.setattr(Predictor, "probabilities", lambda self, images: torch.full((len(images), 3), float("nan")))
    code = main(["predict", str(checkpoint), str(folder / "test" / "a"), "--device", "cpu", "--json"])
    out = capsys.readouterr()
    assert code == EXIT_PARTIAL and out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 2 and all(line.endswith(": the model's output is not a number (NaN or infinite)")
                                   for line in lines)


# ---------------------------------------------------------------- one line for every bad input (issue 14, point 5)


def test_files_that_look_like_pickles_or_are_no_files(tmp_path, capsys):
    """Text whose first byte is a pickle opcode, a WebP picture, a folder, a FIFO and a device as a checkpoint."""
    (tmp_path / "notes.pt").write_text("(this is my list of things to do)\n")
    (tmp_path / "photo.pt").write_bytes(b"RIFF\x24\x00\x00\x00WEBPVP8 \x18\x00\x00\x00" + bytes(24))
    (tmp_path / "folder.pt").mkdir()
    os.mkfifo(tmp_path / "pipe.pt")
    expected = {"notes.pt": "cannot read", "photo.pt": "cannot read", "folder.pt": "is a folder, not a checkpoint",
                "pipe.pt": "is a named pipe (FIFO), not a checkpoint"}
    for name, words in expected.items():
        for argv in (["predict", str(tmp_path / name), str(tmp_path)],
                     ["export", str(tmp_path / name), "--format", "onnx"]):
            line = one_line(capsys, main(argv))
            assert f"{tmp_path / name}" in line and words in line, line
    line = one_line(capsys, main(["eval", "/dev/null", "--data", str(tmp_path)]))
    assert "/dev/null is a device, not a checkpoint file" in line


def test_weights_that_do_not_fit_name_the_tensor_and_shapes(checkpoint, folder, tmp_path, capsys):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["state_dict"]["classifier.2.weight"] = torch.zeros(3, 32)
    torch.save(ckpt, tmp_path / "bad.pt")
    del ckpt["state_dict"]["classifier.2.weight"]
    torch.save(ckpt, tmp_path / "missing.pt")
    line = one_line(capsys, main(["predict", str(tmp_path / "bad.pt"), str(folder / "test")]))
    assert line == ("imgclf: error: checkpoint weights do not fit tutorial_cnn: classifier.2.weight is [3, 32] in "
                    "the checkpoint but [3, 64] in the network (a checkpoint of another network, or damaged)")
    line = one_line(capsys, main(["eval", str(tmp_path / "missing.pt"), "--data", str(folder)]))
    assert "the network's classifier.2.weight is missing from the checkpoint" in line


@pytest.mark.parametrize("damage, words", [
    (lambda c: c.pop("optimizer"), "it has no optimizer state"),
    (lambda c: c.update(epoch="3"), "its epoch is '3', not a count"),
    (lambda c: c.update(config=[1, 2]), "config is a list of 2, not a dict"),
    (lambda c: c["config"]["optim"].update(lr="fast"), "its configuration is missing or damaged"),
    (lambda c: c["optimizer"].update(param_groups=[]), "its saved state does not fit this run"),
    (lambda c: c.update(classes="ab"), "classes is 'ab', not a list of 1 to 100,000 names"),
    (lambda c: c["input"].update(size=2.5), "input channels 3 and size 2.5 are not numbers"),
    (lambda c: c["state_dict"].update({"classifier.2.weight": torch.zeros(3, 32)}),
     "checkpoint weights do not fit tutorial_cnn: classifier.2.weight is [3, 32] in the checkpoint but [3, 64]"),
], ids=["no-optimizer", "epoch-text", "config-list", "lr-text", "optimizer-groups", "classes-text", "size-float",
        "weight-shape"])
def test_resuming_a_damaged_checkpoint_is_one_line(checkpoint, tmp_path, capsys, damage, words):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = torch.load(checkpoint, weights_only=True)
    damage(ckpt)
    torch.save(ckpt, run / "checkpoints" / "last.pt")
    line = one_line(capsys, train("--resume", run, "--epochs", 3))
    assert words in line and str(run / "checkpoints" / "last.pt") in line, line


def test_resuming_with_data_of_other_channels_or_size(folder, checkpoint, tmp_path, capsys):
    run = checkpoint.parent.parent
    other = tmp_path / "other"
    for split in ("train", "test"):
        write_class_folder(other / split, ["a", "b", "c"], 2, size=24)
    line = one_line(capsys, train("--resume", run, "--epochs", 3, "--data", other))
    assert line == (f"imgclf: error: {run} was trained on 3x16x16 pictures, but {other} gives 3x24x24; resume "
                    f"with the run's data, or start a new run with --out")


def test_a_torn_metrics_file_is_named(checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(checkpoint.parents[1], run)  # the module's finished one-epoch run, copied to be torn
    capsys.readouterr()
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-40])  # cut short, as a copy or an editor could leave it
    line = one_line(capsys, train("--resume", run, "--epochs", 2))
    assert line == (f"imgclf: error: {metrics} line 1 is not a record of an epoch (the file is torn or was edited); "
                    f"repair or delete that line, then resume again")


def test_batch_norm_on_batches_of_one(folder, tmp_path, capsys):
    code = train("--data", folder, "--model", "resnet18", "--batch-size", 1, "--epochs", 1, "--out", tmp_path / "r")
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "Traceback" not in err
    line = err.strip().splitlines()[-1]  # after the run's first line, which says what trains
    assert "batch normalisation needs more than one value per channel, and a batch of 1 gives it one" in line
    assert line.endswith("use a larger --batch-size (2 or more) or --img-size")


def test_a_file_name_with_a_line_break_stays_on_one_line(checkpoint, tmp_path, capsys):
    odd = tmp_path / "two\nlines.jpg"
    odd.write_text("not a picture")
    code = main(["predict", str(checkpoint), str(odd), "--device", "cpu"])
    line = one_line(capsys, code, EXIT_PARTIAL)
    assert line.startswith(f"imgclf: {shown(odd)}: not a readable picture")
    missing = tmp_path / "no\nsuch.pt"
    line = one_line(capsys, main(["predict", str(missing), str(odd)]))
    assert line == f"imgclf: error: no such file: {shown(missing)}"


def test_ctrl_c_during_start_up_is_one_line():
    """Ctrl-C inside an import can leave a half-imported module that fails with another error: still the one
    line of an interruption, exit 130. In a fresh process, as a user's Ctrl-C arrives: a real SIGINT in the
    test process itself crashed it once an NNCF int8 export had run there (tests/test_deploy.py)."""
    import subprocess
    import sys

    script = """
import os, signal, sys, time
import imgclf.cli

def interrupted_import(args):
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the signal arrives here
    except KeyboardInterrupt:
        pass  # as an import machinery can swallow it
    raise AttributeError("module 'numpy' has no attribute 'intp'")

imgclf.cli.cmd_models = interrupted_import
sys.exit(imgclf.cli.main(["models"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and done.stderr.strip() == "imgclf: interrupted", done.stderr


def test_a_full_disk_while_saving_names_the_path(tmp_path, monkeypatch):
    from imgclf import files
    from imgclf.checkpoint import save_checkpoint
    from imgclf.errors import UserError

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    target = tmp_path / "run" / "checkpoints" / "last.pt"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"the previous checkpoint")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError) as err:
        save_checkpoint(target, {"a": 1})
    assert str(err.value) == (f"no space left on device while writing {target}; free some space (the previous "
                              f"version of the file, if any, is kept) and try again")
    assert target.read_bytes() == b"the previous checkpoint" and os.listdir(target.parent) == ["last.pt"]
    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(UserError, match="no space left on device while writing"):
        files.atomic_write_text(tmp_path / "config.json", "{}")


def test_a_full_disk_while_training_on_a_small_tmpfs(folder, tmp_path, capsys):
    """A real full disk: a 400 KB tmpfs, where the run's first checkpoint does not fit (mounting needs root:
    skipped elsewhere)."""
    import shutil
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)],
                                                   capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        code = train("--data", folder, "--epochs", 2, "--batch-size", 6, "--out", disk / "run")
        err = capsys.readouterr().err
        assert code == EXIT_USAGE and "Traceback" not in err
        best = disk / "run" / "checkpoints" / "best.pt"
        assert err.strip().splitlines()[-1] == (f"imgclf: error: no space left on device while writing {best}; free "
                                                f"some space (the previous version of the file, if any, is kept) and "
                                                f"try again")
        assert list((disk / "run" / "checkpoints").iterdir()) == []  # no half-written temporary file left
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("damage, words", [
    (lambda c: c.pop("input"), "input is None, not a description of the input"),
    (lambda c: c.pop("state_dict"), "state_dict is None, not a dict of named tensors"),
    (lambda c: c["model"].pop("name"), "model is a dict of 3, not a description with a name of at most 1000"),
    (lambda c: c.update(classes=[1, 2, 3]), "classes is a list of 3, not a list of 1 to 100,000 names"),
    (lambda c: c["input"].update(mean=[0.5]), "input mean is a list of 1, not 3 finite numbers"),
    (lambda c: c["input"].update(channels=1000), "input channels 1000 and size 16 are not numbers of 1 to 64"),
    (lambda c: c["state_dict"].update({"classifier.2.bias": [0.0, 0.0, 0.0]}),
     "state_dict is a dict of 10, not a dict of named tensors"),
], ids=["no-input", "no-state-dict", "no-model-name", "classes-numbers", "short-mean", "channels-huge", "list-weight"])
@pytest.mark.parametrize("command", ["predict", "eval", "export"])
def test_checkpoints_with_missing_or_mistyped_keys_are_one_line(checkpoint, folder, tmp_path, capsys, damage, words,
                                                                 command):
    ckpt = torch.load(checkpoint, weights_only=True)
    damage(ckpt)
    path = tmp_path / "odd.pt"
    torch.save(ckpt, path)
    argv = {"predict": ["predict", str(path), str(folder / "test")], "eval": ["eval", str(path), "--data", str(folder)],
            "export": ["export", str(path), "--format", "onnx"]}[command]
    line = one_line(capsys, main(argv))
    assert line.startswith(f"imgclf: error: {path} is a damaged or hand-made imgclf checkpoint: ") and words in line
    assert line.endswith("; use another checkpoint of the run, or train again")
