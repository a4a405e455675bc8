"""Fine-tuning done right (note 24, issue 12.5): a frozen backbone keeps its BatchNorm statistics, and staged
fine-tuning (the head alone, then everything with a lower backbone learning rate) runs and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import write_class_folder

from imgclf.checkpoint import load_checkpoint
from imgclf.cli import main
from imgclf.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(tmp_path):
    data = tmp_path / "data"
    write_class_folder(data / "train", ["a", "b"], 8, size=32, seed=1)
    write_class_folder(data / "val", ["a", "b"], 2, size=32, seed=2)
    torch.manual_seed(0)
    weights = tmp_path / "backbone.pth"
    torch.save(build_model("resnet18", num_classes=1000).state_dict(), weights)  # stands for ImageNet weights
    return data, weights


def train(data, weights, out, *flags) -> int:
    return main(["train", "--data", str(data), "--model", "resnet18", "--pretrained", str(weights), "--img-size", "32",
                 "--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--out", str(out), *map(str, flags)])


def backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("fc.") and "num_batches_tracked" not in k}


@pytest.mark.slow
def test_frozen_backbone_keeps_weights_and_batchnorm_statistics(setup, tmp_path, capsys):
    data, weights = setup
    assert train(data, weights, tmp_path / "run", "--freeze-backbone", "--epochs", 2) == 0
    capsys.readouterr()
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state_dict"]
    original = torch.load(weights, weights_only=True)
    for key, value in backbone(trained).items():
        assert torch.equal(value, original[key]), key  # running_mean / running_var included
    assert not torch.equal(trained["fc.weight"], trained["fc.weight"] * 0)  # the head trained (and exists)


@pytest.mark.slow
def test_staged_fine_tuning_frees_the_backbone_after_the_head_epochs(setup, tmp_path, capsys):
    data, weights = setup
    flags = ("--freeze-epochs", 1, "--backbone-lr-scale", 0.1, "--epochs", 2)
    assert train(data, weights, tmp_path / "one", *flags, "--stop-after", 1) == 0
    after_head = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    original = torch.load(weights, weights_only=True)
    assert all(torch.equal(v, original[k]) for k, v in backbone(after_head["state_dict"]).items())
    assert main(["train", "--resume", str(tmp_path / "one")]) == 0
    assert train(data, weights, tmp_path / "straight", *flags) == 0
    capsys.readouterr()
    resumed = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    assert not all(torch.equal(v, original[k]) for k, v in backbone(straight["state_dict"]).items())
    for key, value in straight["state_dict"].items():  # stopped after the head stage and resumed: bit-exact
        assert torch.equal(value, resumed["state_dict"][key]), key
    lrs = [group["initial_lr"] for group in straight["optimizer"]["param_groups"]]
    # the fine-tuning recipe's lr, 1e-3 for its batch of 32, moved to --batch-size 8 by AdamW's square-root
    # rule (config.lr_for_batch): 5e-4 for the head; the backbone at a tenth of the head's rate
    assert sorted(set(lrs)) == pytest.approx([5e-5, 5e-4])
