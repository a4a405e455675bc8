"""What a run shows and records (notes 07-08, 14): console, metrics.jsonl and TensorBoard, main process only."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch

from imgclf.errors import UserError
from imgclf.files import atomic_write_text
from imgclf.runs import read_records


class Tracker:
    """Progress on stderr, one JSON line per epoch in RUN/metrics.jsonl, TensorBoard events in RUN/.

    With `enabled=False` (processes other than rank 0) every method does nothing.
    """

    def __init__(self, run_dir: Path, *, enabled: bool = True, resume_epoch: int = 0, steps_per_epoch: int = 1,
                 log_every: int = 50, stream=None):
        self.run_dir, self.enabled, self.log_every = Path(run_dir), enabled, log_every
        self.steps_per_epoch = steps_per_epoch
        self.stream = stream or sys.stderr
        self.notebook = stream is None and in_notebook()  # a Jupyter kernel: a progress bar that renders there
        self.records: list[dict] = []
        self.writer = None
        self.bar = None
        if not enabled:
            return
        path = self.run_dir / "metrics.jsonl"
        if resume_epoch and path.is_file():  # keep what was recorded up to the checkpoint, drop anything later
            self.records = [r for r in read_records(path) if r["epoch"] <= resume_epoch]
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a killed run wrote after the checkpoint we resume from
        self.writer = SummaryWriter(str(self.run_dir), purge_step=resume_epoch * steps_per_epoch or None)

    def start_epoch(self, epoch: int, total_epochs: int, *, start_step: int = 0) -> None:
        if not self.enabled:
            return
        self.epoch, self.total_epochs, self.epoch_start = epoch, total_epochs, time.perf_counter()
        self.tty = self.stream.isatty()
        if self.tty or self.notebook:
            self.bar = progress_bar(notebook=self.notebook and not self.tty)(
                total=self.steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{total_epochs}",
                unit="step", file=self.stream, leave=False, dynamic_ncols=True)

    def step(self, step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        global_step = self.epoch * self.steps_per_epoch + step
        if step % self.log_every == 0:
            self.writer.add_scalar("train/loss", loss, global_step)
            self.writer.add_scalar("train/lr", lr, global_step)
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0:
                self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        elif (step + 1) % max(1, self.steps_per_epoch // 4) == 0 and step + 1 < self.steps_per_epoch:
            print(f"epoch {self.epoch + 1}/{self.total_epochs}  step {step + 1}/{self.steps_per_epoch}  "
                  f"loss {loss:.4f}", file=self.stream, flush=True)

    def end_epoch(self, record: dict) -> None:
        """Print the epoch's summary, append it to metrics.jsonl (rewritten atomically), plot the scalars."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.records.append(record)
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records))
        step = record["epoch"] * self.steps_per_epoch
        multilabel = ("val_map", "val_micro_f1", "val_macro_f1") if "val_map" in record else ()
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "images_per_s",
                    *multilabel):
            if key in record:
                group, _, name = key.partition("_")
                tag = f"{group}/{name}" if group in ("train", "val", "test") else key
                self.writer.add_scalar(tag, record[key], step)
        if "val_acc" in record:  # an epoch --val-every does not evaluate has no val_* figures
            self.writer.add_scalar("epoch/val_acc", record["val_acc"], record["epoch"])
        self.writer.flush()
        skipped = f"  skipped files {record['skipped_files']}" if record.get("skipped_files") else ""
        skipped = (f"  mAP {record['val_map']:.4f}" if "val_map" in record else "") + skipped
        val = (f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.2%}" if "val_loss" in record
               else "val not evaluated")
        print(f"epoch {record['epoch']}/{self.total_epochs}  train loss {record['train_loss']:.4f} "
              f"acc {record['train_acc']:.2%}  |  {val}"
              f"  |  {record['images_per_s']:.0f} img/s  {record['epoch_seconds']:.1f}s{skipped}",
              file=self.stream, flush=True)

    def amend_last(self, extra: dict) -> dict:
        """Add `extra` (the final test figures) to the last epoch's record, in metrics.jsonl and TensorBoard,
        and say it; returns the amended record."""
        record = self.records[-1] if self.records else {}
        record.update(extra)
        if not self.enabled or not extra:
            return record
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records))
        for key in ("test_acc", "test_loss"):
            self.writer.add_scalar(f"test/{key[5:]}", record[key], record["epoch"] * self.steps_per_epoch)
        self.writer.flush()
        print(f"test: accuracy {record['test_acc']:.2%}  loss {record['test_loss']:.4f} on {record['test_count']} "
              f"pictures, with best.pt (epoch {record['test_of_epoch']})", file=self.stream, flush=True)
        return record

    def batch_grid(self, tag: str, images: torch.Tensor, mean, std, step: int = 0) -> None:
        """A grid of one batch as the model sees it, un-normalised for the eye (note 14)."""
        if not self.enabled:
            return
        from torchvision.utils import make_grid

        x = images[:64].detach().float().cpu()
        x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        if x.shape[1] not in (1, 3):  # bands beyond RGB (imgclf.bands): the first three, as false colour
            x = x[:, :3] if x.shape[1] > 3 else x[:, :1]
        self.writer.add_image(tag, make_grid(x.clamp(0, 1), nrow=8), step)

    def graph(self, model: torch.nn.Module, example: torch.Tensor) -> None:
        """The model's graph, traced in eval mode so BatchNorm statistics are not touched."""
        if not self.enabled:
            return
        was_training = model.training
        model.eval()
        try:
            with warnings.catch_warnings():  # add_graph uses torch.jit.trace, which now warns of its deprecation
                warnings.simplefilter("ignore", FutureWarning)
                # in the weights' dtype: float32, or bfloat16 with --bf16-weights (traced without autocast)
                dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
                self.writer.add_graph(model, example[:2].to(dtype).contiguous())
        except Exception as err:  # noqa: BLE001 - a graph that cannot be traced is not worth stopping a run for
            print(f"imgclf: note: no model graph in TensorBoard ({str(err).splitlines()[0][:120]})",
                  file=self.stream)
        finally:
            model.train(was_training)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (its IPython shell runs in an IPKernelApp), where stderr is
    no terminal but a progress bar still renders."""
    ipython = sys.modules.get("IPython") if "ipykernel" in sys.modules else None
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def progress_bar(*, notebook: bool):
    """tqdm's bar class: on a terminal the text bar; in a notebook tqdm.auto's widget bar (its text bar, which
    notebooks also render in place, when ipywidgets is absent: tqdm's warning about that is not shown)."""
    if not notebook:
        from tqdm import tqdm

        return tqdm
    from tqdm import TqdmWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TqdmWarning)
        from tqdm.auto import tqdm
    return tqdm


