"""`imgclf tune`: hyper-parameter search with Optuna, over any option of `imgclf train`.

The search space is a YAML file keyed like a configuration file (imgclf.configfile): a range
(`lr: {low: 0.001, high: 1, log: true}`, `batch_size: {low: 16, high: 128, step: 16}`), a list of choices
(`augment: [flip-crop, photo]`), or a plain value that every trial uses. Each trial trains a run folder
OUT/trial-N (N: the trial's number in the study) with the base configuration (recipe, --config, flags) and
the trial's values; its figure is the best of its --monitor over its epochs, which it reports to Optuna
after each epoch, so that a pruner (median by default) can end a poor trial early (recorded PRUNED; its run
folder stays resumable). A training that diverges is a FAIL trial and the search goes on. With
`nproc` > 1 each trial is a torchrun job on this machine, followed through its metrics.jsonl.

The study lives in a real database (any SQLAlchemy URL; SQLite by default) with Optuna's heartbeat: several
`imgclf tune` processes pointed at the same storage and study share it, each running its own trials; a
process killed loses its running trial only, which the next process to start a trial marks FAIL once its
heartbeat is older than the grace period. `--trials N` is the study's budget, counted over every process
and every earlier run of the command: trials complete, pruned or failed by their training (not those lost
with a killed process); so rerunning the command continues the study up to N. At the end: a table of the
study's trials, OUT/best.yaml (the best trial's whole configuration, for `imgclf train --config`), and
OUT/history.png and OUT/importances.png. Optuna is an optional extra, imported here only.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from imgclf.config import TrainConfig
from imgclf.configfile import config_yaml, option_keys, option_value, read_yaml, unknown_key
from imgclf.errors import EXIT_DIVERGED, EXIT_OK, Stopped, UserError, first_line
from imgclf.files import atomic_write_text
from imgclf.resolve import resolve
from imgclf.runs import read_records

NOT_SEARCHED = ("out", "stop_after", "monitor")  # set by tune itself, or the one figure all trials are judged by
RANGE_KEYS = {"low", "high", "log", "step"}


@dataclass(frozen=True)
class Dimension:
    """One searched option: a range of numbers (low, high, log, step) or a list of choices."""
    key: str
    section: str
    field: str
    kind: str  # int, float or choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


@dataclass
class Search:
    """What `imgclf tune` was asked: the base options, the space, the budget and where the study lives."""
    given: dict  # (section, field) -> value: --config's and the flags'
    recipe: str
    space: list[Dimension]
    fixed: dict  # (section, field) -> value: the space file's plain values
    out: Path
    storage: str
    study: str
    trials: int | None = None
    timeout: float | None = None
    pruner: str = "median"
    startup_trials: int = 5
    heartbeat: int = 60
    nproc: int = 1  # > 1: each trial is a torchrun job of this many processes


def read_space(path) -> tuple[list[Dimension], dict]:
    """The search space file: its dimensions, and the plain values it fixes. One UserError line per problem."""
    source, doc = str(path), read_yaml(path, what="search space")
    if not isinstance(doc, dict) or not doc:
        raise UserError(f"{source} must be a mapping of option: range or [choices] lines, e.g. "
                        f"`lr: {{low: 0.001, high: 1, log: true}}` or `augment: [flip-crop, photo]`")
    known, space, fixed = option_keys(), [], {}
    for key, value in doc.items():
        key = str(key).replace("-", "_")
        if key not in known:
            raise UserError(unknown_key(source, key, known))
        section, f, flag = known[key]
        if key in NOT_SEARCHED:
            raise UserError(f"{source}: {key} cannot be searched (tune sets out and stop_after; every trial is "
                            f"judged by the one --monitor)")
        if isinstance(value, dict):
            space.append(_range(source, key, section, f, flag, value))
        elif isinstance(value, list):
            if not value:
                raise UserError(f"{source}: {key}: an empty list of choices")
            choices = tuple(dict.fromkeys(option_value(source, key, f, v, bounds=False) for v in value))
            space.append(Dimension(key, section, f.name, "choice", choices=choices))
        else:
            fixed[section, f.name] = option_value(source, key, f, value)
    if not space:
        raise UserError(f"{source} searches nothing: give at least one range or list of choices")
    return space, fixed


def _range(source: str, key: str, section: str, f, flag: str, spec: dict) -> Dimension:
    kind = f.type.split(" | ")[0]
    if kind not in ("int", "float"):
        raise UserError(f"{source}: {key}: {flag} takes {'true or false' if kind == 'bool' else 'a string'}; "
                        f"search it as a list of choices, e.g. [a, b]")
    extra = set(spec) - RANGE_KEYS
    if extra or not {"low", "high"} <= set(spec):
        raise UserError(f"{source}: {key}: a range is {{low: X, high: Y}}, optionally with log: true or step: S"
                        f"{'; unknown ' + ', '.join(sorted(map(str, extra))) if extra else ''}")
    low, high = (option_value(source, f"{key}.{end}", f, spec[end], bounds=False) for end in ("low", "high"))
    step = option_value(source, f"{key}.step", f, spec["step"], bounds=False) if spec.get("step") is not None \
        else None
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{source}: {key}.log: true or false, got {log!r}")
    problem = ("low must be below high" if not low < high else "log needs low above 0" if log and low <= 0 else
               "log and step do not go together" if log and step else
               "step must be positive" if step is not None and step <= 0 else None)
    if problem:
        raise UserError(f"{source}: {key}: {problem} (got {spec})")
    return Dimension(key, section, f.name, kind, low=low, high=high, log=log, step=step)


# ---------------------------------------------------------------- the study

def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("imgclf tune needs Optuna: pip install 'imgclf[tune]'") from None
    return optuna


def open_study(search: Search, direction: str, *, quiet: bool = True):
    """The study named `search.study` in `search.storage`, created when absent (any process may be first)."""
    optuna = import_optuna()
    if quiet:
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial is one line of ours instead
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url = search.storage
    if url.startswith("sqlite:///") and url[len("sqlite:///"):] not in ("", ":memory:"):
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # several processes wait
    try:
        storage = _rdb_storage(optuna, url, engine, search.heartbeat)
        if url.startswith("sqlite"):
            serialize_sqlite(storage.engine)
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials)
                  if search.pruner == "median" else optuna.pruners.NopPruner())
        study = optuna.create_study(storage=storage, study_name=search.study, direction=direction,
                                    pruner=pruner, load_if_exists=True)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's and the database's errors: one line
        raise UserError(f"cannot open the study {search.study!r} in {url}: {first_line(err)}") from None
    if study.direction.name.lower() != direction:
        raise UserError(f"the study {search.study!r} in {url} {study.direction.name.lower()}s, but --monitor "
                        f"asks to {direction}; choose another --study")
    return study


def _rdb_storage(optuna, url: str, engine: dict, heartbeat: int, *, tries: int = 20):
    """Optuna's RDBStorage at `url`, its tables made when absent. Workers started together on a new database
    all find it empty and all make the tables and stamp their version: all but one fail ("table ... already
    exists", a UNIQUE alembic_version). Such a failure is a sign another worker did it: tried again, after
    a short random wait, until the tables are there (or `tries` are spent: then it is the user's error)."""
    import random

    from sqlalchemy.exc import IntegrityError

    def storage():
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat,
                                          grace_period=2 * heartbeat, heartbeat_stale_trial_callback=_say_lost)

    for _ in range(tries - 1):
        try:
            return storage()
        except Exception as err:  # noqa: BLE001 - sorted here: another worker's schema, or a real error
            if not (isinstance(err, IntegrityError) or "already exists" in str(err)):
                raise
            time.sleep(random.uniform(0.05, 0.3))  # noqa: S311 - a wait, not a secret
    return storage()


def serialize_sqlite(engine) -> None:
    """Make every transaction on `engine` (SQLite) begin IMMEDIATE, holding the database's write lock.
    SQLite has no SELECT ... FOR UPDATE, so without this two processes can both read a waiting (enqueued)
    trial as waiting and both run it (seen here: "Cannot tell a COMPLETE trial"); with it they take turns.
    SQLAlchemy's recipe for pysqlite; the connections open so far are dropped, so every one gets it."""
    from sqlalchemy import event

    def no_implicit_begin(dbapi_connection, record) -> None:
        dbapi_connection.isolation_level = None

    def begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(engine, "connect", no_implicit_begin)
    event.listen(engine, "begin", begin_immediate)
    engine.dispose()


def _say_lost(study, trial) -> None:
    print(f"imgclf: trial {trial.number} was lost (its process stopped answering): marked failed",
          file=sys.stderr, flush=True)


def run_search(search: Search) -> dict:
    """Run trials until the study's budget (`trials`) or this process's `timeout` is spent; return the
    summary (trials, best trial, files written)."""
    monitor = resolve(search.fixed, search.given, recipe=search.recipe).optim.monitor
    check_space(search)
    study = open_study(search, direction_of(monitor))
    optuna = import_optuna()
    started = time.monotonic()
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)
        if search.trials is not None and budget_used(study) >= search.trials:
            break
        if search.timeout is not None and time.monotonic() - started >= search.timeout:
            break
        study.optimize(lambda trial: objective(trial, search, monitor), n_trials=1, catch=(TrialFailed,),
                       callbacks=[_say_trial])
    return finish(study, search, monitor)


