"""Issue 13, item 3: the user's own nn.Module from a .py file (`--model FILE.py:Class`), checkpoints that
record its hash but never its code, and loads that import nothing by themselves."""

from __future__ import annotations

import hashlib
import io
import shutil

import pytest
import torch
from conftest import ROOT, write_class_folder

from imgclf import cli
from imgclf.checkpoint import build_checkpoint, load_checkpoint
from imgclf.errors import UserError
from imgclf.export import export_checkpoint
from imgclf.models import build_model, checked_model_name, model_from_checkpoint
from imgclf.usercode import model_code_scope

pytestmark = pytest.mark.usefixtures("one_thread")

TUDUI = ROOT / "docs" / "examples" / "tudui.py"

NET = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes, width=8, in_channels=3):
        super().__init__()
        self.width = width
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.body(x)

class Fixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(x.flatten(1))

class Pair(Net):
    def forward(self, x):
        return self.body(x), x
'''


@pytest.fixture(scope="module")
def tudui_run(tmp_path_factory):
    """The notes' Tudui trained one epoch from docs/examples/tudui.py on 10 classes of 32x32 pictures."""
    tmp = tmp_path_factory.mktemp("tudui")
    classes = [f"class{i}" for i in range(10)]  # Tudui's last layer has 10 outputs, as in the notes
    write_class_folder(tmp / "data" / "train", classes, 4, size=32, seed=1)
    write_class_folder(tmp / "data" / "test", classes, 2, size=32, seed=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the model named as a user in the project folder types it
        rc = cli.main(["train", "--model", "docs/examples/tudui.py:Tudui", "--data", str(tmp / "data"), "--epochs",
                       "1", "--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--cache-dir",
                       str(tmp / "cache"), "--out", str(tmp / "run")])
    assert rc == 0
    return tmp, tmp / "run" / "checkpoints" / "last.pt"


@pytest.mark.slow  # over a second (a training or a real process): the fast tier stays under a minute
def test_tudui_from_its_file_trains_and_its_checkpoint_records_the_hash_not_the_code(tudui_run):
    _, path = tudui_run
    ckpt = load_checkpoint(path)
    code = ckpt["model"]["code"]
    assert code == {"file": "tudui.py", "sha256": hashlib.sha256(TUDUI.read_bytes()).hexdigest(), "class": "Tudui",
                    "args": {}}
    assert b"Conv2d(3, 32, 5" not in path.read_bytes()  # the source is nowhere in the checkpoint
    assert ckpt["state_dict"]["model1.7.weight"].shape == (64, 1024)


@pytest.mark.slow  # its fixture (tudui_run) trains for the slow test above anyway; ~2 s of fast-tier setup
def test_loading_refuses_without_the_code_accepts_it_and_refuses_a_changed_copy(tudui_run, tmp_path):
    _, path = tudui_run
    ckpt = load_checkpoint(path)
    with pytest.raises(UserError, match="pass --model-code path/to/tudui.py") as err:
        model_from_checkpoint(ckpt)
    assert "\n" not in str(err.value)
    model = model_from_checkpoint(ckpt, model_code=str(TUDUI))
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10) and not model.training
    changed = tmp_path / "tudui.py"
    changed.write_text(TUDUI.read_text() + "\nprint('changed')\n")
    with pytest.raises(UserError, match="refused --model-code .*differs.*--trust-changed-code") as err:
        model_from_checkpoint(ckpt, model_code=str(changed))
    assert "\n" not in str(err.value)
    trusted = model_from_checkpoint(ckpt, model_code=str(changed), trust_changed_code=True)
    assert torch.equal(trusted(x), model(x))
    with model_code_scope(str(TUDUI)):  # what a command line sets once for every load it makes
        assert torch.equal(model_from_checkpoint(ckpt)(x), model(x))
        assert checked_model_name(ckpt) == f"{TUDUI}:Tudui"  # the --model a resumed run is built with
    with pytest.raises(UserError, match="--model-code"):
        checked_model_name(ckpt)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.slow
def test_exports_of_a_user_network_need_no_code(tudui_run, tmp_path):
    _, path = tudui_run
    with pytest.raises(UserError, match="--model-code"):
        export_checkpoint(path, "torchscript", tmp_path / "t.pt")
    with model_code_scope(str(TUDUI)):
        done = export_checkpoint(path, "torchscript", tmp_path / "t.pt")
    assert done.max_diff < 1e-5 and done.metadata["model"]["code"]["class"] == "Tudui"
    loaded = torch.jit.load(io.BytesIO((tmp_path / "t.pt").read_bytes()))  # plain TorchScript, no Python class
    assert loaded(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 10)


def test_constructor_gets_data_arguments_and_model_args(tmp_path):
    (tmp_path / "net.py").write_text(NET)
    model = build_model(f"{tmp_path}/net.py:Net", num_classes=4, in_channels=1, img_size=12,
                        model_args='{"width": 6}')
    assert model.width == 6 and model(torch.zeros(2, 1, 12, 12)).shape == (2, 4)
    frozen = build_model(f"{tmp_path}/net.py:Net", num_classes=4, freeze_backbone=True)
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["body.3.weight", "body.3.bias"]


@pytest.mark.parametrize(("name", "args", "message"), [
    ("net.py:Fixed", None, r"returns logits of shape \(1, 5\) for one picture, but the data has 3 classes"),
    ("net.py:Net", '{"width": ', "--model-args is not valid JSON"),
    ("net.py:Net", "[1, 2]", "must be a JSON object"),
    ("net.py:Net", '{"depth": 3}', r"Net\(depth=3, num_classes=3, in_channels=3\) failed: TypeError"),
    ("net.py:Missing", None, "has no class named Missing; its nn.Module classes: Fixed, Net, Pair"),
    ("net.py:Pair", None, "returns a tuple in eval mode"),
    ("gone.py:Net", None, "no such file"),
    ("net.py:9x", None, "not a Python class name"),
])
def test_bad_user_networks_are_one_line(tmp_path, monkeypatch, name, args, message):
    (tmp_path / "net.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message) as err:
        build_model(name, num_classes=3, img_size=8, model_args=args)
    assert "\n" not in str(err.value)


def test_errors_in_the_file_name_their_line(tmp_path):
    (tmp_path / "broken.py").write_text("import torch\n\ndef f(:\n")
    with pytest.raises(UserError, match=r"importing .*broken.py failed: SyntaxError: .*\(line 3 of broken.py\)"):
        build_model(f"{tmp_path}/broken.py:Net", num_classes=3)
    (tmp_path / "raises.py").write_text("import torch\nx = 1\nraise RuntimeError('no GPU here')\n")
    with pytest.raises(UserError, match=r"RuntimeError: no GPU here \(line 3 of raises.py\)"):
        build_model(f"{tmp_path}/raises.py:Net", num_classes=3)


def test_a_checkpoint_never_imports_code_by_itself(tmp_path):
    marker = tmp_path / "imported.txt"
    source = NET + f"\nopen({str(marker)!r}, 'a').write('x')\n"
    (tmp_path / "net.py").write_text(source)
    model = build_model(f"{tmp_path}/net.py:Net", num_classes=3)
    ckpt = build_checkpoint(model_name=f"{tmp_path}/net.py:Net", classes=["a", "b", "c"], channels=3, size=32,
                            mean=[0.5] * 3, std=[0.5] * 3, config={"model": {"args": None}},
                            state={"state_dict": model.state_dict()})
    marker.unlink()
    shutil.copy(tmp_path / "net.py", tmp_path / "copy.py")  # the same bytes under another name: accepted
    for load in (lambda: model_from_checkpoint(ckpt), lambda: checked_model_name(ckpt)):
        with pytest.raises(UserError, match="--model-code"):
            load()
    hand_made = {**ckpt, "model": {k: v for k, v in ckpt["model"].items() if k != "code"}}
    with pytest.raises(UserError, match="records no SHA-256"):
        model_from_checkpoint(hand_made)
    assert not marker.exists()  # nothing of net.py ran
    assert model_from_checkpoint(ckpt, model_code=str(tmp_path / "copy.py"))(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(UserError, match="--model-code is for checkpoints of a network from a .py file"):
        checked_model_name({"model": {"name": "resnet18"}}, model_code=str(tmp_path / "net.py"))