class RunRecord:
    """What a run tells others about itself beside metrics.jsonl: RUN/status.json (`imgclf runs`) and, with
    --mlflow, its MLflow run (imgclf.mlflowrun). A context manager around the training: once `start` was
    called, leaving it marks the run finished, stopped (imgclf.errors.Stopped, Ctrl-C) or crashed (any other
    exception, its first line kept). With `enabled=False` (processes other than rank 0) it does nothing."""

    def __init__(self, cfg, *, enabled: bool = True):
        self.cfg, self.enabled, self.run_dir = cfg, enabled, Path(cfg.run.out)
        self.mlflow, self.started = None, False
        if enabled and cfg.run.mlflow:  # MLflow missing or no URI: said before the data are even loaded
            from imgclf.mlflowrun import check_reachable, import_mlflow, tracking_uri

            import_mlflow()
            check_reachable(tracking_uri(cfg.run.mlflow))

    def start(self, *, resumed: bool) -> None:
        """The run begins (its folder is written): MLflow first, so a server that refuses stops it before it starts."""
        if not self.enabled:
            return
        if self.cfg.run.mlflow:
            from imgclf.mlflowrun import MlflowRun

            self.mlflow = MlflowRun.open(self.cfg, resumed=resumed)
        from imgclf.runs import write_status

        write_status(self.run_dir, "running")
        self.started = True

    def epoch_hook(self, on_epoch):
        """train's on_epoch: the epoch's record to MLflow, then to `on_epoch` (which may stop the run)."""

        def hook(record: dict) -> None:
            if self.mlflow is not None:
                self.mlflow.log_epoch(record)
            if on_epoch is not None:
                on_epoch(record)

        return hook

    def __enter__(self) -> RunRecord:
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if not self.started:
            return False
        from imgclf.errors import Stopped
        from imgclf.runs import write_status

        status = ("finished" if kind is None else
                  "stopped" if issubclass(kind, Stopped | KeyboardInterrupt) else "crashed")
        message = str(err).strip().splitlines()[0][:300] if err is not None and str(err).strip() else None
        try:
            write_status(self.run_dir, status, message=message or (kind.__name__ if kind else None))
        except (OSError, UserError):
            if kind is None:
                raise
            # the run is already failing (a full disk, say): its own error is the one the user must see
        if self.mlflow is not None:
            self.mlflow.finish(status, self.run_dir)
        return False
