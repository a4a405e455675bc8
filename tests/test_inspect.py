"""`imgclf inspect`: shapes of note 21, hand-counted MACs, parameter totals, torchvision models, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from imgclf.cli import main
from imgclf.inspect import format_table, summarize
from imgclf.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process trainings: one intra-op thread (conftest)


def test_tutorial_cnn_shapes_are_those_of_note_21_and_macs_match_a_hand_count():
    model = build_model("tutorial_cnn", num_classes=10)
    s = summarize(model, (3, 32, 32), name="tutorial_cnn")
    assert [r.output_shape for r in s.layers] == [
        [32, 32, 32], [32, 16, 16], [32, 16, 16], [32, 8, 8], [64, 8, 8], [64, 4, 4], [1024], [64], [10]]
    assert [r.kind for r in s.layers] == ["Conv2d", "MaxPool2d"] * 3 + ["Flatten", "Linear", "Linear"]
    # MACs by hand: C_out*H_out*W_out * C_in*k*k for a convolution, in*out for a linear layer.
    conv1 = 32 * 32 * 32 * (3 * 5 * 5)  # 2,457,600
    conv2 = 32 * 16 * 16 * (32 * 5 * 5)  # 6,553,600
    conv3 = 64 * 8 * 8 * (32 * 5 * 5)  # 3,276,800
    fc1, fc2 = 1024 * 64, 64 * 10
    assert [r.macs for r in s.layers] == [conv1, 0, conv2, 0, conv3, 0, 0, fc1, fc2]
    assert s.total_macs == 12_354_176
    # parameters by hand: weights + biases
    assert [r.params for r in s.layers] == [3 * 32 * 25 + 32, 0, 32 * 32 * 25 + 32, 0, 32 * 64 * 25 + 64, 0, 0,
                                            1024 * 64 + 64, 64 * 10 + 10]
    assert s.total_params == sum(p.numel() for p in model.parameters()) == 145_578
    assert s.size_mb == pytest.approx(145_578 * 4 / 1e6)


@pytest.mark.parametrize(("name", "shape"), [("resnet18", (3, 64, 64)),
                                           pytest.param("vgg16", (3, 32, 32), marks=pytest.mark.slow)])
def test_torchvision_totals_match_parameters_and_pytorchs_flop_counter(name, shape):
    model = build_model(name, num_classes=10)
    s = summarize(model, shape, name=name)
    assert s.total_params == sum(p.numel() for p in model.parameters())
    assert sum(r.params for r in s.layers) == s.total_params  # every parameter is in exactly one row
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    assert s.total_macs == counter.get_total_flops() // 2  # one MAC is two FLOPs
    assert s.layers[-1].output_shape == [10]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert s.size_mb == pytest.approx((s.total_params * 4 + buffers) / 1e6)


def test_a_layer_called_twice_has_two_rows_but_its_parameters_count_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.fc(x.flatten(1)))

    s = summarize(Twice(), (2, 2, 2))
    assert [(r.name, r.params, r.macs) for r in s.layers] == [("fc", 72, 64), ("fc", 0, 64)]
    assert s.total_params == 72 and s.total_macs == 128


def test_attention_is_counted_and_weights_its_parent_uses_directly_are_listed():
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            tokens = x.flatten(2).transpose(1, 2)  # (1, 4, 8)
            return self.attn(tokens, tokens, tokens)[0]

    model = Attend()
    s = summarize(model, (8, 2, 2))
    assert [(r.name, r.called) for r in s.layers] == [("attn", True), ("attn.out_proj", False)]
    # q, k, v projections 3 * 4*8*8, scores and weighted sum 2 * 4*4*8, output projection 4*8*8
    assert s.layers[0].macs == 3 * 256 + 256 + 256
    assert sum(r.params for r in s.layers) == s.total_params == sum(p.numel() for p in model.parameters())
    assert "(used by its parent)" in format_table(s)


def test_grouped_and_strided_convolutions():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False))
    s = summarize(model, (4, 10, 10))
    assert s.layers[0].output_shape == [8, 5, 5]
    assert s.layers[0].macs == 8 * 5 * 5 * (4 // 2) * 9


def test_table_lists_every_layer_and_totals():
    s = summarize(build_model("tutorial_cnn", num_classes=10), (3, 32, 32), name="tutorial_cnn")
    text = format_table(s)
    assert "features.0    Conv2d     32x32x32       2,432  2,457,600" in text
    assert "parameters: 145,578" in text and "MACs:       12,354,176 (12.35 M per picture)" in text


@pytest.mark.slow
def test_cli_json(tmp_path):
    r = run_cli("inspect", "tutorial_cnn", "--input-size", "1x28x28", "--num-classes", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["input_shape"] == [1, 28, 28]
    assert out["layers"][0]["output_shape"] == [32, 28, 28] and out["layers"][-1]["output_shape"] == [3]
    assert out["total_params"] == sum(row["params"] for row in out["layers"])


def test_cli_on_a_checkpoint_and_bad_input(tiny_split_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_split_folder), "--epochs", "1", "--batch-size", "16",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(run / "checkpoints" / "last.pt")]) == 0  # input shape from the checkpoint
    out = capsys.readouterr().out
    assert "on a 3x16x16 input" in out and "classifier.2  Linear     3" in out

    for args, message in [(("tutorial_cnn", "--input-size", "3x32"), "malformed size '3x32'"),
                          (("no_such_net",), "unknown model 'no_such_net'"),
                          (("runs/x/best.pt",), "no such checkpoint"),
                          (("tutorial_cnn", "--input-size", "3x32x20"), "tutorial_cnn cannot take a 3x32x20 input")]:
        assert main(["inspect", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1
