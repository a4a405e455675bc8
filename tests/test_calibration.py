"""Calibrated confidence (issue 25 point 4): temperature scaling, ECE, the reliability diagram, "unknown"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from imgclf.calibration import fit_on, fit_temperature, rescaled
from imgclf.checkpoint import build_checkpoint, load_checkpoint, save_checkpoint
from imgclf.config import TrainConfig
from imgclf.errors import UserError
from imgclf.metrics import expected_calibration_error, precision_threshold, reliability_bins
from imgclf.models import TutorialCNN
from imgclf.predict import Predictor, print_predictions
from imgclf.tasks import checkpoint_task

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process trainings: one intra-op thread (conftest)


def overconfident(n: int, seed: int, scale: float = 3.0):
    """Labels drawn from softmax(z) (so z's probabilities are calibrated) and the logits of an over-confident
    model, scale * z."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, generator=g, dtype=torch.float64) * 1.5
    labels = torch.multinomial(z.softmax(1), 1, generator=g).flatten()
    return scale * z, labels


# ---------------------------------------------------------------- pure functions

def test_ece_of_known_cases():
    probs = torch.tensor([[1.0, 0.0]] * 4)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.5)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 0, 0])) == pytest.approx(0.0)
    # two bins: 0.6 (right 1 of 2: |0.5 - 0.6|) and 0.9 (right 2 of 2: |1 - 0.9|), equal weights
    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.9, 0.1], [0.1, 0.9]])
    assert expected_calibration_error(probs, torch.tensor([0, 1, 0, 1])) == pytest.approx(0.1)
    bins = reliability_bins(probs, torch.tensor([0, 1, 0, 1]))
    assert sum(bins["count"]) == 4 and len(bins["edges"]) == 16
    assert expected_calibration_error(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 0.0


def test_fit_temperature_recovers_the_overconfidence():
    logits, labels = overconfident(4000, seed=0, scale=3.0)
    assert fit_temperature(logits, labels) == pytest.approx(3.0, rel=0.1)
    # a per-row shift (log-probabilities instead of logits) does not change it
    assert fit_temperature(logits.log_softmax(1), labels) == pytest.approx(fit_temperature(logits, labels), rel=1e-4)
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0


def test_temperature_scaling_lowers_ece_on_a_held_out_split():
    fit_logits, fit_labels = overconfident(2000, seed=1)
    held_logits, held_labels = overconfident(2000, seed=2)
    fitted = fit_on(fit_logits.softmax(1), fit_labels)
    t = fitted["temperature"]
    assert set(fitted["reject_below_for_precision"]) == {"0.9", "0.95", "0.99"}
    before = expected_calibration_error(held_logits.softmax(1), held_labels)
    after = expected_calibration_error((held_logits / t).softmax(1), held_labels)
    assert after < before / 2, (before, after)
    # and rescaling probabilities is the same as dividing the logits
    assert torch.allclose(rescaled(held_logits.softmax(1), t), (held_logits / t).softmax(1), atol=1e-9)


def test_precision_threshold():
    probs = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 0, 1, 0])  # the fourth most confident is wrong
    assert precision_threshold(probs, labels, 1.0) == (pytest.approx(0.8), pytest.approx(0.6))
    assert precision_threshold(probs, labels, 0.8) == (pytest.approx(0.6), pytest.approx(1.0))
    assert precision_threshold(torch.tensor([[0.9, 0.1]]), torch.tensor([1]), 0.5) is None


# ---------------------------------------------------------------- checkpoints, exports, predict

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """An untrained TutorialCNN checkpoint for 16x16 pictures of 3 classes, its copy with a temperature, and
    two pictures."""
    root = tmp_path_factory.mktemp("calibration")
    torch.manual_seed(0)
    model = TutorialCNN(num_classes=3, in_channels=3, img_size=16)
    common = dict(model_name="tutorial_cnn", classes=["a", "b", "c"], channels=3, size=16, mean=[0.5] * 3,
                  std=[0.25] * 3, config=TrainConfig().to_dict(), state={"state_dict": model.state_dict()})
    save_checkpoint(root / "old.pt", build_checkpoint(**common))
    save_checkpoint(root / "hot.pt", build_checkpoint(**common, temperature=0.05))  # sharpens: top well over 1/3
    save_checkpoint(root / "cool.pt", build_checkpoint(**common, temperature=2.0))
    rng = np.random.default_rng(0)
    pictures = []
    for i in range(2):
        pictures.append(root / f"p{i}.png")
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(pictures[-1])
    return {"root": root, "old": root / "old.pt", "hot": root / "hot.pt", "cool": root / "cool.pt",
            "pictures": pictures}


def test_old_checkpoints_load_at_temperature_one(tiny):
    ckpt = load_checkpoint(tiny["old"])
    assert "temperature" not in ckpt and checkpoint_task(ckpt).temperature == 1.0
    assert checkpoint_task(load_checkpoint(tiny["hot"])).temperature == 0.05


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), "2", True, 1e9])
def test_a_damaged_temperature_is_one_line(tiny, tmp_path, value):
    ckpt = load_checkpoint(tiny["old"])
    save_checkpoint(tmp_path / "bad.pt", {**ckpt, "temperature": value})
    with pytest.raises(UserError, match="temperature"):
        load_checkpoint(tmp_path / "bad.pt")


