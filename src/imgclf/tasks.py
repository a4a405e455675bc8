"""The task seam (issue 21, point 2): what a network's outputs mean.

A task owns everything that depends on the kind of labelling: the training loss, the output activation,
decoding probabilities into labels, the metrics (summed over batches, all-reduced under torchrun, written to
metrics.jsonl), which --monitor figures exist and which way is better, and how `imgclf eval` shows its figures.
The training loop, the one evaluation loop (imgclf.engine.evaluate_outputs), predict, export and the run's
report ask the task instead of assuming softmax and argmax.

`SingleLabel` (one class per picture: softmax, cross-entropy, argmax, accuracy and a confusion matrix) is the
first task and the default, so checkpoints without a "task" entry load as before. A new task is a class with
the `Task` protocol's members, added to TASKS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import nn

from imgclf.config import MONITORS
from imgclf.distributed import DistInfo, all_reduce_sum
from imgclf.errors import UserError
from imgclf.metrics import accuracy, confusion_matrix, improved, per_class_accuracy, summary

DEFAULT = "single-label"


class Tally(Protocol):
    """A task's running sums over the batches of one evaluation."""

    def add(self, outputs: torch.Tensor, targets: torch.Tensor, *, probabilities: bool = False) -> None:
        """Add one batch: `outputs` are logits, or with `probabilities` the task's activation of them."""

    def result(self, dist: DistInfo) -> dict:
        """The figures over every batch of every process of `dist` (a collective call under torchrun): at
        least "loss" (mean per picture) and "count"; "probs" (and "predicted") when asked to keep them."""


class Task(Protocol):
    """What a kind of labelling means to training, evaluation and prediction."""

    name: str
    classes: list[str]
    monitors: Mapping[str, bool]  # the figures --monitor may watch -> larger is better (from config.MONITORS)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss, mean over the batch; `targets` as the loader gives them (soft under mixup)."""

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes) -> what predict and the exported graphs return (N, classes)."""

    def decode(self, probs: torch.Tensor, k: int) -> list[tuple[int, float]]:
        """One picture's activation (classes,) -> its labels as (class index, score), best first; `k` bounds
        how many."""

    def tally(self, device: torch.device, *, keep: bool = False) -> Tally:
        """Empty sums on `device`; with `keep`, the per-picture activations are kept too."""

    def figures(self, result: dict) -> dict:
        """A Tally result as metrics.jsonl keys (without the val_ / test_ prefix)."""

    def summary(self, result: dict) -> dict:
        """An evaluation result (with "split" and "classes") as `imgclf eval --json` prints it."""

    def table(self, summary: dict) -> str:
        """`summary` as `imgclf eval` prints it without --json."""

    def per_class(self, result: dict) -> tuple[str, list[float]]:
        """(name, one figure per class) for the run's report and TensorBoard."""

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """How many pictures of a training batch the logits got right (a 0-d tensor on their device): the
        training accuracy's numerator; `targets` as the loader gives them (soft under mixup)."""

    def improved(self, value: float, best: float | None, monitor: str) -> bool:
        """Whether `value` of figure `monitor` beats `best` (None: nothing yet); never a NaN or infinity."""


class SingleLabel:
    """One class per picture: softmax outputs, cross-entropy (label smoothing, class weights, soft targets
    from mixup / CutMix), the most probable classes, accuracy, top-5, precision / recall / F1 and the
    confusion matrix."""

    name = "single-label"
    monitors: Mapping[str, bool] = {figure: MONITORS[figure] for figure in ("val_acc", "val_loss", "val_macro_f1")}

    def __init__(self, classes: Sequence[str], *, label_smoothing: float = 0.0,
                 class_weights: torch.Tensor | None = None):
        self.classes = list(classes)
        self.class_weights = class_weights  # the divisor of the loss's mean (engine.loss_shares)
        self._criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._criterion(logits, targets)

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(1)

    def decode(self, probs: torch.Tensor, k: int) -> list[tuple[int, float]]:
        p, idx = probs.topk(max(1, min(k, len(self.classes))))
        return list(zip(idx.tolist(), p.tolist(), strict=True))

    def tally(self, device: torch.device, *, keep: bool = False) -> ConfusionTally:
        return ConfusionTally(len(self.classes), device, keep=keep)

    def figures(self, result: dict) -> dict:
        out = {"loss": result["loss"], "acc": result["acc"], "count": result["count"]}
        if "top5" in result:
            out["top5"] = result["top5"]
        out.update(summary(result["confusion"], self.classes))
        return out

    def summary(self, result: dict) -> dict:
        confusion, classes = result["confusion"], self.classes
        return {"split": result["split"], "count": result["count"], "loss": result["loss"], "accuracy": result["acc"],
                **({"top5": result["top5"]} if "top5" in result else {}), "classes": classes,
                "per_class_accuracy": dict(zip(classes, per_class_accuracy(confusion), strict=True)),
                **summary(confusion, classes), "confusion": confusion.tolist()}

    def table(self, summary: dict) -> str:
        return confusion_table(summary)

    def per_class(self, result: dict) -> tuple[str, list[float]]:
        return "accuracy", per_class_accuracy(result["confusion"])

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return argmax_hits(logits, targets)

    def improved(self, value: float, best: float | None, monitor: str) -> bool:
        return improved(value, best, larger_is_better=self.monitors[monitor])


