"""Issue 13, item 4: the Python API, the command line's twin. `imgclf.fit` with a model name or an nn.Module
object (the notes' Tudui: of this module, of docs/examples/tudui.py, of a notebook), the same metrics as
`imgclf train` for the same seed, the per-epoch hook, `imgclf.load` and Run's evaluate/predict/export, and
the Python example of docs/usage.md."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, write_class_folder
from torch import nn

import imgclf
from imgclf.api import same_figures
from imgclf.checkpoint import load_checkpoint
from imgclf.cli import main as cli_main
from imgclf.configfile import option_keys as option_names
from imgclf.errors import EXIT_USAGE, UserError

pytestmark = pytest.mark.usefixtures("one_thread")

TUDUI_FILE = ROOT / "docs" / "examples" / "tudui.py"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FAST = {"epochs": 1, "batch_size": 16, "precision": "fp32", "device": "cpu"}  # fp32: in-process runs compare exactly


class Tudui(nn.Module):
    """The notes' CIFAR-10 network (note 21), defined in this test module: recorded as this file."""

    def __init__(self):
        super().__init__()
        self.model1 = nn.Sequential(
            nn.Conv2d(3, 32, 5, padding=2), nn.MaxPool2d(2), nn.Conv2d(32, 32, 5, padding=2), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1024, 64), nn.Linear(64, 10))

    def forward(self, x):
        return self.model1(x)


NOTEBOOK_CLASS = '''
from torch import nn

class Tudui(nn.Module):
    def __init__(self):
        super().__init__()
        self.model1 = nn.Sequential(
            nn.Conv2d(3, 32, 5, padding=2), nn.MaxPool2d(2), nn.Conv2d(32, 32, 5, padding=2), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1024, 64), nn.Linear(64, 10))

    def forward(self, x):
        return self.model1(x)
'''


