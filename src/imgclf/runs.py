"""The runs under a folder, as `imgclf runs` lists them, from what runs write: config.json, metrics.jsonl,
checkpoints/ and RUN/status.json, which a run keeps up to date (imgclf.tracking.RunRecord): running (with
its process id and host), then finished, stopped or crashed. A run whose status.json says running but
whose process is gone (killed) is crashed; a run written before status.json existed is judged by its
checkpoints. No torch here.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

from imgclf.errors import UserError, shown
from imgclf.files import atomic_write_text, run_folder_held
from imgclf.folds import FOLDS_FILE

STATUS_FILE = "status.json"
STATES = ("running", "finished", "stopped", "crashed")
COLUMNS = ("name", "model", "data", "epochs", "best", "time", "status")  # --sort keys


def write_status(run_dir: Path, status: str, *, message: str | None = None) -> None:
    """RUN/status.json: `status` (one of STATES), this process and host, when; written atomically."""
    path = Path(run_dir) / STATUS_FILE
    now = time.time()
    started = now if status == "running" else _read_object(path).get("started", now)
    atomic_write_text(path, json.dumps({"status": status, "pid": os.getpid(), "host": socket.gethostname(),
                                        "started": started, "updated": now, "message": message}) + "\n")


def find_runs(root: Path) -> list[Path]:
    """Every run folder (one holding config.json) at or under `root`, sorted by path."""
    root = Path(root)
    return sorted({p.parent for p in root.rglob("config.json") if not p.parent.name.startswith(".")})


def summarize(run_dir: Path, root: Path) -> dict:
    """One run's row: name (its path under `root`), model, data, epochs done and planned, the best figure
    of its --monitor and the epoch of it, the test accuracy when there is one, training time, status.
    What the run's files hold is taken only where it has the type it should (a field of another type, or a
    number that is not finite, is unknown: None), so that no edited or hostile file can break the listing."""
    run_dir = Path(run_dir)
    cfg = _read_object(run_dir / "config.json")
    optim = _object(cfg.get("optim"))
    records = read_records(run_dir / "metrics.jsonl", lenient=True)
    monitor, planned = _text(optim.get("monitor")) or "val_acc", _number(optim.get("epochs"))
    scored = [r for r in records if _number(r.get(monitor)) is not None]
    lower = monitor.endswith("loss")
    best = (min if lower else max)(scored, key=lambda r: _number(r[monitor])) if scored else None
    name = str(run_dir.relative_to(root)) if run_dir != Path(root) else run_dir.name
    return {"name": name, "path": str(run_dir), "model": _text(_object(cfg.get("model")).get("name")),
            "data": _text(_object(cfg.get("data")).get("data")), "epochs": len(records),
            "planned_epochs": int(planned) if planned is not None and planned.is_integer() else None,
            "monitor": monitor, "best": _number(best[monitor]) if best else None,
            "best_epoch": best["epoch"] if best and 0 <= best["epoch"] < 1e9 else None, "lower_is_better": lower,
            "test_acc": _number(records[-1].get("test_acc")) if records else None,
            "time": sum(_number(r.get("epoch_seconds")) or 0.0 for r in records),
            "status": status(run_dir, cfg, records), "started": _number(_read_object(run_dir / STATUS_FILE).get("started"))}


def _object(value) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _number(value) -> float | None:
    """`value` as a float when it is a finite number (not a bool, not an int beyond a float's range)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def status(run_dir: Path, cfg: dict, records: list[dict]) -> str:
    """finished, stopped, crashed or running (see the module's docstring)."""
    recorded = _read_object(Path(run_dir) / STATUS_FILE)
    if recorded.get("status") in STATES:
        if recorded["status"] == "running" and not _alive(Path(run_dir), recorded):
            return "crashed"
        return recorded["status"]
    optim = _object(cfg.get("optim"))
    if records and records[-1].get("epoch") == optim.get("epochs"):
        return "finished"
    return "stopped" if (Path(run_dir) / "checkpoints" / "last.pt").is_file() else "crashed"


def summarize_folds(folder: Path, root: Path) -> dict:
    """The row of a cross-validation's parent folder (imgclf.crossval), from its folds.json and its folds'
    rows: as `summarize`'s, with epochs the folds done, planned_epochs the folds, best the mean of the
    --monitor figure over the folds done and `std` its standard deviation, time the folds' in all, status
    running while a fold runs, finished once every fold is, else stopped (resumable); `folds`: K. Read as
    leniently as `summarize` reads a run."""
    folder, summary = Path(folder), _read_object(Path(folder) / FOLDS_FILE)
    cfg, figures = _object(summary.get("config")), _object(summary.get("figures"))
    folds, done = _number(summary.get("folds")), _number(summary.get("done"))
    folds = int(folds) if folds is not None and 2 <= folds <= 1000 else 0
    monitor = _text(_object(cfg.get("optim")).get("monitor")) or "val_acc"
    fold_rows = [summarize(folder / f"fold-{i}", root) for i in range(1, folds + 1)
                 if (folder / f"fold-{i}" / "config.json").is_file()]
    states = {row["status"] for row in fold_rows}
    state = "running" if "running" in states else "finished" if done == folds and folds else "stopped"

    def figure(name: str, key: str) -> float | None:  # folds.json: figures -> name -> mean, std, min, max
        return _number(_object(figures.get(name)).get(key))

    return {"name": str(folder.relative_to(root)) if folder != Path(root) else folder.name, "path": str(folder),
            "model": _text(_object(cfg.get("model")).get("name")), "data": _text(_object(cfg.get("data")).get("data")),
            "epochs": int(done) if done is not None and 0 <= done <= folds else 0, "planned_epochs": folds,
            "monitor": monitor, "best": figure(monitor, "mean"), "std": figure(monitor, "std"), "best_epoch": None,
            "lower_is_better": monitor.endswith("loss"), "test_acc": figure("test_acc", "mean"),
            "time": sum(row["time"] for row in fold_rows), "status": state, "started": None, "folds": folds}


def list_runs(root: Path, *, sort: str = "name") -> list[dict]:
    """The rows of every run under `root`, and of every cross-validation's parent folder (`summarize_folds`),
    sorted by `sort` (a COLUMNS key; best: the best figure first); then, for each run whose files could not
    be read at all, {"name", "path", "skipped": why}."""
    rows, skipped = [], []
    parents = sorted({p.parent for p in Path(root).rglob(FOLDS_FILE) if not p.parent.name.startswith(".")})
    for folder in sorted([*find_runs(root), *parents]):
        try:
            rows.append(summarize_folds(folder, Path(root)) if folder in parents else summarize(folder, Path(root)))
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError, OverflowError) as err:
            skipped.append({"name": str(folder.relative_to(root)), "path": str(folder),
                            "skipped": f"{type(err).__name__}: {str(err)[:200]}"})
    if sort == "best":
        rows.sort(key=lambda r: (r["best"] is None, (r["best"] or 0) * (1 if r["lower_is_better"] else -1)))
    elif sort == "time":
        rows.sort(key=lambda r: -r["time"])
    else:
        rows.sort(key=lambda r: (r[sort] is None, r[sort] if r[sort] is not None else 0))
    return rows + skipped


