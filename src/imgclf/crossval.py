"""k-fold cross-validation (issue 23): `imgclf train --folds K` trains K ordinary runs and sums them up.

Fold I is an ordinary run in OUT/fold-I whose configuration is the run's with --fold I (imgclf.folds says
which pictures it holds out), trained by `imgclf.train.train` as any run is: it can be listed, resumed,
evaluated and exported alone. OUT/folds.json holds the run's configuration and, as each fold finishes, its
figures and their mean and sample standard deviation over the folds done: `imgclf train --resume OUT`
(imgclf.resolve reads the configuration there) continues a fold left unfinished, trains the missing ones and
never retrains a finished one. A fold's figures are those of its last epoch (`train`'s result: the
validation figures of the final weights, the test figures of best.pt where the data have a test split).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from imgclf.config import TrainConfig, config_fields
from imgclf.errors import Stopped, UserError, shown
from imgclf.files import atomic_write_text
from imgclf.folds import FOLDS_FILE
from imgclf.resolve import folds_config, refuse_existing_run
from imgclf.runs import read_records, status

# Options a resumed cross-validation may not change although a resumed run may: they change what a fold
# trains, and the folds of one run must train alike for their mean to mean anything.
ALIKE = (("optim", "epochs"), ("optim", "patience"))


def fold_folder(out, fold: int) -> Path:
    return Path(out) / f"fold-{fold}"


def cross_validate(cfg: TrainConfig, *, resume: bool = False,
                   on_fold: Callable[[int, dict], None] | None = None) -> dict:
    """Train the `cfg.data.folds` folds of the run `cfg` describes (its `data.fold` None) into
    OUT/fold-1 ... OUT/fold-K (OUT: `cfg.run.out`), one after the other; return what OUT/folds.json then
    holds (`folds_summary`). `resume`: OUT holds the folds of this run (its configuration `cfg`, as
    imgclf.resolve.resume reads it): finished folds are kept, an unfinished one resumed, missing ones
    trained. `on_fold(fold, record)` is called after each fold trained here with its last record; raising
    imgclf.errors.Stopped there stops the run resumably. A fold stopped (--stop-after, a signal) raises
    Stopped naming OUT to resume. A new run whose first fold trains nothing (bad data) leaves no files."""
    out, folds = Path(cfg.run.out), cfg.data.folds
    if resume:
        _refuse_unlike(cfg, folds_config(out))
    else:
        for fold in range(1, folds + 1):
            refuse_existing_run(str(fold_folder(out, fold)), f"resume it with --resume {out}", "--out")
    records, created = {}, not out.exists()
    _write(out, cfg, records)
    try:
        for fold in range(1, folds + 1):
            records[fold] = _fold(cfg, fold, on_fold)
            _write(out, cfg, records)
    except UserError:
        if not resume and not any(fold_folder(out, fold).exists() for fold in range(1, folds + 1)):
            (out / FOLDS_FILE).unlink(missing_ok=True)  # nothing trained: leave the folder as it was
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()
        raise
    return folds_summary(cfg, records)


def _refuse_unlike(cfg: TrainConfig, stored: TrainConfig) -> None:
    """One UserError line when `cfg` (the flags over the stored configuration) changes an ALIKE option."""
    flags = {(section, f.name): flag for section, f, flag in config_fields()}
    for section, name in ALIKE:
        now, was = getattr(getattr(cfg, section), name), getattr(getattr(stored, section), name)
        if now != was:
            raise UserError(f"{flags[section, name]} {now} differs from the {was} the folds of {cfg.run.out} train "
                            f"with; the folds of one cross-validation train alike: drop it")


def _fold(cfg: TrainConfig, fold: int, on_fold) -> dict:
    """Fold `fold`'s last record: read from its folder when it finished, else from training it (anew, or
    resumed from its last checkpoint)."""
    from imgclf.train import resumed_config, train  # torch, once the flags are known to be good

    folder, folds = fold_folder(cfg.run.out, fold), cfg.data.folds
    state = fold_state(folder)
    if state == "finished":
        print(f"imgclf: fold {fold}/{folds}: finished in {shown(folder)}, kept", file=sys.stderr)
        return read_records(folder / "metrics.jsonl")[-1]
    if state == "unfinished":
        fold_cfg = _with_runtime(resumed_config(folder), cfg)
    else:
        fold_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, fold=fold),
                                       run=dataclasses.replace(cfg.run, out=str(folder)))
    print(f"imgclf: fold {fold}/{folds}: {'resuming' if state == 'unfinished' else 'training'} {shown(folder)}",
          file=sys.stderr)
    try:
        record = train(fold_cfg, resume=state == "unfinished")
    except Stopped as stop:
        raise Stopped(f"fold {fold}/{folds} {stop}".split("; resume with:")[0] +
                      f"; resume every fold with: imgclf train --resume {cfg.run.out}", stop.code) from None
    if on_fold is not None:
        on_fold(fold, record)
    return record


def fold_state(folder: Path) -> str:
    """finished (its status or its last epoch says so), unfinished (a checkpoint to resume from) or new."""
    records = read_records(folder / "metrics.jsonl", lenient=True)
    try:
        planned = json.loads((folder / "config.json").read_text())["optim"]["epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        planned = None
    if records and (status(folder, {}, records) == "finished" or records[-1]["epoch"] == planned):
        return "finished"
    return "unfinished" if (folder / "checkpoints" / "last.pt").is_file() else "new"


def _with_runtime(fold_cfg: TrainConfig, cfg: TrainConfig) -> TrainConfig:
    """A resumed fold's own configuration with the resumable options (where and how it runs: --device,
    --stop-after...) of the cross-validation's `cfg`, which may have changed them on resuming."""
    sections = {}
    for section, f, _ in config_fields():
        if f.metadata["resumable"]:
            sections.setdefault(section, {})[f.name] = getattr(getattr(cfg, section), f.name)
    return dataclasses.replace(fold_cfg, **{section: dataclasses.replace(getattr(fold_cfg, section), **values)
                                            for section, values in sections.items()})


