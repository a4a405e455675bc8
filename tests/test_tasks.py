"""imgclf.tasks, the task seam: SingleLabel's loss, activation, decoding, metrics (against figures worked out by
hand), which figure is better, and `imgclf eval`'s table; the one evaluation loop over logits and probabilities."""

from __future__ import annotations

import json

import pytest
import torch

from imgclf.config import MONITORS
from imgclf.engine import evaluate_outputs
from imgclf.errors import UserError
from imgclf.tasks import DEFAULT, TASKS, SingleLabel, checkpoint_task, make_task

CPU = torch.device("cpu")

# three pictures of class a, two of b, one of c; predicted: a a b | b a | c  -> confusion by hand:
#        a  b  c
#   a    2  1  0
#   b    1  1  0
#   c    0  0  1
TARGETS = torch.tensor([0, 0, 0, 1, 1, 2])
LOGITS = torch.tensor([[3.0, 1, 0], [2, 0, 1], [0, 2, 1], [0, 4, 0], [1, 0, 0], [0, 0, 5]])


def task() -> SingleLabel:
    return SingleLabel(["a", "b", "c"])


def tally_of(outputs, *, probabilities=False, keep=False, batch=4) -> dict:
    batches = [(outputs[i : i + batch], TARGETS[i : i + batch]) for i in range(0, len(TARGETS), batch)]
    return evaluate_outputs(lambda x: x, batches, task=task(), device=CPU, keep=keep, probabilities=probabilities)


def test_the_default_task_is_single_label_and_old_checkpoints_get_it():
    assert DEFAULT == "single-label" and isinstance(make_task(DEFAULT, ["x"]), SingleLabel)
    assert isinstance(checkpoint_task({"classes": ["x", "y"]}), SingleLabel)
    assert checkpoint_task({"classes": ["x", "y"], "task": "single-label"}).classes == ["x", "y"]


def test_an_unknown_task_is_one_line():
    with pytest.raises(UserError, match=r"^unknown task 'multi-colour'; imgclf knows single-label, multilabel$"):
        make_task("multi-colour", ["x"])


def test_loss_smooths_labels():
    loss = SingleLabel(["a", "b", "c"], label_smoothing=0.2).loss
    logits, target = torch.tensor([[10.0, 0.0, 0.0]]), torch.tensor([0])
    smoothed = -(0.2 / 3 * torch.log_softmax(logits, 1)).sum() - 0.8 * torch.log_softmax(logits, 1)[0, 0]
    assert loss(logits, target) == pytest.approx(float(smoothed))


def test_loss_weights_classes_and_takes_soft_targets():
    """--balance loss: a weighted mean over the batch; mixup / CutMix: soft targets (N, classes)."""
    weights = torch.tensor([1.0, 3.0, 0.5])
    logp = LOGITS.log_softmax(1)
    picked = -logp[torch.arange(6), TARGETS]
    by_hand = (weights[TARGETS] * picked).sum() / weights[TARGETS].sum()
    assert SingleLabel("abc", class_weights=weights).loss(LOGITS, TARGETS) == pytest.approx(float(by_hand))
    soft = torch.tensor([[0.7, 0.3, 0.0]] * 6)
    assert task().loss(LOGITS, soft) == pytest.approx(float(-(soft * logp).sum(1).mean()))


def test_activation_is_softmax_and_decode_gives_the_k_most_probable():
    probs = task().activation(torch.tensor([[0.0, 2.0, 1.0]]))[0]
    assert probs.sum() == pytest.approx(1.0)
    top = task().decode(probs, 2)
    assert [i for i, _ in top] == [1, 2] and [p for _, p in top] == probs[[1, 2]].tolist()
    assert [i for i, _ in task().decode(probs, 99)] == [1, 2, 0]  # k is bounded by the classes
    assert [i for i, _ in task().decode(probs, 0)] == [1]  # and at least one
    assert all(isinstance(i, int) and isinstance(p, float) for i, p in top)


