"""k-fold cross-validation's folds (issue 23): which pictures each fold holds out. Pure; no torch, no files.

With --folds K the training pictures are one pool: a folder's train/ and val/ (or all of a single folder of
class folders, which --val-fraction would otherwise cut), a built-in data set's training split. `fold_indices`
cuts the pool into K parts, stratified by class; fold I (--fold I, 1-based) trains on the other K-1 parts
and validates on part I. A test split stays the test split and is evaluated by every fold: a folder's test/,
and also a test/ (or a built-in data set's test split) that otherwise stands in for validation. The cut is a
property of the data alone (seed FOLD_SEED, as --val-fraction's), so every fold of a run, and a resumed fold,
sees the same one. imgclf.crossval trains the K folds of a run and sums them up.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Hashable, Sequence

from imgclf.errors import UserError, shown

FOLD_SEED = 0
FOLDS_FILE = "folds.json"  # in the parent folder of a run's folds: its configuration, its folds' figures


def fold_indices(labels: Sequence[Hashable], k: int, seed: int) -> list[list[int]]:
    """The K held-out parts of the items whose labels are `labels` (a class, or any hashable of one kind:
    a tuple of 0/1 for a combination of labels): K sorted lists of indices into `labels`, pairwise disjoint,
    together every index exactly once. Stratified: each label's items are spread over the parts so that any
    two parts hold the same number of them within one, and the parts' sizes are within one of each other too.
    The same (`labels`, `k`, `seed`) always gives the same parts. `k` >= 1; a part may be empty only when
    there are fewer than `k` items."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rng = random.Random(seed)
    by_label: dict[Hashable, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    parts: list[list[int]] = [[] for _ in range(k)]
    start = 0  # each label deals on where the last one stopped, so that the parts' sizes stay level too
    for label in sorted(by_label):
        items = by_label[label]
        rng.shuffle(items)
        for offset, index in enumerate(items):
            parts[(start + offset) % k].append(index)
        start = (start + len(items)) % k
    return [sorted(part) for part in parts]


def fold_parts(labels: list, *, folds: int, fold: int, classes: list[str]) -> tuple[list[int], list[int], str]:
    """(training indices, held-out indices, a note or "") of fold `fold` (1-based) of `folds` over the pool
    whose labels are `labels`: class indices, or for multi-label pictures a 0/1 row (list or tuple) per picture.
    Single labels are stratified by class; multi-label rows by their combination of labels where every
    combination has at least `folds` pictures, else drawn at random, which the note says in one line.
    One UserError line when `fold` is beyond `folds`, or a class has fewer than `folds` pictures (some fold
    would validate on none of it)."""
    if not 1 <= fold <= folds:
        raise UserError(f"--fold {fold} is beyond --folds {folds}; give a fold from 1 to {folds}")
    multi = bool(labels) and isinstance(labels[0], list | tuple)
    strata = [tuple(row) for row in labels] if multi else list(labels)
    tally = Counter(strata)
    counts = ([sum(n for row, n in tally.items() if row[c]) for c in range(len(classes))] if multi
              else [tally[c] for c in range(len(classes))])
    fewest = min(range(len(classes)), key=counts.__getitem__)
    if counts[fewest] < folds:
        shows = "pictures showing" if multi else "pictures of"
        fix = (f"give --folds {counts[fewest]} or fewer" if counts[fewest] >= 2
               else "add pictures of it, or train without --folds")
        raise UserError(f"--folds {folds} needs at least {folds} {shows} every class, and "
                        f"{shown(classes[fewest])} has {counts[fewest]}; {fix}")
    note = ""
    if multi and min(tally.values()) < folds:
        note = (f"--folds {folds}: some combination of labels has fewer than {folds} pictures, so the folds are "
                f"drawn at random, not stratified")
        strata = [0] * len(strata)
    held = fold_indices(strata, folds, FOLD_SEED)[fold - 1]
    chosen = set(held)
    return [i for i in range(len(strata)) if i not in chosen], held, note


def fold_lists(lists: dict, *, folds: int, fold: int, test_is_val: bool, classes: list[str],
               targets=None) -> tuple[dict, str]:
    """A folder's splits for fold `fold` of `folds`: `lists` is role -> [files, labels] as imgclf.sources
    builds them (train, val, test); the pool is train with val, or train alone when `test_is_val` (val is
    then a test/ folder standing in, which becomes the test split again). Returns role -> [files, labels]
    (train, val: the held-out part, test where there is one) and `fold_parts`' note. `targets`: a
    multi-label set's (rows, classes) 0/1 tensor, which its labels (CSV rows) index."""
    pool = ["train"] if test_is_val else [role for role in ("train", "val") if role in lists]
    files = [f for role in pool for f in lists[role][0]]
    labels = [label for role in pool for label in lists[role][1]]
    keys = labels if targets is None else [targets[row].tolist() for row in labels]
    keep, held, note = fold_parts(keys, folds=folds, fold=fold, classes=classes)
    out = {"train": [[files[i] for i in keep], [labels[i] for i in keep]],
           "val": [[files[i] for i in held], [labels[i] for i in held]]}
    test = lists.get("val") if test_is_val else lists.get("test")
    if test is not None:
        out["test"] = test
    return out, note


def fold_name(fold: int, folds: int) -> str:
    """What a fold's validation split is called ("fold 2/5"), in its run's first line."""
    return f"fold {fold}/{folds}"


def fold_data(data, *, folds: int, fold: int):
    """Fold `fold` of `folds` of a data set read whole into tensors (built-in, IDX files), an
    imgclf.sources.ImageData with a training split and a test split standing in for validation: its
    training split is the pool, cut as `fold_parts` cuts it; the test split becomes the test split again."""
    keep, held, _ = fold_parts(data.train.labels.tolist(), folds=folds, fold=fold, classes=data.classes)

    def part(indices: list[int]):
        files = data.train.files
        return dataclasses.replace(data.train, images=data.train.images[indices], labels=data.train.labels[indices],
                                   files=None if files is None else [files[i] for i in indices])

    return dataclasses.replace(data, train=part(keep), val=part(held), test=data.val,
                               val_name=fold_name(fold, folds))