def argmax_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pictures whose most probable class is their class; under mixup / CutMix (soft targets) the class with
    the larger share."""
    return (logits.argmax(1) == (targets if targets.ndim == 1 else targets.argmax(1))).sum()


class ConfusionTally:
    """SingleLabel's sums: loss, confusion matrix and top-5 hits (over five classes), on the device."""

    def __init__(self, num_classes: int, device: torch.device, *, keep: bool = False):
        self.k = num_classes
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.top5 = torch.zeros((), dtype=torch.int64, device=device)
        self.probs: list[torch.Tensor] | None = [] if keep else None
        self.predicted: list[torch.Tensor] = []

    def add(self, outputs: torch.Tensor, targets: torch.Tensor, *, probabilities: bool = False) -> None:
        # from probabilities (an exported graph's output) the loss is the same cross-entropy, through their log
        loss = (nn.functional.nll_loss(outputs.clamp_min(1e-12).log(), targets, reduction="sum") if probabilities
                else nn.functional.cross_entropy(outputs, targets, reduction="sum"))
        self.loss_sum += loss.double()
        predicted = outputs.argmax(1)
        self.confusion += confusion_matrix(predicted, targets, self.k)
        if self.k > 5:
            self.top5 += (outputs.topk(5, dim=1).indices == targets.view(-1, 1)).any(1).sum()
        if self.probs is not None:
            self.probs.append((outputs if probabilities else outputs.softmax(1)).cpu())
            self.predicted.append(predicted.cpu())

    def result(self, dist: DistInfo) -> dict:
        for total in (self.loss_sum, self.confusion, self.top5):
            all_reduce_sum(total, dist)
        confusion = self.confusion.cpu()
        count = int(confusion.sum())
        out = {"loss": float(self.loss_sum) / max(count, 1), "acc": accuracy(confusion), "count": count,
               "confusion": confusion}
        if self.k > 5:
            out["top5"] = int(self.top5) / max(count, 1)
        if self.probs is not None:
            out["probs"] = torch.cat(self.probs) if self.probs else torch.zeros(0, self.k)
            out["predicted"] = torch.cat(self.predicted) if self.predicted else torch.zeros(0, dtype=torch.int64)
        return out


def confusion_table(s: dict) -> str:
    """`imgclf eval`'s text for a SingleLabel summary: the headline, a per-class table and the confusion matrix."""
    classes, confusion = s["classes"], s["confusion"]
    top5 = f"  top-5 {s['top5']:.2%}" if "top5" in s else ""
    lines = [f"{s['split']}: {s['count']} pictures  loss {s['loss']:.4f}  accuracy {s['accuracy']:.2%}{top5}  "
             f"macro F1 {s['macro_f1']:.4f}\n"]
    width = max(8, *(len(c) for c in classes))
    lines.append(f"{'class':<{width}}  {'accuracy':>8}  {'precision':>9}  {'recall':>6}  {'F1':>6}  {'count':>6}")
    for name, row in zip(classes, confusion, strict=True):
        f = s["per_class"][name]
        lines.append(f"{name:<{width}}  {s['per_class_accuracy'][name]:>8.2%}  {f['precision']:>9.3f}  "
                     f"{f['recall']:>6.3f}  {f['f1']:>6.3f}  {sum(row):>6}")
    lines.append(f"{'macro':<{width}}  {'':>8}  {s['macro_precision']:>9.3f}  {s['macro_recall']:>6.3f}  "
                 f"{s['macro_f1']:>6.3f}  {s['count']:>6}")
    lines.append("\nconfusion matrix (rows: true class, columns: predicted)")
    cell = max(5, len(str(max(max(row) for row in confusion))) + 1)
    labels = [f"{i} {name}" for i, name in enumerate(classes)]
    label_width = max(len(label) for label in labels)
    lines.append(" " * label_width + "".join(f"{i:>{cell}}" for i in range(len(classes))))
    lines += [f"{label:<{label_width}}" + "".join(f"{v:>{cell}}" for v in row)
              for label, row in zip(labels, confusion, strict=True)]
    return "\n".join(lines)


TASKS: dict[str, type] = {SingleLabel.name: SingleLabel}


def make_task(name: str, classes: Sequence[str], **training) -> Task:
    """The task called `name` for `classes`; `training`: its loss options (label_smoothing, class_weights)."""
    if not isinstance(name, str) or name not in TASKS:
        raise UserError(f"unknown task {name!r}; imgclf knows {', '.join(TASKS)}")
    return TASKS[name](classes, **training)


def checkpoint_task(ckpt: dict) -> Task:
    """The task a checkpoint was trained for (single-label for checkpoints that name none)."""
    return make_task(ckpt.get("task", DEFAULT), ckpt["classes"])


def training_task(cfg, data, device: torch.device) -> Task:
    """The task of training run `cfg` (a TrainConfig) on `data` (an ImageData): its loss with
    --label-smoothing and, under --balance loss, each class weighted by N / (K * its count)."""
    from imgclf.optim import balancing_weights  # the sampler's weights too (--balance sample)

    weights = None
    if cfg.data.balance == "loss":
        weights = balancing_weights(data.train.labels, len(data.classes)).to(device)
    return make_task(DEFAULT, data.classes, label_smoothing=cfg.optim.label_smoothing, class_weights=weights)
