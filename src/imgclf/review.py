"""Label-error review (issue 25, point 3): which pictures are probably labelled wrong.

Confident learning (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset
Labels", JAIR 70, 2021) on out-of-sample probabilities: `label_issues` is its off-diagonal rule of the
confident joint, written as pure functions here (cleanlab would be a heavy dependency for sixty lines).

Where the probabilities come from is the review's mode, and the output says which:
- "cross-fitted" (`--folds K`): the training split is cut into K folds (stratified, seeded); K models are
  trained with the run's configuration on K-1 folds (the run's held-out split still validates them) and each
  predicts the fold it never saw. Every training picture is scored out of sample; it costs K trainings.
- "checkpoint" (the default): the run's own checkpoint scores its held-out split (out of sample) and its
  training split, whose pictures it was trained on: in-sample probabilities, over-confident in the given
  labels, so mislabels it memorised rank lower than they should. Each split gets its own thresholds.
"""

from __future__ import annotations

import contextlib
import csv
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from imgclf.cache import Split
from imgclf.config import DataConfig
from imgclf.embed import Network, embed_data, load_for, open_network, run_split
from imgclf.errors import UserError, shown
from imgclf.files import atomic_write
from imgclf.pipeline import eval_batch_size

CROSS_FITTED, CHECKPOINT = "cross-fitted", "checkpoint"


# ---------------------------------------------------------------- confident learning (pure)

def class_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """t_j, the mean probability of class j over the pictures labelled j (its average self-confidence);
    a class nobody is labelled gets 1 (no picture counts as confidently of it)."""
    classes = probs.shape[1]
    sums = np.bincount(labels, weights=probs[np.arange(len(labels)), labels], minlength=classes)
    counts = np.bincount(labels, minlength=classes)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)