def runs_output(rows: list[dict], root, *, as_json: bool = False) -> tuple[str, str]:
    """What `imgclf runs` prints: (standard output, standard error): the table (or one JSON object per run)
    and how many runs there are under `root`; a line on standard error for each run skipped."""
    listed = [row for row in rows if "skipped" not in row]
    skipped = "".join(f"imgclf: skipping the run {shown(row['path'])}: its files cannot be read "
                      f"({shown(row['skipped'])})\n" for row in rows if "skipped" in row)
    if as_json:
        return "".join(json.dumps(row) + "\n" for row in listed), skipped
    return (format_table(listed) + "\n" if listed else ""), f"{skipped}{len(listed)} runs under {root}\n"


def format_table(rows: list[dict]) -> str:
    """The rows as a table with a header line."""
    header = {"name": "run", "model": "model", "data": "data", "epochs": "epochs", "best": "best",
              "time": "time", "status": "status"}
    cells = [header] + [_cells(r) for r in rows]
    widths = {key: max(len(c[key]) for c in cells) for key in header}
    right = ("epochs", "time")
    return "\n".join("  ".join(c[k].rjust(widths[k]) if k in right else c[k].ljust(widths[k]) for k in header)
                     .rstrip() for c in cells)


def format_finished(record: dict, out) -> str:
    """The line `imgclf train` ends with: the last epoch's figures and where the checkpoints are."""
    test = f", test accuracy {record['test_acc']:.2%}" if "test_acc" in record else ""
    if "val_map" in record:  # a multi-label run: its accuracy is exact match, its headline figure the mAP
        test = f", test mAP {record['test_map']:.4f}" if "test_map" in record else ""
        return (f"done: validation mAP {record['val_map']:.4f}{test} after {record['epoch']} epochs; "
                f"checkpoints in {Path(out) / 'checkpoints'}")
    return (f"done: validation accuracy {record['val_acc']:.2%}{test} after {record['epoch']} epochs; "
            f"checkpoints in {Path(out) / 'checkpoints'}")