def notebook_class() -> type:
    """Tudui as a notebook cell (or a script run as __main__) defines it: no file holds it."""
    namespace = {"__name__": "__main__"}
    exec(NOTEBOOK_CLASS, namespace)  # noqa: S102 - the test's own code
    return namespace["Tudui"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """CIFAR-10's ten classes as 32x32 folders, 4 training and 2 test pictures each."""
    root = tmp_path_factory.mktemp("api") / "cifar"
    write_class_folder(root / "train", CLASSES, 4, size=32, seed=1)
    write_class_folder(root / "test", CLASSES, 2, size=32, seed=2)
    return root


@pytest.fixture(scope="module")
def named_run(data_dir, tmp_path_factory):
    """tutorial_cnn trained one epoch with imgclf.fit."""
    return imgclf.fit("tutorial_cnn", data_dir, out=tmp_path_factory.mktemp("runs") / "named", **FAST)


def cli_argv(options: dict) -> list[str]:
    """`imgclf train` flags for fit's options, through the same declarations fit reads."""
    names, argv = option_names(), []
    for key, value in options.items():
        flag = names[key][2]
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def cli(*argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `imgclf ARGV...`, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(map(str, argv)))
    return code, out.getvalue(), err.getvalue()


def metrics_file(folder) -> list[dict]:
    return [same_figures(json.loads(line)) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- fit: the same run as `imgclf train`

@pytest.mark.slow
def test_fit_by_name_is_the_same_run_as_the_command_line(data_dir, tmp_path):
    options = {**FAST, "epochs": 2, "seed": 3, "lr": 0.02, "channels_last": False, "label_smoothing": 0.0}
    code, _, err = cli("train", "--model", "tutorial_cnn", "--data", data_dir, "--out", tmp_path / "cli",
                       *cli_argv(options))
    assert code == 0, err
    run = imgclf.fit("tutorial_cnn", data_dir, out=tmp_path / "api", **options)
    assert run.stopped is None and run.folder == tmp_path / "api"
    assert [same_figures(r) for r in run.metrics] == metrics_file(tmp_path / "cli")
    assert len(run.metrics) == 2 and run.metrics[0]["val_count"] == 20
    ours, theirs = (load_checkpoint(tmp_path / p / "checkpoints" / "best.pt")["config"] for p in ("api", "cli"))
    assert {**ours, "run": {**ours["run"], "out": None}} == {**theirs, "run": {**theirs["run"], "out": None}}


@pytest.mark.slow
def test_the_notes_tudui_from_its_file_trains_as_from_the_command_line(data_dir, tmp_path, monkeypatch):
    """`imgclf train --model docs/examples/tudui.py:Tudui` and fit(Tudui()) of that file: same metrics, and
    both checkpoints record the file's name and SHA-256, never its code."""
    options = {**FAST, "recipe": "notes", "seed": 5}
    code, _, err = cli("train", "--model", f"{TUDUI_FILE}:Tudui", "--data", data_dir, "--out", tmp_path / "cli",
                       *cli_argv({k: v for k, v in options.items() if k != "recipe"}), "--recipe", "notes")
    assert code == 0, err
    monkeypatch.syspath_prepend(str(TUDUI_FILE.parent))
    monkeypatch.delitem(sys.modules, "tudui", raising=False)
    import tudui

    torch.manual_seed(5)  # what `imgclf train --seed 5` does before it builds the network
    run = imgclf.fit(tudui.Tudui(), data_dir, out=tmp_path / "api", **options)
    assert [same_figures(r) for r in run.metrics] == metrics_file(tmp_path / "cli")
    assert run.config.model.name == f"{TUDUI_FILE.resolve()}:Tudui"
    code_record = load_checkpoint(run.best)["model"]["code"]
    assert code_record["file"] == "tudui.py" and code_record["class"] == "Tudui"
    assert code_record == load_checkpoint(tmp_path / "cli" / "checkpoints" / "best.pt")["model"]["code"]
    picture = data_dir / "test" / "cat" / "0000.png"
    [answer] = run.predict(picture)  # the Run of fit rebuilds the network from the file it came from
    with pytest.raises(UserError, match="holds no code: pass --model-code") as err:
        imgclf.load(run.folder).predict(picture)  # a loaded one is told where the code is, or imports none
    assert "\n" not in str(err.value)
    again = imgclf.load(run.folder, model_code=TUDUI_FILE).predict([picture])
    assert (again[0].labels, again[0].probs) == (answer.labels, answer.probs)


@pytest.mark.slow
def test_a_class_of_an_imported_module_is_recorded_as_its_file(data_dir, tmp_path):
    run = imgclf.fit(Tudui(), data_dir, out=tmp_path / "run", **FAST)  # Tudui: this test module's
    assert run.config.model.name == f"{ROOT / 'tests' / 'test_api.py'}:Tudui"
    assert load_checkpoint(run.best)["model"]["code"]["file"] == "test_api.py"
    assert run.model(torch.zeros(1, 3, 32, 32)).shape == (1, 10) and not run.model.training


@pytest.mark.slow
def test_a_notebook_class_is_loaded_with_the_class_handed_over(data_dir, named_run, tmp_path):
    Notebook = notebook_class()
    run = imgclf.fit(Notebook(), data_dir, out=tmp_path / "nb", **FAST)
    assert run.config.model.name == "python:Tudui" and "code" not in load_checkpoint(run.best)["model"]
    picture = data_dir / "test" / "dog" / "0001.png"
    [answer] = run.predict(picture)  # the Run of fit has the object
    loaded = imgclf.load(run.folder)
    assert loaded.metrics == run.metrics and loaded.classes == CLASSES  # figures need no network
    with pytest.raises(UserError, match=r"class Tudui of a notebook or script.*imgclf.load\(CHECKPOINT, "
                                        r"model=Tudui\)") as err:
        loaded.predict(picture)
    assert "\n" not in str(err.value)
    for given in (Notebook, Notebook()):  # the class, or an object of it (copied, not changed)
        again = imgclf.load(run.best, model=given)
        assert again.predict(picture)[0].probs == answer.probs
    assert imgclf.load(run.folder, model=Notebook).evaluate() == run.evaluate()
    code, _, err = cli("predict", run.best, picture)  # the command line cannot build it: one line
    assert code == 2 and err.count("\n") == 1 and "model=Tudui" in err
    code, _, err = cli("train", "--resume", run.folder, "--epochs", "2")
    assert code == 2 and err.count("\n") == 1 and "imgclf.fit(Tudui(), DATA, resume=RUN)" in err
    with pytest.raises(UserError, match="trained python:Tudui, but model is a Sequential; resume it with an object"):
        imgclf.fit(nn.Sequential(), data_dir, out=run.folder, resume=True, epochs=2)
    with pytest.raises(UserError, match="model= is for a network of a notebook or script"):
        imgclf.load(named_run.folder, model=Notebook)
    with pytest.raises(UserError, match="checkpoint weights do not fit python:Tudui"):
        imgclf.load(run.folder, model=nn.Sequential(nn.Flatten(), nn.Linear(3072, 10))).model  # noqa: B018


# ---------------------------------------------------------------- the per-epoch hook, resuming

@pytest.mark.slow  # over a second (a training or a real process): the fast tier stays under a minute
def test_on_epoch_sees_every_epoch_and_can_stop_the_run(data_dir, tmp_path):
    seen = []

    def hook(record):
        seen.append(record["epoch"])
        return record["epoch"] == 2  # True: stop after this epoch, resumably

    out = tmp_path / "run"
    run = imgclf.fit("tutorial_cnn", data_dir, out=out, on_epoch=hook, **{**FAST, "epochs": 3})
    assert seen == [1, 2] and "stopped by on_epoch after epoch 2" in run.stopped
    assert [r["epoch"] for r in run.metrics] == [1, 2]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 2  # the stopping epoch is kept
    with pytest.raises(UserError, match="--lr 0.5 contradicts the run being resumed"):
        imgclf.fit("tutorial_cnn", data_dir, out=out, resume=True, lr=0.5)
    with pytest.raises(UserError, match="already holds a run; continue it with resume=True"):
        imgclf.fit("tutorial_cnn", data_dir, out=out, **FAST)
    run = imgclf.fit("tutorial_cnn", data_dir, out=out, resume=True, on_epoch=hook)
    assert seen == [1, 2, 3] and run.stopped is None and [r["epoch"] for r in run.metrics] == [1, 2, 3]


# ---------------------------------------------------------------- bad input: one line each

@pytest.mark.parametrize(("model", "options", "message"), [
    ("tutorial_cnn", {"epochz": 2}, "fit() has no option 'epochz': did you mean epochs=?"),
    ("tutorial_cnn", {"args": "{}"}, "no option 'args': did you mean model_args=?"),
    ("tutorial_cnn", {"strict": True}, "did you mean strict_data=?"),
    ("tutorial_cnn", {"on_epochs": print}, "did you mean on_epoch=?"),
    ("tutorial_cnn", {"lr": "fast"}, "lr='fast' is not a number (--lr takes a number)"),
    ("tutorial_cnn", {"epochs": 1.5}, "epochs=1.5 is not a whole number (--epochs takes a whole number)"),
    ("tutorial_cnn", {"channels_last": "no"}, "channels_last='no' is not true or false (--channels-last takes true or false)"),
    ("tutorial_cnn", {"model_args": {"f": print}}, "the constructor's arguments must be plain JSON"),
    ("tutorial_cnn", {"epochs": 0}, "--epochs must be at least 1, got 0"),
    ("tutorial_cnn", {"optimizer": "adagrad"}, "optimizer='adagrad' is not one of sgd, adam, adamw"),
    ("tutorial_cnn", {"recipe": "quick"}, "unknown recipe 'quick'; choose one of auto, default, fast, fast-long, finetune, notes, photos, records"),
    ("tutorial_cnn", {"on_epoch": 5}, "on_epoch must be a function of one metrics record"),
    ("tutorial_cnn", {"resume": True, "out": "nowhere"}, "nothing to resume: nowhere/checkpoints/last.pt"),
    (Tudui, {}, "model is the class Tudui; pass an object of it: Tudui()"),
    (3, {}, "model must be a model name"),
    ("tutorial_cnn", {"data": 7}, "data=7 is not a string (--data takes a string)"),
    (Tudui(), {"pretrained": "weights.pt"}, "pretrained= is for a model that fit builds by name"),
    (Tudui(), {"freeze_backbone": True}, "freeze_backbone= is for a model that fit builds by name"),
])
def test_bad_input_to_fit_is_one_line(data_dir, tmp_path, monkeypatch, model, options, message):
    monkeypatch.chdir(tmp_path)
    options = {"data": data_dir, **options}
    with pytest.raises(UserError, match=re.escape(message)) as err:
        imgclf.fit(model, options.pop("data"), **options)
    assert "\n" not in str(err.value)


def test_an_object_that_does_not_fit_the_data_is_one_line(tmp_path):
    write_class_folder(tmp_path / "three", ["a", "b", "c"], 3, size=32)
    with pytest.raises(UserError, match=r"Tudui returns logits of shape \(1, 10\) for one picture, but the data "
                                        r"has 3 classes") as err:
        imgclf.fit(Tudui(), tmp_path / "three", out=tmp_path / "run", **FAST)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- load and Run: eval, predict, export

@pytest.mark.slow  # over a second (a training or a real process): the fast tier stays under a minute
def test_load_gives_what_the_commands_give(named_run, data_dir, tmp_path):
    best = named_run.folder / "checkpoints" / "best.pt"
    for opened in (imgclf.load(named_run.folder), imgclf.load(best)):
        assert opened.best == best and opened.metrics == named_run.metrics and len(opened.metrics) == 1
        assert opened.classes == CLASSES and not opened.model.training
    code, out, _ = cli("eval", best, "--data", data_dir, "--json")
    assert code == 0 and json.loads(json.dumps(named_run.evaluate())) == json.loads(out)
    assert named_run.evaluate(data_dir, split="train")["count"] == 40
    code, out, _ = cli("predict", best, data_dir / "test" / "cat", "--json", "--topk", "2")
    shown = [json.loads(line) for line in out.splitlines()]
    answers = named_run.predict([data_dir / "test" / "cat"], topk=2)
    assert [a.path for a in answers] == [s["path"] for s in shown]
    assert [[round(p, 6) for p in a.probs] for a in answers] == [[t["probability"] for t in s["top"]] for s in shown]
    lone = shutil.copy(best, tmp_path / "lone.pt")
    assert imgclf.load(lone).metrics == [] and imgclf.load(lone).best == lone
    exported = named_run.export("torchscript", out=tmp_path / "m.torchscript.pt")
    assert exported == tmp_path / "m.torchscript.pt" and exported.stat().st_size > 0
    assert named_run.predict(tmp_path / "gone.png")[0].error == "no such file"


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "missing", "no such run folder or checkpoint"),
    (lambda p: p, "is not a run folder: it has no checkpoints/best.pt"),
    (lambda p: torch.save({"weights": torch.zeros(2)}, p / "w.pt") or p / "w.pt", "is not an imgclf checkpoint"),
])
def test_bad_paths_to_load_are_one_line(tmp_path, make, message):
    with pytest.raises(UserError, match=message) as err:
        imgclf.load(make(tmp_path))
    assert "\n" not in str(err.value)