def confident_class(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per picture, among the classes whose probability reaches their threshold, the most probable one;
    -1 where no class does (the picture falls in no cell of the confident joint)."""
    above = probs >= thresholds[None, :]
    masked = np.where(above, probs, -1.0)
    return np.where(above.any(axis=1), masked.argmax(axis=1), -1)


@dataclass(frozen=True)
class Issues:
    """`label_issues`' answer, per picture: `flagged` (a likely mislabel), `suggested` (its confident
    class, else the most probable one), `score` (the probability of its given label: lower is worse) and
    the class `thresholds`; `order` ranks every picture, flagged ones first, each group by score ascending."""

    flagged: np.ndarray
    suggested: np.ndarray
    score: np.ndarray
    thresholds: np.ndarray
    order: np.ndarray


def label_issues(probs: np.ndarray, labels: np.ndarray) -> Issues:
    """Confident learning's off-diagonal rule: a picture labelled i is flagged when some other class j has
    p(j) >= t_j and is, among such classes, the most probable (it lands in cell (i, j), j != i, of the
    confident joint); then its given-label probability is below that of j. `probs`: (N, classes)
    out-of-sample probabilities; `labels`: (N,) given class indices."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    thresholds = class_thresholds(probs, labels)
    confident = confident_class(probs, thresholds)
    flagged = (confident >= 0) & (confident != labels)
    suggested = np.where(confident >= 0, confident, probs.argmax(axis=1))
    score = probs[np.arange(len(labels)), labels]
    order = np.lexsort((np.arange(len(labels)), score, ~flagged))  # last key sorts first: flagged, then score
    return Issues(flagged, suggested, score, thresholds, order)


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """A fold number in [0, folds) per picture: each class's pictures shuffled (seeded) and dealt in turn."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        out[rows] = np.arange(len(rows)) % folds
    return out


def grouped_issues(probs: np.ndarray, labels: np.ndarray, groups: list[np.ndarray]) -> Issues:
    """`label_issues` of each group of rows (the groups cover every row once) with its own thresholds, put
    together: `thresholds` (groups, classes), `order` over all rows as `label_issues` ranks them."""
    n = len(labels)
    flagged, suggested, score = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64), np.zeros(n)
    thresholds = []
    for rows in groups:
        part = label_issues(probs[rows], labels[rows])
        flagged[rows], suggested[rows], score[rows] = part.flagged, part.suggested, part.score
        thresholds.append(part.thresholds)
    order = np.lexsort((np.arange(n), score, ~flagged))
    return Issues(flagged, suggested, score, np.stack(thresholds), order)


# ---------------------------------------------------------------- where the probabilities come from

@dataclass
class Review:
    """A reviewed data set: `emb` (imgclf.embed.Embedded: rows, labels, probabilities, pictures), `mode`
    (CROSS_FITTED or CHECKPOINT), `sample` per row ("out-of-sample" or "in-sample") and the `issues`."""

    emb: object
    mode: str
    sample: list[str]
    issues: Issues


def review_checkpoint(net: Network, data_cfg: DataConfig) -> Review:
    """The checkpoint's probabilities of the training split (in sample) and the held-out split (out of
    sample), each split reviewed with its own thresholds."""
    emb = embed_data(net, data_cfg, splits=("train", "val"))
    train = emb.rows("train")
    held = np.setdiff1d(np.arange(len(emb.labels)), train)
    sample = ["in-sample" if s == "train" else "out-of-sample" for s in emb.splits]
    return Review(emb, CHECKPOINT, sample, grouped_issues(emb.probs, emb.labels, [train, held]))


def review_folds(net: Network, config, data_cfg: DataConfig, *, folds: int, work: Path, epochs: int | None = None,
                 seed: int = 0) -> Review:
    """Cross-fitted probabilities of every training picture: `folds` models trained as `config` (the run's
    TrainConfig; `epochs` overrides its length) on the other folds, written under `work`/fold-K (a folder
    that must not exist yet), each predicting its own fold; the run's held-out split validates each of them."""
    data = load_for(net, data_cfg)
    if data.train.files is None or data.val.files is None:
        raise UserError(f"--folds trains on subsets of the pictures' files: give a folder data set, not the "
                        f"built-in {data_cfg.data} (or review without --folds)")
    labels = np.asarray(data.train.labels, dtype=np.int64)
    if np.bincount(labels).min() < folds:
        raise UserError(f"--folds {folds}: some class has fewer than {folds} training pictures")
    if work.exists():  # its models were trained on the pictures and labels of then: never reused unseen
        raise UserError(f"{shown(work)} holds the fold models of an earlier review; remove it, or give another --out")
    fold = stratified_folds(labels, folds, seed)
    probs = np.zeros((len(labels), len(data.classes)), dtype=np.float32)
    for k in range(folds):
        checkpoint = _train_fold(config, data, fold != k, work / f"fold-{k}", epochs=epochs)
        fold_net = open_network(checkpoint, device=str(net.device))
        rows = np.flatnonzero(fold == k)
        held = Split(np.asarray(data.train.images)[rows], data.train.labels[rows])
        probs[rows] = run_split(fold_net, held, eval_batch_size(data_cfg, held))[1]
    from imgclf.embed import Embedded

    emb = Embedded(np.zeros((len(labels), 0), dtype=np.float32), probs, [str(f) for f in data.train.files],
                   ["train"] * len(labels), labels, list(data.classes), [("train", data.train)])
    return Review(emb, CROSS_FITTED, ["out-of-sample"] * len(labels), label_issues(probs, labels))


def _train_fold(config, data, keep: np.ndarray, folder: Path, *, epochs: int | None) -> Path:
    """Train one fold's model on the training pictures where `keep` is set (links under folder/data/train,
    the held-out split's under folder/data/val) into folder/run; its best checkpoint."""
    from imgclf.train import train  # the training stack only for cross-fitting

    root = folder / "data"
    for role, files, labels in (("train", [f for f, k in zip(data.train.files, keep, strict=True) if k],
                                 data.train.labels[keep]), ("val", data.val.files, data.val.labels)):
        for i, (file, label) in enumerate(zip(files, labels.tolist(), strict=True)):
            link = root / role / data.classes[label] / f"{i:06d}{Path(file).suffix.lower()}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(file).resolve())
    run = folder / "run"
    cfg = replace(config, data=replace(config.data, data=str(root), labels=None),
                  optim=replace(config.optim, epochs=epochs or config.optim.epochs),
                  run=replace(config.run, out=str(run), stop_after=None, mlflow=None))
    with contextlib.redirect_stdout(sys.stderr):  # the fold's progress beside the review's notes, not in its table
        train(cfg)
    return run / "checkpoints" / "best.pt"