def _cells(r: dict) -> dict:
    data = r["data"] or "?"
    if os.sep in data:  # a folder: its name says enough in a table (--json has it whole)
        data = Path(data).name
    epoch = r["best_epoch"] if r["best_epoch"] is not None else "?"
    best = "-" if r["best"] is None else f"{shown(r['monitor'])} {r['best']:.4f} (epoch {epoch})"
    planned = r["planned_epochs"] if r["planned_epochs"] is not None and r["planned_epochs"] < 1e9 else "?"
    epochs = f"{r['epochs']}/{planned}"
    if "folds" in r:  # a cross-validation: folds done, and the mean of its folds' figure
        epochs += " folds"
        std = f" ± {r['std']:.4f}" if r["std"] is not None else ""
        best = "-" if r["best"] is None else f"{shown(r['monitor'])} {r['best']:.4f}{std} (mean)"
    return {"name": shown(r["name"]), "model": shown(r["model"] or "?"), "data": shown(data),
            "epochs": epochs, "best": best, "time": _duration(r["time"]), "status": r["status"]}


def _duration(seconds: float) -> str:
    if not 0 <= seconds < 1e9:  # over 31 years: a time stamp written by hand, not a duration
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _alive(run_dir: Path, recorded: dict) -> bool:
    """Whether the process training `run_dir` still runs: whether a process holds the run folder's lock
    (files.claim_run_folder); for a run without one (an imgclf before it), whether the process status.json
    names runs (a PID the system may have given to another process since). On another host it cannot be
    told: assumed so."""
    if recorded.get("host") != socket.gethostname():
        return True
    held = run_folder_held(run_dir)
    if held is not None:
        return held
    try:
        os.kill(int(recorded["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


def _read_object(path: Path) -> dict:
    """The JSON object in `path`; {} when there is none (no file, not JSON, nested too deep, not an object)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return _object(value)


def read_records(path: Path, *, lenient: bool = False) -> list[dict]:
    """The records of a metrics.jsonl. Strict (training, resuming, the Python API): one UserError line naming the
    file and line when one is not a record (a file torn or edited by hand: imgclf writes it whole, atomically).
    `lenient` (readers of runs that may be in progress: `imgclf runs`, `imgclf tune`): no file is no records,
    and lines that are not records are left out."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        if lenient:
            return []
        raise
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: lists nested thousands deep
            record = None
        if not isinstance(record, dict) or type(record.get("epoch")) is not int:
            if lenient:
                continue
            raise UserError(f"{shown(path)} line {number} is not a record of an epoch (the file is torn or was "
                            f"edited); repair or delete that line, then resume again")
        records.append(record)
    return records