def check_space(search: Search) -> None:
    """Every end of every range and every choice makes a valid configuration: else one UserError line
    (naming the flag) before any trial starts."""
    for d in search.space:
        for value in (d.choices if d.kind == "choice" else (d.low, d.high)):
            try:
                resolve(search.fixed, search.given, {(d.section, d.field): value}, recipe=search.recipe)
            except UserError as err:
                raise UserError(f"search space {d.key}: {err}") from None


def budget_used(study) -> int:
    """Trials that count towards --trials: complete, pruned, failed by their training, and running now."""
    from optuna.trial import TrialState

    counted = 0
    for t in study.get_trials(deepcopy=False):
        lost = t.state == TrialState.FAIL and "ended" not in t.user_attrs
        counted += t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING) \
            and not lost
    return counted


class TrialFailed(Exception):
    """A trial whose training failed (diverged): recorded FAIL, and the search goes on."""


def objective(trial, search: Search, monitor: str) -> float:
    """Train the trial's run folder; its value is the best `monitor` figure over its epochs."""
    values = {(d.section, d.field): d.suggest(trial) for d in search.space}
    out = search.out / f"trial-{trial.number}"
    if (out / "config.json").exists():
        raise UserError(f"{out} already holds a run of another study; give tune another --out")
    given = {key: value for key, value in search.given.items() if key != ("run", "stop_after")}  # one call's
    cfg = resolve(search.fixed, given, {**values, ("run", "out"): str(out)}, recipe=search.recipe)
    trial.set_user_attr("config", cfg.to_dict())
    trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
    figures: list[float] = []

    def on_epoch(record: dict) -> None:
        if monitor not in record:  # an epoch --val-every does not evaluate: nothing to report or prune by
            return
        figures.append(record[monitor])
        trial.report(record[monitor], record["epoch"])
        if trial.should_prune():
            raise Stopped(f"pruned by Optuna after epoch {record['epoch']} ({monitor} {record[monitor]:.4f})",
                          EXIT_OK)

    print(f"imgclf: trial {trial.number}: {_shown(trial.params)} -> {out}", file=sys.stderr, flush=True)
    try:
        if search.nproc > 1:
            train_torchrun(cfg, search.nproc, on_epoch)
        else:
            from imgclf.train import train

            train(cfg, on_epoch=on_epoch)
    except Stopped as stop:
        if stop.code != EXIT_OK:  # a signal: the user stops the search
            raise
        trial.set_user_attr("ended", "pruned")
        raise import_optuna().TrialPruned(str(stop)) from None
    except UserError as err:
        if err.code != EXIT_DIVERGED:
            raise
        trial.set_user_attr("ended", str(err))
        raise TrialFailed(str(err)) from None
    trial.set_user_attr("ended", "finished")
    return (min if direction_of(monitor) == "minimize" else max)(figures)


