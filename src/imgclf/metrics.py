"""Pure functions for classification metrics."""

from __future__ import annotations

import math

import torch


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts; row = true class, column = predicted class."""
    idx = targets.to(torch.int64) * num_classes + preds.to(torch.int64)
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def accuracy(confusion: torch.Tensor) -> float:
    total = int(confusion.sum())
    return float(confusion.trace()) / total if total else 0.0


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Recall of each class: correct / pictures of that class (0 for a class with no pictures)."""
    support = confusion.sum(dim=1).clamp_min(1)
    return (confusion.diag().double() / support.double()).tolist()


def precision_recall_f1(confusion: torch.Tensor) -> dict[str, list[float]]:
    """Per-class precision (right / predicted as the class), recall (right / of the class) and their harmonic
    mean F1, from a confusion matrix (rows true, columns predicted); 0 where a quotient is 0/0."""
    c = confusion.double()
    right = c.diag()
    precision = right / c.sum(dim=0).clamp_min(1)
    recall = right / c.sum(dim=1).clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist()}


def summary(confusion: torch.Tensor, classes: list[str]) -> dict:
    """Macro-averaged precision, recall and F1 and the per-class figures, keyed by class name."""
    prf = precision_recall_f1(confusion)
    n = max(len(classes), 1)
    return {"macro_precision": sum(prf["precision"]) / n, "macro_recall": sum(prf["recall"]) / n,
            "macro_f1": sum(prf["f1"]) / n,
            "per_class": {name: {key: prf[key][i] for key in ("precision", "recall", "f1")}
                          for i, name in enumerate(classes)}}


def improved(value: float, best: float | None, *, larger_is_better: bool) -> bool:
    """Whether `value` beats `best` (None: nothing yet). A NaN or infinity never improves."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if larger_is_better else value < best


# ---------------------------------------------------------------- multi-label (one 0/1 target per class)

def _ranked(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One class's pictures ranked by score, highest first, cut at each distinct score (tied pictures fall
    on the same side of any threshold): (true positives, false positives, the score) at each cut, float64."""
    order = scores.double().argsort(descending=True, stable=True)
    s, t = scores.double()[order], targets.double()[order]
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # the last picture of each run of equal scores
    tp = t.cumsum(0)[last]
    fp = (1 - t).cumsum(0)[last]
    return tp, fp, s[last]


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Average precision of one class (scikit-learn's, without interpolation): the precision at each
    distinct score, weighted by the recall gained there. None when no picture is positive (undefined)."""
    if scores.numel() == 0 or float(targets.sum()) == 0:
        return None
    tp, fp, _ = _ranked(scores, targets)
    precision, recall = tp / (tp + fp), tp / tp[-1]
    gained = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((gained * precision).sum())


def best_f1_threshold(scores: torch.Tensor, targets: torch.Tensor, *, default: float = 0.5) -> float:
    """The threshold (a picture is positive when its score >= it) that maximises one class's F1 on these
    pictures: half-way between the lowest score kept and the next lower one, so that pictures scored close
    to a cut are not decided by a hair (the highest such threshold when several tie). `default` when no
    picture is positive, or nothing scores."""
    if scores.numel() == 0 or float(targets.sum()) == 0:
        return default
    tp, fp, cut = _ranked(scores, targets)
    f1 = 2 * tp / (2 * tp + fp + (tp[-1] - tp))
    best = int(f1.argmax())  # the first maximum: the highest threshold
    below = float(cut[best + 1]) if best + 1 < len(cut) else 0.0
    return (float(cut[best]) + below) / 2


def multilabel_counts(scores: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(classes, 3) int64: true positives, false positives and false negatives of each class when every
    score >= its class's threshold is a positive. `scores`, `targets`: (N, classes)."""
    predicted = scores >= thresholds.to(scores.dtype).view(1, -1)
    truth = targets > 0.5
    return torch.stack([(predicted & truth).sum(0), (predicted & ~truth).sum(0), (~predicted & truth).sum(0)], 1)


def f1_figures(counts: torch.Tensor) -> dict:
    """Precision, recall and F1 per class (lists; 0 where a quotient is 0/0) and their macro and micro
    averages, from `multilabel_counts`."""
    def prf(tp, fp, fn):
        precision = tp / (tp + fp).clamp_min(1)
        recall = tp / (tp + fn).clamp_min(1)
        return precision, recall, 2 * tp / (2 * tp + fp + fn).clamp_min(1)

    c = counts.double()
    per = prf(c[:, 0], c[:, 1], c[:, 2])
    micro = prf(*c.sum(0))
    names = ("precision", "recall", "f1")
    return {**{name: v.tolist() for name, v in zip(names, per, strict=True)},
            **{f"macro_{name}": float(v.mean()) for name, v in zip(names, per, strict=True)},
            **{f"micro_{name}": float(v) for name, v in zip(names, micro, strict=True)}}


# ---------------------------------------------------------------- calibration (single-label)

ECE_BINS = 15


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict[str, list]:
    """The reliability diagram's numbers of (N, classes) probabilities against class indices: the top
    probability (confidence) cut into `bins` equal-width bins of (0, 1] (a bin holds lo < p <= hi), and for
    each bin its "count", mean "confidence" and "accuracy" (0 for an empty bin), and its "edges" (bins + 1)."""
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == labels.to(predicted.device)).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.bincount(index, weights=confidence, minlength=bins)
    hit_sum = torch.bincount(index, weights=correct, minlength=bins)
    safe = count.clamp_min(1)
    return {"edges": edges.tolist(), "count": count.long().tolist(), "confidence": (conf_sum / safe).tolist(),
            "accuracy": (hit_sum / safe).tolist()}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the mean over pictures of |accuracy - confidence| of their confidence bin
    (`reliability_bins`, `bins` equal-width bins), i.e. sum over bins of count / N * |accuracy - confidence|.
    0 for no pictures."""
    if len(probs) == 0:
        return 0.0
    b = reliability_bins(probs, labels, bins)
    n = sum(b["count"])
    return sum(c / n * abs(a - p) for c, a, p in zip(b["count"], b["accuracy"], b["confidence"], strict=True))


def precision_threshold(probs: torch.Tensor, labels: torch.Tensor, target: float) -> tuple[float, float] | None:
    """The lowest cut P on the top probability such that the pictures whose top probability is at least P
    are classified right at a precision of at least `target`, with the share of pictures kept: (P, coverage).
    None when no cut reaches `target` (not even the most confident picture alone)."""
    confidence, predicted = probs.double().max(dim=1)
    order = confidence.argsort(descending=True, stable=True)
    conf, correct = confidence[order], (predicted == labels)[order].double()
    precision = correct.cumsum(0) / torch.arange(1, len(conf) + 1, dtype=torch.float64)
    last = torch.ones_like(conf, dtype=torch.bool)
    last[:-1] = conf[1:] != conf[:-1]  # tied pictures are kept or rejected together
    ok = torch.nonzero(last & (precision >= target)).flatten()
    if len(ok) == 0:
        return None
    i = int(ok[-1])
    return float(conf[i]), (i + 1) / len(conf)
