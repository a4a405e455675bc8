"""Duplicates and split leaks (issue 25, point 2): pairs of pictures of a data set that are the same file
(exact: the same bytes) or nearly the same picture (near: cosine similarity of their embeddings, `imgclf.embed`,
at least a threshold), within the training split and across splits (a leak: a held-out picture the network
was trained on). `find_pairs` is pure; `duplicates` runs it on a data set and `write_report` writes the table
(CSV) and a picture grid (PNG), worst first."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.embed import Embedded, unit_rows
from imgclf.errors import UserError, shown
from imgclf.files import atomic_write

BLOCK = 1024  # rows of the similarity matrix computed at a time: BLOCK x N floats of memory
MAX_PAIRS = 1_000_000  # more near pairs than this means the threshold is too low for the network's embeddings


@dataclass(frozen=True)
class Pair:
    """Rows `a` < `b` of an Embedded that are duplicates: `exact` (the same bytes) or near, with their cosine
    `similarity`."""

    a: int
    b: int
    similarity: float
    exact: bool


def digests(emb: Embedded) -> list[str]:
    """SHA-256 of each row's file bytes; of its decoded pixels where the data set has no files (built-in)."""
    out = []
    for i, path in enumerate(emb.paths):
        if Path(path).is_file():
            out.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
        else:
            out.append("pixels:" + hashlib.sha256(np.ascontiguousarray(emb.picture(i)).tobytes()).hexdigest())
    return out


def find_pairs(vectors: np.ndarray, hashes: list[str], *, threshold: float, wanted=None) -> list[Pair]:
    """Every pair of rows with the same hash (exact) or of cosine similarity >= `threshold` (near), each once,
    worst first: exact pairs, then by similarity, highest first. `wanted(a, b)` (arrays of rows, a < b
    elementwise), when given, says which pairs to keep (within train, across splits) as a boolean array."""
    unit = unit_rows(vectors.astype(np.float32))
    codes = np.unique(np.asarray(hashes), return_inverse=True)[1]
    found_a, found_b, hits = [], [], 0
    for start in range(0, len(unit), BLOCK):
        block = unit[start:start + BLOCK]
        rows, cols = np.nonzero((block @ unit.T >= threshold) | (codes[start:start + BLOCK, None] == codes[None, :]))
        hits += len(rows)
        if hits > 2 * MAX_PAIRS + len(unit):  # each pair is met twice, and each row with itself
            raise UserError(f"over {MAX_PAIRS:,} pairs of pictures have a cosine similarity of at least "
                            f"{threshold:g}: this network's embeddings lie close together; raise --threshold "
                            f"(say 0.99) or use a better-trained network")
        a = rows + start
        keep = a < cols
        found_a.append(a[keep])
        found_b.append(cols[keep])
    a, b = np.concatenate(found_a), np.concatenate(found_b)
    if wanted is not None and len(a):
        keep = wanted(a, b)
        a, b = a[keep], b[keep]
    sims = np.einsum("ij,ij->i", unit[a], unit[b]) if len(a) else np.zeros(0, dtype=np.float32)
    exact = codes[a] == codes[b]
    order = np.lexsort((b, a, -sims, ~exact))  # the last key sorts first: exact, then most similar
    return [Pair(int(a[i]), int(b[i]), float(sims[i]), bool(exact[i])) for i in order]


def kind(emb: Embedded, pair: Pair) -> str:
    """'within train', 'within test'..., or 'leak train/test' for a pair across splits."""
    x, y = emb.splits[pair.a], emb.splits[pair.b]
    return f"within {x}" if x == y else f"leak {x}/{y}"


def involves_train(emb: Embedded):
    """The `wanted` of `find_pairs` for the report: pairs within the training split and across splits."""
    splits = np.asarray(emb.splits)
    return lambda a, b: (splits[a] == "train") | (splits[a] != splits[b])


def duplicates(emb: Embedded, *, threshold: float = 0.95) -> list[Pair]:
    """The duplicate pairs of an embedded data set within train and across splits, worst first."""
    return find_pairs(emb.vectors, digests(emb), threshold=threshold, wanted=involves_train(emb))


def write_report(emb: Embedded, pairs: list[Pair], out, *, grid_pairs: int = 24) -> tuple[Path, Path | None]:
    """OUT/duplicates.csv (kind, exact, similarity, both paths, splits and labels; every pair) and
    OUT/duplicates.png (the first `grid_pairs` pairs side by side, worst first; none without pairs)."""
    out = Path(out)
    table = out / "duplicates.csv"

    def write_csv(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["kind", "exact", "similarity", "path_a", "split_a", "label_a", "path_b", "split_b",
                             "label_b"])
            for p in pairs:
                writer.writerow([kind(emb, p), int(p.exact), f"{p.similarity:.4f}",
                                 *_side(emb, p.a), *_side(emb, p.b)])

    atomic_write(table, write_csv)
    if not pairs:
        return table, None
    return table, _grid(emb, pairs[:grid_pairs], out / "duplicates.png")


def _side(emb: Embedded, i: int) -> list[str]:
    return [emb.paths[i], emb.splits[i], emb.classes[emb.labels[i]]]


def _grid(emb: Embedded, pairs: list[Pair], path: Path) -> Path:
    from imgclf.visualize import image_grid, save_png  # matplotlib only when a grid is drawn

    images, labels, colors = [], [], []
    for n, p in enumerate(pairs, start=1):
        what = "exact" if p.exact else f"{p.similarity:.3f}"
        color = "red" if emb.splits[p.a] != emb.splits[p.b] else "black"
        for i, text in ((p.a, f"#{n} {what}"), (p.b, "")):
            images.append(emb.picture(i))
            labels.append(f"{text}\n{emb.splits[i]} {emb.classes[emb.labels[i]]} {Path(emb.paths[i]).name}".strip())
            colors.append(color)
    fig = image_grid(images, labels, ncols=8, lines=2, title="duplicate pairs side by side, worst first "
                     "(red: across splits, a leak)", colors=colors)
    return save_png(fig, path)


def duplicates_output(emb: Embedded, pairs: list[Pair], written: tuple[Path, Path | None], *,
                      threshold: float, shown_rows: int = 20) -> tuple[str, str]:
    """`imgclf duplicates`' table (the first `shown_rows` pairs) and counts by kind, and what was written."""
    counts: dict[str, list[int]] = {}
    for p in pairs:
        counts.setdefault(kind(emb, p), [0, 0])[0 if p.exact else 1] += 1
    lines = [f"{len(pairs)} duplicate pair(s) (exact: same bytes; near: cosine >= {threshold:g})"]
    lines += [f"  {k}: {e} exact, {n} near" for k, (e, n) in sorted(counts.items())]
    if pairs:
        lines.append("kind  similarity  a  b")
        for p in pairs[:shown_rows]:
            what = "exact" if p.exact else f"{p.similarity:.4f}"
            lines.append(f"{kind(emb, p)}  {what}  {shown(emb.paths[p.a])}  {shown(emb.paths[p.b])}")
        if len(pairs) > shown_rows:
            lines.append(f"... {len(pairs) - shown_rows} more in the CSV")
    table, grid = written
    lines.append(f"wrote {shown(table)}" + (f" and {shown(grid)}" if grid else ""))
    near = sum(not p.exact for p in pairs)
    crowded = near > len(emb.paths) // 10  # far more than real data sets hold: the threshold fits not this network
    hint = (f"imgclf: {near} near pairs for {len(emb.paths)} pictures: this network's embeddings lie close "
            f"together; the top of the list is what to look at, or raise --threshold\n") if crowded else ""
    return "\n".join(lines) + "\n", hint