def train_torchrun(cfg: TrainConfig, nproc: int, on_epoch, poll_s: float = 0.5) -> None:
    """`imgclf train --config OUT/config.yaml` as a torchrun job of `nproc` processes on this machine,
    `on_epoch` called with each metrics.jsonl record as it appears; a Stopped raised there (pruned) stops the
    job with SIGTERM (it saves, resumably) and is raised again. A job that fails is a UserError line, with
    the job's own status (EXIT_DIVERGED for a diverged training)."""
    import signal
    import subprocess

    out = Path(cfg.run.out)
    # beside the run folder, not in it: train takes only a new, empty or imgclf-made folder (and writes the
    # same configuration into it as config.yaml)
    given = out.with_name(out.name + ".yaml")
    atomic_write_text(given, config_yaml(cfg))
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={nproc}", "-m", "imgclf", "train", "--config", str(given)])
    seen = 0
    try:
        while True:
            done = job.poll() is not None
            records = read_records(out / "metrics.jsonl", lenient=True)
            for record in records[seen:]:
                on_epoch(record)
            seen = len(records)
            if done:
                break
            time.sleep(poll_s)
    except BaseException:
        job.send_signal(signal.SIGTERM)
        job.wait()
        raise
    if job.returncode != 0:
        raise UserError(f"the torchrun job of {out} failed with status {job.returncode} (its output is above)",
                        job.returncode if job.returncode == EXIT_DIVERGED else 2)


