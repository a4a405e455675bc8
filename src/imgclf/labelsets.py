"""Multi-label CSVs (issue 23): which pictures show which classes, any number per picture, none included.

Two layouts are read, each a --labels file with one row per picture, file names relative to the data folder:

- `filename,labels` with the labels of a picture separated by spaces (Kaggle's Planet set: `image_name,tags`,
  `train_0,haze primary`); a header row is recognised and skipped; a name without a suffix is looked up with
  the picture suffixes (train_0 -> train_0.jpg); an empty labels cell is a picture that shows none of them.
  The classes are the sorted distinct labels.
- a header row `filename,class1,class2,...` then one 0/1 cell per class (the classes in the header's order).

Either becomes (classes, files, targets): targets a (pictures, classes) uint8 tensor of 0/1. A picture with no
label is allowed: a multi-label model may answer "none of these", and it counts as a negative of every class.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from imgclf.errors import UserError, shown
from imgclf.files import not_regular
from imgclf.transforms import IMAGE_EXTENSIONS

SINGLE, MULTI = "single-label", "multilabel"  # imgclf.tasks' names (tasks imports torch.nn: not needed here)


def labels_task(task: str, labels: str | None) -> tuple[str, str]:
    """(task, why) for --task `task` and --labels `labels`: an explicit task as given; "auto" is multilabel
    when the CSV has one 0/1 column per class, or several labels in one cell (separated by spaces) under a
    `tags` or `labels` header, else single-label. `why` is a few words for the run's first line ("" for single-label by default)."""
    if task != "auto":
        return task, "" if task == SINGLE else "--task multilabel"
    if not labels:
        return SINGLE, ""
    rows = _rows(Path(labels).expanduser())
    if _column_layout(rows):
        return MULTI, f"one 0/1 column per class in {shown(labels)}"
    # Spaces alone are ambiguous (a class may be called "golden retriever"): several labels in a cell count
    # only under a header that says so, as Kaggle's Planet set has it (image_name,tags).
    named = bool(rows) and len(rows[0]) >= 2 and rows[0][1].strip().lower() in ("tags", "labels")
    if named and any(len(r) >= 2 and len(r[1].split()) > 1 for r in rows[1:]):
        return MULTI, f"several labels in a cell of {shown(labels)} under its '{rows[0][1].strip()}' header"
    return SINGLE, ""


def read_multilabel_csv(path: Path, root: Path, classes: list[str] | None = None
                        ) -> tuple[list[str], list[Path], torch.Tensor]:
    """(classes, files, targets (N, classes) uint8) of a multi-label CSV in either layout (see the module).
    `classes` (a checkpoint's): the classes to read the rows against, in their order; a row naming another is
    one UserError line. Every bad row, a file named twice or missing, is one UserError line naming it."""
    rows = _rows(path)
    if rows and len(rows[0]) >= 3:  # a header naming the classes, then one 0/1 column for each
        header, body = rows[0], rows[1:]
        names = [c.strip() for c in header[1:]]
        found = [_ones(r, names, path, row) for row, r in enumerate(body, start=2)]
        start = 2
    else:
        body = rows[1:] if rows and _is_header(rows[0], root) else rows
        start = len(rows) - len(body) + 1
        found = [r[1].split() if len(r) > 1 else [] for r in body]
        names = sorted({name for labels in found for name in labels})
    if not body:
        raise UserError(f"--labels {shown(path)} holds no filename,labels rows")
    classes = list(classes) if classes is not None else names
    if len(classes) < 2 and classes is names:
        raise UserError(f"--labels {shown(path)} names {len(classes)} class(es) ({', '.join(classes)}); a "
                        f"multi-label classifier needs at least two")
    targets = _targets(found, classes, path, start)
    files = _files(body, root, path, start)
    return classes, files, targets


def _rows(path: Path) -> list[list[str]]:
    problem = not_regular(path)
    if problem is not None:
        raise UserError(f"--labels {shown(path)}: {problem}; give a CSV file of filename,labels rows")
    try:
        return [r for r in csv.reader(path.read_text(encoding="utf-8-sig").splitlines()) if r and any(r)]
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"--labels {shown(path)}: not a readable CSV file ({err})") from None


def _ones(row: list[str], names: list[str], path: Path, number: int) -> list[str]:
    """The classes whose cell is 1 in `row` of the 0/1 layout; one UserError line for any other cell."""
    cells = [c.strip() for c in row[1:]]
    bad = next((i for i, c in enumerate(cells) if c not in ("0", "1")), None)
    if len(cells) != len(names) or bad is not None:
        what = (f"has {len(cells)} class cells where the header names {len(names)} classes"
                if len(cells) != len(names) else f"has {shown(cells[bad])} for {shown(names[bad])}, not 0 or 1")
        raise UserError(f"--labels {shown(path)}: row {number} {what}")
    return [name for name, cell in zip(names, cells, strict=True) if cell == "1"]


def _column_layout(rows: list[list[str]]) -> bool:
    """A header of three or more columns, then only 0/1 cells after each row's file name."""
    return len(rows) >= 2 and len(rows[0]) >= 3 and any(c.strip() not in ("0", "1") for c in rows[0][1:]) and \
        all(len(r) == len(rows[0]) and all(c.strip() in ("0", "1") for c in r[1:]) for r in rows[1:])


def _is_header(row: list[str], root: Path) -> bool:
    """The first row names no picture: `image_name,tags`, `filename,labels`..."""
    return _resolve(root, row[0].strip()) is None and row[0].strip().lower() in (
        "filename", "file", "image", "image_name", "image_id", "id", "path", "name", "file_name", "img")


def _resolve(root: Path, name: str) -> Path | None:
    """The picture a row names: `name` under `root` (or absolute), or with a picture suffix added."""
    path = root / name
    if path.exists():
        return path
    if not path.suffix:
        return next((p for p in (path.with_name(path.name + ext) for ext in IMAGE_EXTENSIONS) if p.exists()), None)
    return None


def _targets(found: list[list[str]], classes: list[str], path: Path, start: int) -> torch.Tensor:
    index = {name: i for i, name in enumerate(classes)}
    targets = torch.zeros(len(found), len(classes), dtype=torch.uint8)
    for row, labels in enumerate(found):
        for name in labels:
            if name not in index:
                known = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
                raise UserError(f"--labels {shown(path)}: row {row + start} names the class {shown(name)}, which "
                                f"the model does not know (its classes: {known})")
            targets[row, index[name]] = 1
    return targets


def _files(body: list[list[str]], root: Path, path: Path, start: int) -> list[Path]:
    files, first = [], {}
    for row, r in enumerate(body, start=start):
        name = r[0].strip()
        if not name:
            raise UserError(f"--labels {shown(path)}: row {row} has no file name: {','.join(r)[:80]!r}")
        file = _resolve(root, name)
        if file is None:
            raise UserError(f"--labels {shown(path)} row {row} names {shown(root / name)}, which does not exist "
                            f"(file names are relative to {shown(root)})")
        if file in first:
            raise UserError(f"--labels {shown(path)} names {shown(file)} twice (rows {first[file]} and {row}); "
                            f"give each picture one row, with all its labels")
        first[file] = row
        files.append(file)
    return files


def random_split(count: int, *, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train rows, held-out rows), sorted: `fraction` of `count` rows (at least one) drawn at random, seeded
    (multi-label pictures have no single class to stratify by)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, round(count * fraction)) if count >= 2 else 0
    return sorted(order[k:]), sorted(order[:k])
