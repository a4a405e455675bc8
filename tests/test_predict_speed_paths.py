"""`imgclf predict`'s fast paths: a lean torchvision import, BatchNorm folding, a first batch of one picture
decoded ahead of the rest. Each must give the same answers as the plain path."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.checkpoint import FORMAT, FORMAT_VERSION, save_checkpoint
from imgclf.models import FastNet, _Norm, build_model
from imgclf.predict import Predictor, _fold_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process trainings: one intra-op thread (conftest)


def resnet_checkpoint(path, *, size: int = 32) -> dict:
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, img_size=size)
    ckpt = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": {"name": "resnet18"},
            "classes": ["a", "b", "c"], "state_dict": model.state_dict(),
            "input": {"size": size, "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    save_checkpoint(path, ckpt)
    return ckpt


def write_pictures(folder, n: int, size: int = 40) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size + 3 * i, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


LEAN_CHILD = """
import json, sys
import torch
from imgclf.models import build_model
from imgclf.predict import _torchvision_builder_alone
torch.manual_seed(0)
lean = build_model("resnet18", num_classes=3, base=_torchvision_builder_alone("resnet18")())
report = {"dynamo": "torch._dynamo" in sys.modules,
          "torchvision_left": sorted(m for m in sys.modules if m.split(".")[0] == "torchvision")}
import torchvision  # afterwards, an ordinary and complete import
report["complete"] = "resnet18" in torchvision.models.list_models() and hasattr(torchvision.ops, "nms")
plain = build_model("resnet18", num_classes=3)
plain.load_state_dict(lean.state_dict())
x = torch.randn(2, 3, 32, 32)
report["same"] = bool(torch.equal(lean.eval()(x), plain.eval()(x)))
report["type"] = type(lean).__module__ + "." + type(lean).__name__
print(json.dumps(report))
"""


@pytest.mark.slow
def test_lean_import_builds_the_same_network_without_torchvision_init():
    out = subprocess.run([sys.executable, "-c", LEAN_CHILD], capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(out.stdout.splitlines()[-1])
    assert report == {"dynamo": False, "torchvision_left": [], "complete": True, "same": True,
                      "type": "torchvision.models.resnet.ResNet"}


def test_lean_import_is_skipped_when_torchvision_is_loaded_or_the_name_unknown():
    import torchvision  # noqa: F401 - as in a process that has it already

    from imgclf.predict import _torchvision_builder_alone

    assert _torchvision_builder_alone("resnet18") is None
    assert _torchvision_builder_alone("no_such_net") is None
    assert build_model("resnet18", num_classes=2, base=None).fc.out_features == 2


@pytest.mark.slow
def test_predict_command_does_not_import_dynamo(tmp_path):
    resnet_checkpoint(tmp_path / "r18.pt")
    pictures = write_pictures(tmp_path / "pics", 3)
    child = ("import sys; from imgclf.cli import main; code = main(['predict', sys.argv[1], sys.argv[2], '--device', "
             "'cpu', '--json']); print('dynamo' if 'torch._dynamo' in sys.modules else 'lean'); sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", child, str(tmp_path / "r18.pt"), str(tmp_path / "pics")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [json.loads(line)["path"] for line in lines[:-1]] == pictures
    assert lines[-1] == "lean"


@pytest.mark.slow
def test_folded_batchnorm_computes_the_same_function():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3).eval()
    with torch.no_grad():  # BatchNorm statistics other than the initial 0/1, so that folding does something
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.bias.uniform_(-0.2, 0.2)
    folded = _fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is left alone
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_fastnet_norm_is_not_folded():
    """FastNet's norm adds 8x its bias: folded as a plain BatchNorm, the outputs would differ."""
    torch.manual_seed(0)
    model = FastNet(num_classes=3).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _Norm):
                m.bias.uniform_(-0.2, 0.2)
    folded = _fold_batchnorm(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)


@pytest.mark.slow
def test_first_batch_is_one_picture_and_answers_keep_their_order(tmp_path, monkeypatch):
    ckpt = resnet_checkpoint(tmp_path / "r18.pt")
    pictures = write_pictures(tmp_path / "pics", 9)
    bad = tmp_path / "pics" / "004.png"
    bad.write_bytes(b"not a picture")
    predictor = Predictor(ckpt, device="cpu")
    want = {r.path: r for r in (predictor.predict([p], topk=2)[0] for p in pictures)}  # one at a time
    sizes = []
    probabilities = predictor.probabilities
    monkeypatch.setattr(predictor, "probabilities", lambda images: sizes.append(len(images)) or probabilities(images))
    got = predictor.predict([str(tmp_path / "pics")], topk=2, batch_size=4)
    assert sizes == [1, 3, 4]  # pictures 1-4 with 004 unreadable, then 5-8
    assert [r.path for r in got] == pictures
    assert got[4].error and not got[4].labels
    for r in got:
        assert r.labels == want[r.path].labels
        assert r.probs == pytest.approx(want[r.path].probs, abs=1e-5)


