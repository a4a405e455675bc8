"""MLflow tracking of a run (`--mlflow URI`), beside TensorBoard: the options as parameters, every epoch's
metrics.jsonl figures as metrics (step = epoch; a class's figures as val_per_class/CLASS/f1), and at the end the pictures, best.pt, config.yaml and
metrics.jsonl as artifacts; the run's status FINISHED, KILLED (stopped, resumably) or FAILED.

The MLflow run's id is kept in RUN/mlflow.json, so that `imgclf train --resume RUN` goes on logging into the
same MLflow run (on the same tracking server). MLflow is an optional extra, imported here only; it is
reached through an explicit MlflowClient (no process-wide active run). Once a run has started, a tracking
server that stops answering costs its figures, never the training: one warning, then no more MLflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

from imgclf import __version__
from imgclf.config import TrainConfig
from imgclf.errors import UserError, shown
from imgclf.files import atomic_write_text
from imgclf.report import flatten_config
from imgclf.runs import read_records

STATE = "mlflow.json"  # RUN/mlflow.json: {"tracking_uri", "experiment_id", "run_id"}
STATUS = {"finished": "FINISHED", "stopped": "KILLED", "crashed": "FAILED"}
BATCH = 1000  # MLflow's limit of metrics per log_batch call
NOT_LOGGED = ("epoch", "time")  # the step and the timestamp of every metric


def tracking_uri(value: str) -> str:
    """The tracking URI `--mlflow VALUE` means: VALUE, or for `--mlflow` alone ("env") $MLFLOW_TRACKING_URI."""
    if value != "env":
        return value
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UserError("--mlflow without a URI logs to $MLFLOW_TRACKING_URI, which is not set; set it, or give "
                        "--mlflow URI (http://HOST:5000, sqlite:///mlflow.db, ./mlruns)")
    return uri


def import_mlflow():
    """The mlflow module; one UserError line when it is not installed."""
    try:
        import mlflow
    except ImportError:
        raise UserError("--mlflow needs MLflow: pip install 'imgclf[mlflow]'") from None
    return mlflow


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """One UserError line at once, before the run begins, when MLflow cannot log to `uri`. An http(s)
    tracking server must answer (MLflow's own client retries for minutes; any HTTP answer, even an error
    status, counts); any other URI (a database, a folder) must be one MLflow opens: a scheme it knows, a
    database it can create or read, a file store it accepts (MLflow 3 refuses one unless
    MLFLOW_ALLOW_FILE_STORE=true)."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        _check_store(uri)
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()  # noqa: S310 - http(s) only
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"no MLflow tracking server answers at {uri} ({reason}); start it (mlflow server), or "
                        f"check --mlflow") from None


def _check_store(uri: str) -> None:
    """Open MLflow's store at `uri` (not http) and read from it; one UserError line when MLflow cannot."""
    mlflow = import_mlflow()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the user's
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - MLflow, SQLAlchemy and the file system raise many kinds
        text = str(err).strip()
        if "MLFLOW_ALLOW_FILE_STORE" in text:
            reason = ("MLflow refuses a file store unless MLFLOW_ALLOW_FILE_STORE=true is set; give a database "
                      "(sqlite:///mlflow.db) or a server (http://HOST:5000), or set it")
        elif "unsupported URI" in text or "registered tracking store" in text:
            reason = "MLflow knows no such kind of store; give sqlite:///mlflow.db, http://HOST:5000, ..."
        else:
            reason = (text.splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"MLflow cannot log to --mlflow {shown(uri)}: {shown(reason)}") from None


def metric_key(name: str) -> str:
    """`name` in the characters MLflow accepts in a metric name (a class name may hold others)."""
    return re.sub(r"[^\w\-. :/]", "_", name)


