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
