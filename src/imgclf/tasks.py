"""The task seam (issue 21, point 2): what a network's outputs mean.

A task owns everything that depends on the kind of labelling: the training loss, the output activation,
decoding probabilities into labels, the metrics (summed over batches, all-reduced under torchrun, written to
metrics.jsonl), which --monitor figures exist and which way is better, and how `imgclf eval` shows its figures.
The training loop, the one evaluation loop (imgclf.engine.evaluate_outputs), predict, export and the run's
report ask the task instead of assuming softmax and argmax.

`SingleLabel` (one class per picture: softmax, cross-entropy, argmax, accuracy and a confusion matrix) is the
first task and the default, so checkpoints without a "task" entry load as before. `MultiLabel` (any number of
classes per picture, none included: sigmoid, binary cross-entropy, every class over its threshold, average
precision) is the second. A new task is a class with the `Task` protocol's members, added to TASKS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import nn

from imgclf.calibration import stored_temperature
from imgclf.config import MONITORS
from imgclf.distributed import DistInfo, all_reduce_sum
from imgclf.errors import UserError
from imgclf.metrics import (
    accuracy,
    average_precision,
    best_f1_threshold,
    confusion_matrix,
    f1_figures,
    improved,
    multilabel_counts,
    per_class_accuracy,
    summary,
)

DEFAULT = "single-label"
MULTILABEL = "multilabel"


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

    def checkpoint_entries(self, record: dict) -> dict:
        """What a checkpoint (and every export of it) stores about the task, beside its classes, from the
        last evaluated epoch's metrics.jsonl `record` ({} for SingleLabel: its checkpoints stay as they were)."""