def test_metrics_against_a_hand_computation():
    r = tally_of(LOGITS, keep=True)
    assert r["confusion"].tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert r["count"] == 6 and r["acc"] == pytest.approx(4 / 6)
    assert r["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(LOGITS, TARGETS)))
    assert "top5" not in r  # only over five classes
    torch.testing.assert_close(r["probs"], LOGITS.softmax(1))
    assert r["predicted"].tolist() == [0, 0, 1, 1, 0, 2]
    f = task().figures(r)
    assert list(f)[:3] == ["loss", "acc", "count"]
    # precision: a 2/3, b 1/2, c 1; recall: a 2/3, b 1/2, c 1
    by_hand = {"a": (2 / 3, 2 / 3), "b": (1 / 2, 1 / 2), "c": (1.0, 1.0)}
    for name, (precision, recall) in by_hand.items():
        figures = f["per_class"][name]
        assert (figures["precision"], figures["recall"]) == pytest.approx((precision, recall))
        assert figures["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert f["macro_precision"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert f["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_top5_over_more_than_five_classes():
    t = SingleLabel([str(i) for i in range(7)])
    logits = torch.arange(7.0).repeat(3, 1)  # class 6 most probable, class 0 least
    r = evaluate_outputs(lambda x: x, [(logits, torch.tensor([6, 2, 0]))], task=t, device=CPU)
    assert r["top5"] == pytest.approx(2 / 3) and r["acc"] == pytest.approx(1 / 3)
    assert t.figures(r)["top5"] == r["top5"]


def test_the_loop_over_probabilities_gives_the_same_figures():
    """An exported graph gives probabilities: the same confusion matrix, and the same loss up to rounding."""
    from_logits, from_probs = tally_of(LOGITS), tally_of(LOGITS.softmax(1), probabilities=True, batch=5)
    assert torch.equal(from_logits["confusion"], from_probs["confusion"])
    assert from_probs["loss"] == pytest.approx(from_logits["loss"], rel=1e-6)


def test_an_empty_evaluation_counts_nothing():
    r = evaluate_outputs(lambda x: x, [], task=task(), device=CPU, keep=True)
    assert (r["count"], r["loss"], r["acc"]) == (0, 0.0, 0.0) and r["probs"].shape == (0, 3)


def test_which_figure_is_better():
    t = task()
    assert set(t.monitors) <= set(MONITORS)  # every --monitor choice has a direction, in the tasks that have it
    assert set().union(*(kind.monitors for kind in TASKS.values())) == set(MONITORS)
    for kind in TASKS.values():  # each task's figures and their directions are config.MONITORS'
        assert kind.monitors.items() <= MONITORS.items()
    assert t.improved(0.6, 0.5, "val_acc") and not t.improved(0.5, 0.5, "val_acc")
    assert t.improved(0.4, 0.5, "val_loss") and not t.improved(0.6, 0.5, "val_loss")
    assert t.improved(0.1, None, "val_macro_f1")
    assert not t.improved(float("nan"), None, "val_acc") and not t.improved(float("-inf"), 0.5, "val_loss")


def test_summary_and_table():
    r = tally_of(LOGITS)
    s = task().summary({**r, "split": "test", "classes": ["a", "b", "c"]})
    assert list(s) == ["split", "count", "loss", "accuracy", "classes", "per_class_accuracy", "macro_precision",
                       "macro_recall", "macro_f1", "per_class", "confusion"]
    assert s["per_class_accuracy"] == pytest.approx({"a": 2 / 3, "b": 1 / 2, "c": 1.0})
    json.dumps(s)  # plain numbers and lists
    lines = task().table(s).splitlines()
    assert lines[0] == f"test: 6 pictures  loss {s['loss']:.4f}  accuracy 66.67%  macro F1 0.7222"
    assert lines[1] == ""
    assert lines[2] == "class     accuracy  precision  recall      F1   count"
    assert lines[3] == "a           66.67%      0.667   0.667   0.667       3"
    assert lines[6] == "macro                   0.722   0.722   0.722       6"
    assert lines[7:] == ["", "confusion matrix (rows: true class, columns: predicted)",
                         "       0    1    2", "0 a    2    1    0", "1 b    1    1    0", "2 c    0    0    1"]


def test_hits_count_the_right_answers_of_a_training_batch():
    assert int(task().hits(LOGITS, TARGETS)) == 4
    soft = torch.nn.functional.one_hot(TARGETS, 3).float() * 0.6 + 0.4 * torch.tensor([0.0, 0.0, 1.0])
    assert int(task().hits(LOGITS, soft)) == 4  # mixed targets: the class with the larger share


def test_a_checkpoint_naming_no_known_task_is_one_line():
    for bad in ("multi-colour", ["single-label"], 5):
        with pytest.raises(UserError, match="^unknown task "):
            checkpoint_task({"classes": ["x"], "task": bad})