def figures_of(record: dict) -> dict[str, float]:
    """The validation and test figures of a metrics.jsonl record: its finite numbers named val_* or test_*
    but the counts of pictures (val_count) and test_of_epoch."""
    return {key: float(value) for key, value in record.items()
            if key.startswith(("val_", "test_")) and not key.endswith("_count") and key != "test_of_epoch"
            and not isinstance(value, bool)
            and isinstance(value, int | float) and math.isfinite(value)}


def folds_summary(cfg: TrainConfig, records: dict[int, dict]) -> dict:
    """folds.json: the run's configuration, the number of folds, each finished fold's figures (`figures_of`
    its last record) and, over the folds done, each figure's mean and sample standard deviation (None with
    one fold), min and max: the figures every fold done has."""
    figures = {f"fold-{fold}": figures_of(record) for fold, record in sorted(records.items())}
    names = [name for name in next(iter(figures.values()), {}) if all(name in f for f in figures.values())]
    stats = {}
    for name in names:
        values = [f[name] for f in figures.values()]
        stats[name] = {"mean": statistics.fmean(values),
                       "std": statistics.stdev(values) if len(values) > 1 else None,
                       "min": min(values), "max": max(values)}
    return {"folds": cfg.data.folds, "done": len(records), "monitor": cfg.optim.monitor, "figures": stats,
            "runs": figures, "config": cfg.to_dict()}


def _write(out: Path, cfg: TrainConfig, records: dict[int, dict]) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun every process drives the folds; one writes
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / FOLDS_FILE, json.dumps(folds_summary(cfg, records), indent=2) + "\n")


def folds_output(summary: dict, out) -> tuple[str, str]:
    """What `imgclf train --folds K` ends with: (standard output, standard error): a table of each figure's
    mean, standard deviation, min and max over the folds, and a line on the monitored figure and where the
    runs are."""
    rows = [("figure", "mean", "std", "min", "max")]
    for name, s in summary["figures"].items():
        rows.append((name, *(f"{s[k]:.4f}" if s[k] is not None else "-" for k in ("mean", "std", "min", "max"))))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    table = "\n".join("  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                                for i, cell in enumerate(row)) for row in rows)
    head = (f"cross-validation over {summary['done']} folds: mean, sample standard deviation, min and max of "
            f"each fold's last epoch")
    done = ""
    monitor = summary["figures"].get(summary["monitor"])
    if monitor is not None:
        std = f" ± {monitor['std']:.4f}" if monitor["std"] is not None else ""
        done = f"done: {summary['monitor']} {monitor['mean']:.4f}{std} over {summary['done']} folds; "
    return f"{head}\n{table}\n", f"{done}runs in {shown(Path(out))}/fold-1 ... fold-{summary['folds']}, " \
                                 f"figures in {shown(Path(out) / FOLDS_FILE)}\n"