@pytest.mark.slow  # `named_run` trains (~2 s): its other users are slow tests
def test_bad_arguments_to_run_methods_are_one_line(named_run):
    for call, message in ((lambda: named_run.predict("x.png", topk=0), "topk must be at least 1"),
                          (lambda: named_run.predict("x.png", topk="3"), "topk must be a whole number"),
                          (lambda: named_run.export("png"), "unknown export format 'png'"),
                          (lambda: named_run.evaluate(split="dev"), "unknown --split 'dev'")):
        with pytest.raises(UserError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- progress in a notebook

def test_progress_is_a_bar_in_a_notebook_and_plain_lines_in_a_file(tmp_path, monkeypatch, capsys):
    from imgclf import tracking

    assert not tracking.in_notebook()  # pytest is no Jupyter kernel
    monkeypatch.setattr(tracking, "in_notebook", lambda: True)
    shown = tracking.Tracker(tmp_path / "a", steps_per_epoch=8)  # stderr, in a kernel: tqdm.auto's bar
    written = tracking.Tracker(tmp_path / "b", steps_per_epoch=8, stream=io.StringIO())  # a file: lines
    for tracker in (shown, written):
        tracker.start_epoch(0, 1)
        for step in range(8):
            tracker.step(step, 1.0, 0.1)
        tracker.close()
    err = capsys.readouterr().err
    assert "0/8 [" in err and "step 2/8" not in err  # the bar (its text form outside a kernel), no step lines
    assert "epoch 1/1  step 2/8  loss 1.0000" in written.stream.getvalue()


# ---------------------------------------------------------------- the package, the README

def test_import_imgclf_is_cheap_and_names_the_api():
    code = ("import sys, imgclf; heavy = [m for m in ('torch', 'imgclf.api', 'imgclf.cli') if m in sys.modules]; "
            "print(heavy, callable(imgclf.fit), 'fit' in dir(imgclf), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True", "True", "False"]  # nothing until used; the API module itself is lean
    assert imgclf.Run is imgclf.api.Run and imgclf.Stopped is imgclf.errors.Stopped
    with pytest.raises(AttributeError, match="no attribute 'fitt'"):
        imgclf.fitt  # noqa: B018


def readme_python_example() -> str:
    """The example of the Python API section (moved from the README to docs/usage.md, issue 21)."""
    text = (ROOT / "docs" / "usage.md").read_text()
    section = re.search(r"^## Python API\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "docs/usage.md has no '## Python API' section"
    return re.search(r"^```python\n(.*?)^```", section.group(1), re.S | re.M).group(1)


@pytest.mark.slow
def test_the_readme_python_example_runs(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIFAR10", str(data_dir))
    assert cli("samples", data_dir, "--out", "imgs")[0] == 0  # the pictures the README's commands write
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_python_example(), "docs/usage.md", "exec"), {"__name__": "__main__"})  # noqa: S102
    assert "epoch 2:" in out.getvalue() and "imgs/cat_0.png" in out.getvalue()
    assert (tmp_path / "runs" / "tudui" / "checkpoints" / "best.onnx").is_file()


@pytest.mark.slow
def test_the_notes_tudui_on_cifar10_folders_from_python_and_the_command_line(cifar10_dir, tmp_path, monkeypatch):
    """The issue's check, on 50 training and 10 test pictures a class of the real CIFAR-10 folders."""
    for split, count in (("train", 50), ("test", 10)):
        for folder in sorted((cifar10_dir / split).iterdir()):
            (tmp_path / "c10" / split / folder.name).mkdir(parents=True)
            for picture in sorted(folder.iterdir())[:count]:
                shutil.copy(picture, tmp_path / "c10" / split / folder.name / picture.name)
    options = {"epochs": 2, "precision": "fp32", "device": "cpu", "seed": 7}
    code, _, err = cli("train", "--model", f"{TUDUI_FILE}:Tudui", "--data", tmp_path / "c10", "--recipe", "notes",
                       "--out", tmp_path / "cli", *cli_argv(options))
    assert code == 0, err
    monkeypatch.syspath_prepend(str(TUDUI_FILE.parent))
    monkeypatch.delitem(sys.modules, "tudui", raising=False)
    import tudui

    torch.manual_seed(7)
    run = imgclf.fit(tudui.Tudui(), tmp_path / "c10", recipe="notes", out=tmp_path / "api", **options)
    assert [same_figures(r) for r in run.metrics] == metrics_file(tmp_path / "cli")
    assert run.metrics[-1]["val_count"] == 100


@pytest.mark.slow  # `named_run` trains (~2 s)
@pytest.mark.parametrize(("value", "words"), [(True, "--cutmix True is not a number (--cutmix takes a number)"),
                                              ("0.0", "--cutmix '0.0' is not a number"),
                                              (-1.0, "--cutmix must be at least 0, got -1.0")])
def test_a_damaged_configuration_is_refused_on_resume_as_the_flag_would_be(named_run, tmp_path, capsys, value,
                                                                           words):
    """Issue 24 item 23: a resumed run's config.json passes the same checks as the command line (a `cutmix` of
    another kind crashed inside CutMix), in one line, before any training."""
    folder = tmp_path / "damaged"
    shutil.copytree(named_run.folder, folder)
    last = folder / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["config"]["data"]["cutmix"] = value
    torch.save(ckpt, last)
    assert cli_main(["train", "--resume", str(folder), "--epochs", "2"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "configuration is missing or damaged" in err[0], err
    with pytest.raises(UserError, match=re.escape(words)):
        imgclf.fit("tutorial_cnn", None, resume=folder, epochs=2)


def test_a_whole_number_for_a_float_option_is_read_as_a_float():
    from imgclf.config import TrainConfig

    cfg = TrainConfig.from_dict({"data": {"cutmix": 1, "mixup": 0}})
    assert type(cfg.data.cutmix) is float and type(cfg.data.mixup) is float  # CutMix's Beta takes no integer