class SingleLabel:
    """One class per picture: softmax outputs, cross-entropy (label smoothing, class weights, soft targets
    from mixup / CutMix), the most probable classes, accuracy, top-5, precision / recall / F1 and the
    confusion matrix."""

    name = "single-label"
    monitors: Mapping[str, bool] = {figure: MONITORS[figure] for figure in ("val_acc", "val_loss", "val_macro_f1")}

    def __init__(self, classes: Sequence[str], *, label_smoothing: float = 0.0,
                 class_weights: torch.Tensor | None = None, temperature: float = 1.0):
        self.classes = list(classes)
        self.class_weights = class_weights  # the divisor of the loss's mean (engine.loss_shares)
        self._criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)
        # a checkpoint's fitted temperature (imgclf.calibration): `activation` divides the logits by it; the
        # loss and every figure of the logits stay as trained
        self.temperature = float(temperature)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._criterion(logits, targets)

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits / temperature): the calibrated probabilities (plain softmax at temperature 1)."""
        return (logits if self.temperature == 1.0 else logits / self.temperature).softmax(1)

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

    def checkpoint_entries(self, record: dict) -> dict:
        return {}


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


class MultiLabel:
    """Any number of classes per picture, none included: one sigmoid per class, binary cross-entropy (label
    smoothing pulls each 0/1 target towards 1/2), every class whose probability reaches its threshold, and
    per-class and macro / micro average precision, precision, recall and F1.

    `thresholds` (one per class, e.g. a checkpoint's): the figures are at them. Without them (training), each
    evaluation chooses the thresholds that maximise each class's F1 on the pictures it sees, reports its
    figures at those (optimistic on the split that chose them), and returns them as "thresholds": the
    checkpoint keeps the validation split's, and `imgclf eval` of another split is honest. Training
    accuracy (and "acc") is exact match: every class of the picture decided right (at 0.5 in training)."""

    name = MULTILABEL
    monitors: Mapping[str, bool] = {figure: MONITORS[figure] for figure in ("val_map", "val_loss", "val_macro_f1",
                                                                             "val_acc")}

    def __init__(self, classes: Sequence[str], *, label_smoothing: float = 0.0,
                 thresholds: Sequence[float] | None = None):
        self.classes = list(classes)
        self.label_smoothing = label_smoothing
        self.thresholds = None if thresholds is None else torch.tensor(list(thresholds), dtype=torch.float64)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = targets.to(logits.dtype)
        if self.label_smoothing:
            t = t * (1 - self.label_smoothing) + self.label_smoothing / 2
        return nn.functional.binary_cross_entropy_with_logits(logits, t)

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()

    def decode(self, probs: torch.Tensor, k: int) -> list[tuple[int, float]]:
        """Every class whose probability reaches its threshold (0.5 without thresholds), most probable first;
        `k` is ignored: a picture has as many labels as it has (and may have none)."""
        cut = self.thresholds if self.thresholds is not None else torch.full((len(self.classes),), 0.5)
        over = (probs.double() >= cut).nonzero().flatten().tolist()
        return sorted(((i, float(probs[i])) for i in over), key=lambda item: -item[1])

    def tally(self, device: torch.device, *, keep: bool = False) -> MultiLabelTally:
        return MultiLabelTally(len(self.classes), self.thresholds, keep=keep)

    def figures(self, result: dict) -> dict:
        keys = ("loss", "acc", "count", "map", "micro_ap", "macro_f1", "micro_f1", "macro_precision",
                "macro_recall", "micro_precision", "micro_recall", "thresholds")
        return {**{key: result[key] for key in keys}, "per_class": _per_class(result, self.classes)}

    def summary(self, result: dict) -> dict:
        out = {"split": result["split"], "task": self.name, **self.figures(result), "classes": self.classes,
               "thresholds_from": "this split" if self.thresholds is None else "the checkpoint"}
        out["exact_match"] = out.pop("acc")
        return out

    def table(self, summary: dict) -> str:
        return multilabel_table(summary)

    def per_class(self, result: dict) -> tuple[str, list[float]]:
        return "average precision", [0.0 if ap is None else ap for ap in result["ap"]]

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((logits > 0) == (targets > 0.5)).all(1).sum()

    def improved(self, value: float, best: float | None, monitor: str) -> bool:
        return improved(value, best, larger_is_better=self.monitors[monitor])

    def checkpoint_entries(self, record: dict) -> dict:
        thresholds = record.get("val_thresholds")
        return {"task": self.name, **({"thresholds": list(thresholds)} if thresholds else {})}


def _per_class(result: dict, classes: list[str]) -> dict:
    return {name: {"ap": result["ap"][i], "precision": result["precision"][i], "recall": result["recall"][i],
                   "f1": result["f1"][i], "threshold": result["thresholds"][i]} for i, name in enumerate(classes)}


class MultiLabelTally:
    """MultiLabel's sums: the loss on the device, and every picture's probabilities and targets (on the CPU:
    average precision ranks them all). Under torchrun the processes' pictures are gathered."""

    def __init__(self, num_classes: int, thresholds: torch.Tensor | None, *, keep: bool = False):
        self.k, self.thresholds, self.keep = num_classes, thresholds, keep
        self.loss_sum = 0.0
        self.probs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def add(self, outputs: torch.Tensor, targets: torch.Tensor, *, probabilities: bool = False) -> None:
        t = targets.float()
        if probabilities:  # an exported graph's sigmoid: the same loss through the log of the probabilities
            p = outputs.float().clamp(1e-12, 1 - 1e-12)
            loss = nn.functional.binary_cross_entropy(p, t, reduction="sum")
        else:
            p = outputs.float().sigmoid()
            loss = nn.functional.binary_cross_entropy_with_logits(outputs.float(), t, reduction="sum")
        self.loss_sum += float(loss) / self.k  # mean over classes, summed over pictures
        self.probs.append(p.detach().cpu())
        self.targets.append(targets.detach().cpu().to(torch.uint8))

    def result(self, dist: DistInfo) -> dict:
        probs = torch.cat(self.probs) if self.probs else torch.zeros(0, self.k)
        targets = torch.cat(self.targets) if self.targets else torch.zeros(0, self.k, dtype=torch.uint8)
        loss_sum = self.loss_sum
        if dist.enabled:
            probs, targets, loss_sum = _gathered(probs, targets, loss_sum)
        return {**multilabel_result(probs, targets, self.thresholds), "loss": loss_sum / max(len(probs), 1),
                **({"probs": probs, "targets": targets} if self.keep else {})}


def _gathered(probs: torch.Tensor, targets: torch.Tensor, loss_sum: float):
    """Every process's pictures and loss, in every process (under torchrun)."""
    import torch.distributed as td

    parts: list = [None] * td.get_world_size()
    td.all_gather_object(parts, (probs, targets, loss_sum))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), sum(p[2] for p in parts)


def multilabel_result(probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor | None) -> dict:
    """MultiLabel's figures of (N, classes) probabilities against 0/1 targets: "count", per-class "ap" (None
    for a class without positives, left out of "map"), "map", "micro_ap", exact-match "acc", the figures
    of metrics.f1_figures at `thresholds`, which are the F1-maximising ones of these pictures when None, and
    "thresholds" (those used)."""
    if thresholds is None:
        thresholds = torch.tensor([best_f1_threshold(probs[:, c], targets[:, c]) for c in range(probs.shape[1])],
                                  dtype=torch.float64)
    aps = [average_precision(probs[:, c], targets[:, c]) for c in range(probs.shape[1])]
    defined = [ap for ap in aps if ap is not None]
    predicted = probs.double() >= thresholds.view(1, -1)
    exact = int((predicted == (targets > 0)).all(1).sum()) if len(probs) else 0
    return {"count": len(probs), "ap": aps, "map": sum(defined) / len(defined) if defined else 0.0,
            "micro_ap": average_precision(probs.flatten(), targets.flatten()) or 0.0,
            "acc": exact / max(len(probs), 1), **f1_figures(multilabel_counts(probs, targets, thresholds)),
            "thresholds": thresholds.tolist()}