def test_the_temperature_divides_the_logits_in_predict(tiny):
    old = Predictor.from_path(tiny["old"], device="cpu")
    hot = Predictor.from_path(tiny["hot"], device="cpu")
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(hot.probabilities(x), rescaled(old.probabilities(x).double(), 0.05).float(), atol=1e-5)


def answers(predictor, paths, style="json") -> list[dict]:
    import io

    out = io.StringIO()
    print_predictions(predictor.iter_predict([str(p) for p in paths], topk=1), style, out=out, err=io.StringIO())
    return [json.loads(line) for line in out.getvalue().splitlines()] if style == "json" else out.getvalue()


@pytest.mark.slow
def test_reject_below_answers_unknown_from_a_checkpoint_and_its_onnx_export(tiny, tmp_path):
    pytest.importorskip("onnxruntime")
    from imgclf.export import export_checkpoint

    export_checkpoint(tiny["hot"], "onnx", tmp_path / "hot.onnx", reject_below=0.999999)
    exported = Predictor.from_path(tmp_path / "hot.onnx")
    assert exported.metadata["temperature"] == 0.05 and exported.metadata["reject_below"] == 0.999999
    checkpoint = Predictor.from_path(tiny["hot"], device="cpu")
    checkpoint.reject(0.999999)
    from_ckpt, from_onnx = answers(checkpoint, tiny["pictures"]), answers(exported, tiny["pictures"])
    for a, b in zip(from_ckpt, from_onnx, strict=True):
        assert a["unknown"] is True and b["unknown"] is True
        assert set(a["scores"]) == {"a", "b", "c"}  # all the scores, calibrated: the same from either
        assert all(abs(a["scores"][k] - b["scores"][k]) < 1e-4 for k in a["scores"])
    exported.reject(0.0)  # the command line's --reject-below overrides the stored cut
    assert [a["unknown"] for a in answers(exported, tiny["pictures"])] == [False, False]
    assert "unknown (best: " in answers(checkpoint, tiny["pictures"], style="text")


@pytest.mark.slow
def test_eval_of_an_export_agrees_with_the_checkpoint(tiny, tmp_path):
    """The export's graph applies the temperature; eval undoes it, so both give the same loss and ECE."""
    pytest.importorskip("onnxruntime")
    from conftest import write_class_folder

    from imgclf.config import DataConfig
    from imgclf.evaluate import evaluate_checkpoint, evaluation_summary
    from imgclf.export import export_checkpoint

    data = write_class_folder(tmp_path / "data", ["a", "b", "c"], 4, size=16)
    export_checkpoint(tiny["cool"], "onnx", tmp_path / "cool.onnx")
    got = [evaluation_summary(evaluate_checkpoint(m, DataConfig(data=str(data)), device="cpu"))
           for m in (tiny["cool"], tmp_path / "cool.onnx")]
    assert got[1]["loss"] == pytest.approx(got[0]["loss"], abs=1e-4)
    for key in ("temperature", "ece_before", "ece_after", "nll_after"):
        assert got[1]["calibration"][key] == pytest.approx(got[0]["calibration"][key], abs=1e-4), key
    assert got[0]["calibration"]["temperature"] == 2.0


def test_serve_answers_unknown(tiny):
    from imgclf.serve import labelled

    predictor = Predictor.from_path(tiny["hot"], device="cpu")
    probs = torch.tensor([0.5, 0.3, 0.2])
    assert "unknown" not in labelled(predictor, probs, 1)
    predictor.reject(0.6)
    answer = labelled(predictor, probs, 1)
    assert answer["unknown"] is True and answer["scores"] == {"a": 0.5, "b": 0.3, "c": 0.2}
    predictor.reject(0.5)
    assert labelled(predictor, probs, 1)["unknown"] is False


@pytest.mark.slow
def test_reject_below_on_the_command_line(tiny):
    done = run_cli("predict", tiny["hot"], *tiny["pictures"], "--reject-below", "1", "--json", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert all(json.loads(line)["unknown"] for line in done.stdout.splitlines())
    done = run_cli("predict", tiny["hot"], tiny["pictures"][0], "--reject-below", "1.5")
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_training_fits_and_stores_the_temperature(tmp_path: Path):
    """A short real run (ants/bees from the shared data, or a synthetic folder): calibration.json,
    reliability.png and the temperature in both checkpoints; eval reports ECE before and after."""
    from conftest import write_class_folder

    data = write_class_folder(tmp_path / "data", ["x", "y", "z"], 40, size=16, seed=4)
    out = tmp_path / "run"
    done = run_cli("train", "--data", data, "--epochs", "2", "--device", "cpu", "--precision", "fp32",
                   "--batch-size", "16", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "calibration: temperature" in done.stderr
    figures = json.loads((out / "calibration.json").read_text())
    assert set(figures) == {"best.pt", "last.pt"} and (out / "reliability.png").stat().st_size > 1000
    for name in ("best.pt", "last.pt"):
        assert load_checkpoint(out / "checkpoints" / name)["temperature"] == figures[name]["temperature"]
    done = run_cli("eval", out / "checkpoints" / "best.pt", "--data", data, "--json", "--reliability",
                   tmp_path / "r.png", "--reject-precision", "0.9")
    assert done.returncode == 0, done.stderr
    calibration = json.loads(done.stdout)["calibration"]
    assert calibration["temperature"] == figures["best.pt"]["temperature"] and "ece_after" in calibration
    assert (tmp_path / "r.png").is_file() and "reject-precision 0.9" in done.stderr