def test_stopping_early_leaves_nothing_running(tmp_path):
    ckpt = resnet_checkpoint(tmp_path / "r18.pt")
    write_pictures(tmp_path / "pics", 6)
    before = set(threading.enumerate())
    answers = Predictor(ckpt, device="cpu").iter_predict([str(tmp_path / "pics")], batch_size=2)
    assert next(answers).labels
    decoders = [t for t in set(threading.enumerate()) - before if t.name.startswith("ThreadPoolExecutor")]
    assert decoders, "no decoding threads while predicting: this test would check nothing"
    answers.close()  # the prefetched batch is cancelled or finished, the decoding threads end
    assert [t.name for t in decoders if t.is_alive()] == []
    assert [t.name for t in set(threading.enumerate()) - before] == []
    with pytest.raises(StopIteration):
        next(answers)


def pictures_batch(n: int = 6, size: int = 32) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


@pytest.mark.slow  # a resnet18 checkpoint, predicted twice or more (~1.3 s)
def test_bf16_rechecked_in_fp32_answers_fp32s_top1(tmp_path):
    ckpt = resnet_checkpoint(tmp_path / "r18.pt")
    x = pictures_batch()
    exact = Predictor(ckpt, device="cpu", precision="fp32")
    want = exact.probabilities(x)
    every = Predictor(ckpt, device="cpu", precision="bf16", logit_error=float("inf"))  # every margin is "tiny"
    got = every.probabilities(x)
    assert every.rechecked == len(x) and exact.rechecked == 0
    assert torch.equal(got.argmax(1), want.argmax(1))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # fp32's answers, up to batch-size rounding
    trusted = Predictor(ckpt, device="cpu", precision="bf16", logit_error=0.0)  # no margin is tiny
    raw = trusted.probabilities(x)
    assert trusted.rechecked == 0
    assert not torch.equal(raw, want)  # bf16's own rounding: nothing was computed again
    torch.testing.assert_close(raw, want, rtol=0, atol=0.05)


def test_recheck_rows_flags_what_the_error_could_change():
    from imgclf.predict import recheck_rows
    from imgclf.tasks import MultiLabel, SingleLabel

    single = SingleLabel(["a", "b", "c"])
    logits = torch.tensor([[3.0, 2.5, 0.0], [3.0, 0.0, 2.9], [1.0, 1.0, 1.0], [5.0, float("nan"), 0.0]])
    assert recheck_rows(logits, 0.2, single).tolist() == [False, True, True, True]
    assert recheck_rows(logits, 0.3, single).tolist() == [True, True, True, True]
    # a reject cut: log p_top of row 0 is log(1 / (1 + e^-0.5 + e^-3)) = -0.4996; cut 0.6 is at log 0.6 = -0.511
    far = torch.tensor([[9.0, 0.0, 0.0]])
    assert recheck_rows(logits[:1], 0.001, single, reject_below=0.6).tolist() == [False]
    assert recheck_rows(logits[:1], 0.01, single, reject_below=0.6).tolist() == [True]
    assert recheck_rows(far, 0.01, single, reject_below=0.6).tolist() == [False]
    multi = MultiLabel(["a", "b"], thresholds=[0.5, 0.8])  # logit(0.8) = 1.386
    assert recheck_rows(torch.tensor([[2.0, 1.3], [0.05, -3.0], [-2.0, 3.0]]), 0.1, multi).tolist() == \
        [True, True, False]


@pytest.mark.slow  # a resnet18 checkpoint, predicted twice or more (~1.3 s)
def test_precision_auto_is_fp32_where_bf16_is_not_native(tmp_path, monkeypatch):
    from imgclf import runtime

    ckpt = resnet_checkpoint(tmp_path / "r18.pt")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    plain = Predictor.from_path(tmp_path / "r18.pt", device="cpu")  # the CLI's default: auto for a checkpoint
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain.probabilities(pictures_batch()),
                               Predictor(ckpt, device="cpu", precision="fp32").probabilities(pictures_batch()),
                               rtol=0, atol=0)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert Predictor(ckpt, device="cpu", precision="auto").dtype == (torch.bfloat16 if native else torch.float32)


def test_precision_fp32_computes_the_network_in_float32(tmp_path):
    ckpt = resnet_checkpoint(tmp_path / "r18.pt")
    predictor = Predictor(ckpt, device="cpu", precision="fp32")
    model = build_model("resnet18", num_classes=3, img_size=32)
    model.load_state_dict(ckpt["state_dict"])
    x = pictures_batch()
    with torch.inference_mode():
        want = model.eval()(predictor.transform(x, train=False)).softmax(1)
    torch.testing.assert_close(predictor.probabilities(x), want, rtol=0, atol=1e-5)  # folding's rounding alone
    assert predictor.dtype == torch.float32 and predictor.rechecked == 0