def multilabel_table(s: dict) -> str:
    """`imgclf eval`'s text for a MultiLabel summary: the headline and a per-class table."""
    classes = s["classes"]
    lines = [f"{s['split']}: {s['count']} pictures  loss {s['loss']:.4f}  mAP {s['map']:.4f}  micro AP "
             f"{s['micro_ap']:.4f}  macro F1 {s['macro_f1']:.4f}  micro F1 {s['micro_f1']:.4f}  exact match "
             f"{s['exact_match']:.2%}  (thresholds from {s['thresholds_from']})\n"]
    width = max(8, *(len(c) for c in classes))
    lines.append(f"{'class':<{width}}  {'AP':>6}  {'threshold':>9}  {'precision':>9}  {'recall':>6}  {'F1':>6}")
    for name in classes:
        f = s["per_class"][name]
        ap = "-" if f["ap"] is None else f"{f['ap']:.3f}"
        lines.append(f"{name:<{width}}  {ap:>6}  {f['threshold']:>9.3f}  {f['precision']:>9.3f}  "
                     f"{f['recall']:>6.3f}  {f['f1']:>6.3f}")
    lines.append(f"{'macro':<{width}}  {s['map']:>6.3f}  {'':>9}  {s['macro_precision']:>9.3f}  "
                 f"{s['macro_recall']:>6.3f}  {s['macro_f1']:>6.3f}")
    lines.append(f"{'micro':<{width}}  {s['micro_ap']:>6.3f}  {'':>9}  {s['micro_precision']:>9.3f}  "
                 f"{s['micro_recall']:>6.3f}  {s['micro_f1']:>6.3f}")
    return "\n".join(lines)


TASKS: dict[str, type] = {SingleLabel.name: SingleLabel, MultiLabel.name: MultiLabel}


def make_task(name: str, classes: Sequence[str], **training) -> Task:
    """The task called `name` for `classes`; `training`: its options (label_smoothing, class_weights for
    SingleLabel; label_smoothing, thresholds for MultiLabel)."""
    if not isinstance(name, str) or name not in TASKS:
        raise UserError(f"unknown task {name!r}; imgclf knows {', '.join(TASKS)}")
    return TASKS[name](classes, **training)


def stored_task(entries: dict, classes: list[str], where: str = "the checkpoint") -> Task:
    """The task a checkpoint's (or an export's metadata's) "task" and "thresholds" (multi-label) or
    "temperature" (single-label, imgclf.calibration) entries describe; one UserError line when they are
    damaged. Single-label for a document that names none."""
    name = entries.get("task", DEFAULT)
    if name != MULTILABEL:
        return make_task(name, classes, **({"temperature": stored_temperature(entries, where)}
                                           if name == DEFAULT else {}))
    thresholds = entries.get("thresholds")
    if thresholds is not None and not (isinstance(thresholds, list) and len(thresholds) == len(classes) and all(
            isinstance(t, float | int) and not isinstance(t, bool) and 0 <= t <= 1 for t in thresholds)):
        raise UserError(f"{where}'s thresholds are damaged: not {len(classes)} numbers in [0, 1]")
    return make_task(name, classes, thresholds=thresholds if thresholds is not None else [0.5] * len(classes))


def checkpoint_task(ckpt: dict) -> Task:
    """The task a checkpoint was trained for (single-label for checkpoints that name none), with the
    thresholds it stores."""
    return stored_task(ckpt, ckpt["classes"])


def training_task(cfg, data, device: torch.device) -> Task:
    """The task of training run `cfg` (a TrainConfig) on `data` (an ImageData, whose `task` says which):
    its loss with --label-smoothing and, single-label under --balance loss, each class weighted by
    N / (K * its count)."""
    from imgclf.optim import balancing_weights  # the sampler's weights too (--balance sample)

    refuse_misfits(cfg, data)
    if data.task == MULTILABEL:
        return make_task(MULTILABEL, data.classes, label_smoothing=cfg.optim.label_smoothing)
    weights = None
    if cfg.data.balance == "loss":
        weights = balancing_weights(data.train.labels, len(data.classes)).to(device)
    return make_task(DEFAULT, data.classes, label_smoothing=cfg.optim.label_smoothing, class_weights=weights)


def refuse_misfits(cfg, data) -> None:
    """One UserError line for an option of training run `cfg` that `data.task` cannot honour: a --monitor
    figure the task does not have; under multilabel, mixup / CutMix (torchvision's mixing takes one class
    per picture) and --balance (a picture has no single class to weigh)."""
    name = data.task
    monitors = TASKS[name].monitors
    if cfg.optim.monitor not in monitors:
        raise UserError(f"--monitor {cfg.optim.monitor} is not a figure of {name} training; choose one of "
                        f"{', '.join(monitors)}")
    if name != MULTILABEL:
        return
    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        raise UserError("--mixup and --cutmix take one class per picture; multi-label training runs without them")
    if cfg.data.balance != "none":
        raise UserError(f"--balance {cfg.data.balance} weighs pictures by their class, and a multi-label picture "
                        f"has any number; multi-label training runs without it")
