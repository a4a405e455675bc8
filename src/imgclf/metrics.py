"""Pure functions for classification metrics."""

from __future__ import annotations

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