class MlflowRun:
    """One imgclf run's MLflow run. `open` starts it (or, for a resumed run, continues it)."""

    def __init__(self, client, run_id: str, uri: str):
        self.client, self.run_id, self.uri, self.broken = client, run_id, uri, False

    @classmethod
    def open(cls, cfg: TrainConfig, *, resumed: bool) -> MlflowRun:
        """Start the MLflow run of `cfg`'s run folder, or continue the one RUN/mlflow.json names when resuming
        on the same tracking server. One UserError line when MLflow is missing or the server refuses."""
        mlflow = import_mlflow()
        from mlflow.exceptions import MlflowException

        uri, run_dir = tracking_uri(cfg.run.mlflow), Path(cfg.run.out)
        client = mlflow.MlflowClient(tracking_uri=uri)
        state = read_state(run_dir) if resumed else None
        try:
            if state is not None and state.get("tracking_uri") == uri and isinstance(state.get("run_id"), str):
                run = cls(client, state["run_id"], uri)
                client.update_run(run.run_id, status="RUNNING")
                run.log_params(cfg, known=client.get_run(run.run_id).data.params)
                return run
            run = cls(client, cls._create(client, cfg), uri)
            run.log_params(cfg, known={})
            if resumed:  # a run resumed with --mlflow for the first time: its earlier epochs too
                for record in read_records(Path(run_dir) / "metrics.jsonl", lenient=True):
                    run.log_epoch(record)
        except MlflowException as err:
            raise UserError(f"MLflow at {uri}: {str(err).strip().splitlines()[0][:200]}") from None
        atomic_write_text(run_dir / STATE, json.dumps({"tracking_uri": uri, "run_id": run.run_id}) + "\n")
        return run

    @staticmethod
    def _create(client, cfg: TrainConfig) -> str:
        name = cfg.run.mlflow_experiment
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        run_dir = Path(cfg.run.out)
        tags = {"imgclf.version": __version__, "imgclf.run_folder": str(run_dir.resolve()),
                "imgclf.model": cfg.model.name, "imgclf.data": cfg.data.data, "mlflow.source.name": "imgclf train",
                "mlflow.source.type": "LOCAL"}
        return client.create_run(experiment_id, run_name=run_dir.resolve().name, tags=tags).info.run_id

    def log_params(self, cfg: TrainConfig, *, known: dict) -> None:
        """Every option, by its configuration-file key; a resumed run logs only those not yet logged (MLflow
        keeps a parameter's first value: one a resume changed, such as epochs, goes into a tag)."""
        from mlflow.entities import Param

        from imgclf.configfile import option_keys

        values = {key: str(getattr(getattr(cfg, section), f.name)) for key, (section, f, _) in option_keys().items()}
        params = [Param(key, value) for key, value in values.items() if key not in known]
        changed = {f"imgclf.resumed.{key}": value for key, value in values.items() if key in known and
                   known[key] != value}
        self.client.log_batch(self.run_id, params=params)
        for key, value in changed.items():
            self.client.set_tag(self.run_id, key, value)

    def log_epoch(self, record: dict) -> None:
        """metrics.jsonl's record of one epoch: each number under its own key, at step = epoch."""
        from mlflow.entities import Metric

        when = _float(record.get("time"))  # (a resumed run's earlier records: whatever its file holds)
        stamp, step = int((when if when is not None and 0 <= when < 1e11 else time.time()) * 1000), record["epoch"]
        flat = flatten_config(record, sep="/")  # val_per_class: {cat: {f1: ...}} -> val_per_class/cat/f1
        metrics = [Metric(metric_key(key), _float(value), stamp, step) for key, value in flat.items()
                   if key not in NOT_LOGGED and _float(value) is not None]
        self._safely(lambda: [self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])
                              for i in range(0, len(metrics), BATCH)])

    def finish(self, status: str, run_dir: Path) -> None:
        """End the MLflow run as `status` (finished, stopped or crashed); a finished run's final test figures,
        pictures, best checkpoint, configuration and metrics go with it."""
        run_dir = Path(run_dir)
        if status == "finished":
            records = read_records(Path(run_dir) / "metrics.jsonl", lenient=True)
            last = records[-1] if records else {}
            self.log_epoch({k: v for k, v in last.items() if k.startswith("test_") or k in NOT_LOGGED})
            self._safely(lambda: self._artifacts(run_dir))
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints the run's address: stdout is the user's
            self._safely(lambda: self.client.set_terminated(self.run_id, STATUS[status]))

    def _artifacts(self, run_dir: Path) -> None:
        for png in sorted(run_dir.glob("*.png")):
            self.client.log_artifact(self.run_id, str(png), "pictures")
        best = run_dir / "checkpoints" / "best.pt"
        if best.is_file():
            self.client.log_artifact(self.run_id, str(best), "checkpoints")
        for name in ("config.yaml", "metrics.jsonl"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))

    def _safely(self, call) -> None:
        """Run `call`; the first failure is one warning and ends MLflow logging for this run."""
        if self.broken:
            return
        try:
            call()
        except Exception as err:  # noqa: BLE001 - the tracking server, not the training, failed
            self.broken = True
            print(f"imgclf: warning: MLflow at {self.uri} failed ({str(err).strip().splitlines()[0][:160]}); "
                  f"the run goes on without it", file=sys.stderr, flush=True)


def _float(value) -> float | None:
    """`value` as a float when it is a number (NaN and infinities too: a diverged run's), else None (a bool,
    a string, an int beyond a float's range)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def read_state(run_dir: Path) -> dict | None:
    """RUN/mlflow.json, or None when the run has none (or it cannot be read, or is not a JSON object)."""
    try:
        state = json.loads((Path(run_dir) / STATE).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return state if isinstance(state, dict) else None