def direction_of(monitor: str, task: str | None = None) -> str:
    """Optuna's direction for figure `monitor`, as task `task` (a name of tasks.TASKS; default: the default
    task) says which way is better."""
    from imgclf.tasks import DEFAULT, TASKS  # torch: only when a search starts

    return "maximize" if TASKS[task or DEFAULT].monitors[monitor] else "minimize"


def _say_trial(study, trial) -> None:
    state = trial.state.name.lower()
    value = f" {trial.value:.4f}" if trial.value is not None else ""
    why = f": {trial.user_attrs.get('ended')}" if state == "fail" else ""
    print(f"imgclf: trial {trial.number} {state}{value}{why}", file=sys.stderr, flush=True)


def _shown(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())




# ---------------------------------------------------------------- the end: table, best.yaml, plots

def finish(study, search: Search, monitor: str) -> dict:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    summary = {"study": search.study, "storage": search.storage, "trials": trials, "monitor": monitor,
               "best": None, "files": []}
    if not done:
        return summary
    best = study.best_trial
    summary["best"] = best
    cfg = TrainConfig.from_dict(best.user_attrs["config"])
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=str(search.out / "best")))
    header = (f"# The best trial of the study {search.study!r} ({search.storage}): trial {best.number}, "
              f"{monitor} {best.value:.6g}\n# (its run: {search.out / f'trial-{best.number}'}). "
              f"`imgclf train --config best.yaml` trains it again, into {cfg.run.out}.\n")
    path = search.out / "best.yaml"
    atomic_write_text(path, config_yaml(cfg, header, folder=search.out))  # FILE.py: relative to it, hashed
    summary["files"] = [path, *plots(study, search.out)]
    return summary


def plots(study, out: Path) -> list[Path]:
    """history.png (optimisation history) and importances.png (parameter importances), each when Optuna
    can draw it (importances need two complete trials that differ); never fails the command."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    from imgclf.files import atomic_write

    written = []
    for name, draw in (("history", vis.plot_optimization_history), ("importances", vis.plot_param_importances)):
        try:
            with warnings.catch_warnings(), matplotlib.rc_context():  # Optuna sets its own style: only here
                warnings.simplefilter("ignore")
                ax = draw(study)
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            path = out / f"{name}.png"
            atomic_write(path, lambda tmp, fig=figure: fig.savefig(tmp, format="png", dpi=100))
            written.append(path)
        except Exception as err:  # noqa: BLE001 - a plot Optuna cannot draw yet is a note, not a failure
            print(f"imgclf: note: no {name}.png ({first_line(err)})", file=sys.stderr)
        finally:
            plt.close("all")
    return written


def tune_output(summary: dict, study: str) -> tuple[str, str]:
    """What `imgclf tune` prints at the end: (standard output, standard error): the table of trials, and the
    best trial with the files written (or that no trial has finished yet)."""
    best = summary["best"]
    if best is None:
        return format_trials(summary) + "\n", f"imgclf: no trial of the study {study!r} has finished yet\n"
    return format_trials(summary) + "\n", (f"best: trial {best.number}, {summary['monitor']} {best.value:.4f}; "
                                           f"{', '.join(str(p) for p in summary['files'])}\n")


def format_trials(summary: dict) -> str:
    """The study's trials as a table: number, state, value, epochs, duration, parameters."""
    rows = [("trial", "state", summary["monitor"], "epochs", "time", "parameters")]
    for t in summary["trials"]:
        epochs = max(t.intermediate_values, default=0)
        seconds = t.duration.total_seconds() if t.duration is not None else None
        rows.append((str(t.number), t.state.name.lower(), "-" if t.value is None else f"{t.value:.4f}",
                     str(epochs), "-" if seconds is None else f"{seconds:.0f}s", _shown(t.params)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
                     for r in rows)