# ---------------------------------------------------------------- output

def write_review(review: Review, out, *, grid: int = 48) -> tuple[Path, Path | None]:
    """OUT/mislabels.csv (path, split, given, suggested, score = the given label's probability,
    suggested_probability, sample; the flagged pictures, worst first) and OUT/mislabels.png (the first `grid`
    of them, each titled given -> suggested; none when nothing is flagged)."""
    emb, issues, out = review.emb, review.issues, Path(out)
    rows = [int(i) for i in issues.order if issues.flagged[i]]
    table = out / "mislabels.csv"

    def write_csv(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "split", "given", "suggested", "score", "suggested_probability", "sample"])
            for i in rows:
                given, suggested = emb.classes[emb.labels[i]], emb.classes[issues.suggested[i]]
                writer.writerow([emb.paths[i], emb.splits[i], given, suggested, f"{issues.score[i]:.4f}",
                                 f"{emb.probs[i, issues.suggested[i]]:.4f}", review.sample[i]])

    atomic_write(table, write_csv)
    if not rows:
        return table, None
    from imgclf.visualize import image_grid, save_png  # matplotlib only when a grid is drawn

    shown_rows = rows[:grid]
    labels = [f"{emb.classes[emb.labels[i]]} -> {emb.classes[issues.suggested[i]]}\n{issues.score[i]:.2f} "
              f"{Path(emb.paths[i]).name}" for i in shown_rows]
    fig = image_grid([emb.picture(i) for i in shown_rows], labels, ncols=8, lines=2,
                     title=f"likely mislabels, worst first: given -> suggested, given label's probability "
                           f"({review.mode})")
    return table, save_png(fig, out / "mislabels.png")


def review_output(review: Review, written: tuple[Path, Path | None], *, shown_rows: int = 20) -> tuple[str, str]:
    """`imgclf review`'s table (the first `shown_rows` flagged pictures), its mode in words, and what was
    written."""
    emb, issues = review.emb, review.issues
    rows = [int(i) for i in issues.order if issues.flagged[i]]
    if review.mode == CROSS_FITTED:
        note = "probabilities: cross-fitted (every training picture scored by a model that never saw it)"
    else:
        note = ("probabilities: the checkpoint's own; its held-out pictures are scored out of sample, its "
                "training pictures in sample (it was trained on them: memorised mislabels rank low; --folds K "
                "scores them out of sample)")
    counts = {}
    for i in rows:
        counts[emb.splits[i]] = counts.get(emb.splits[i], 0) + 1
    per_split = ", ".join(f"{n} of {emb.splits.count(s)} {s}" for s, n in counts.items()) or "none"
    lines = [f"likely mislabels (confident learning, {review.mode} probabilities): {len(rows)} ({per_split})"]
    if rows:
        lines.append("score  given  suggested  split  path")
        for i in rows[:shown_rows]:
            lines.append(f"{issues.score[i]:.3f}  {shown(emb.classes[emb.labels[i]])}  "
                         f"{shown(emb.classes[issues.suggested[i]])}  {emb.splits[i]}  {shown(emb.paths[i])}")
        if len(rows) > shown_rows:
            lines.append(f"... {len(rows) - shown_rows} more in the CSV")
    table, grid = written
    lines.append(f"wrote {shown(table)}" + (f" and {shown(grid)}" if grid else ""))
    return "\n".join(lines) + "\n", f"imgclf: {note}\n"
