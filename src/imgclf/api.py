"""The Python API, the command line's twin (notes 26-31 in a notebook or a script).

    run = imgclf.fit(Tudui(), "cifar10", epochs=2, recipe="notes")    # imgclf train
    run.metrics, run.best                                              # RUN/metrics.jsonl, best.pt
    run.evaluate(), run.predict(["cat.jpg"]), run.export("onnx")       # imgclf eval / predict / export
    run = imgclf.load("runs/run")                                      # a run folder or a checkpoint

One configuration path: `fit`'s keyword options are the flags of `imgclf train` (`--batch-size 64` is
`batch_size=64`), read from the same declarations (`config.config_fields`), each value checked by its option's one rule
(`config.check_option`) and turned into a TrainConfig by the same `resolve.resolve` as the flags; an unknown
or ill-typed option is one UserError line.
Importing this module imports neither torch nor anything else heavy; each function imports what it uses.
"""

from __future__ import annotations

import difflib
import numbers
import os
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from imgclf.config import ModelConfig, RunConfig, TrainConfig, check_option
from imgclf.configfile import option_keys
from imgclf.errors import EXIT_OK, Stopped, UserError
from imgclf.resolve import refuse_existing_run, resolve, user_values
from imgclf.resolve import resume as resume_run

if TYPE_CHECKING:
    from torch import nn

    from imgclf.predict import Prediction

_ARGUMENTS = ("recipe", "resume", "on_epoch", "config")  # fit's keywords besides the training flags
_TIMING = ("images_per_s", "train_seconds", "epoch_seconds", "time")  # metrics.jsonl fields that vary run to run


def fit(model, data, *, recipe: str = "auto", resume: bool | str | os.PathLike = False,
        on_epoch: Callable[[dict], object] | None = None, config: str | os.PathLike | None = None,
        **options) -> Run:
    """Train `model` on `data` as `imgclf train` does, writing the run folder `out`; return its Run.

    `model`: a model name (anything `--model` takes: `imgclf models`, `timm/NAME`, `FILE.py:ClassName`) or
    an nn.Module object, trained in place (for `imgclf train`'s initial weights, build it right after
    `torch.manual_seed(seed)`). Its class is recorded, never its code: a class defined at the top of a .py
    file of yours is recorded as that file (name and SHA-256, as `--model FILE.py:Class` is), and `load`
    rebuilds it from the file (`model_code=`, given for you in the Run returned here); a class defined in a
    notebook, in the script being run (`__main__`) or in an installed package is recorded as
    `python:ClassName`, and `load` then needs `model=` that class (or an object of it). If its constructor
    takes arguments, pass them as `model_args={...}` too, so that it can be rebuilt.
    `data`: what `--data` takes. `options`: `imgclf train`'s flags by name, without the dashes and with `_`
    for `-` (`epochs=2, lr=0.01, batch_size=64, out="runs/x", precision="fp32", model_args={...}`); None is
    the same as leaving an option out. `recipe`: as `--recipe`. `resume`: True continues the run in `out`,
    a path continues that run folder (as `--resume RUN`); the options given must then agree with the run.
    `on_epoch(record)`: called after every epoch with its metrics.jsonl record; returning True ends the run
    after that epoch, resumably. A run stopped so, or by `stop_after`, says so on stderr and is returned
    with `run.stopped` set; a signal (Ctrl-C, interrupting a notebook's kernel, SIGTERM) saves the run as
    `imgclf train` does and raises imgclf.errors.Stopped. `config`: a configuration file, as
    `imgclf train --config` reads it; `model`, `data` and `options` not None win over its values (model and
    data may then be None). Every bad input is one UserError line."""
    name, network = _network(model)
    cfg = _train_config(user_values(config, _given(name, data, options)), recipe, resume, network)
    if network is not None:
        _check_object_options(cfg, network)
    from imgclf.train import train

    stopped = None
    try:
        train(cfg, resume=bool(resume), model=network, on_epoch=_epoch_hook(on_epoch))
    except Stopped as stop:
        if stop.code != EXIT_OK:  # a signal: whoever sent it wants the program to stop, not to go on
            raise
        print(f"imgclf: {stop}", file=sys.stderr, flush=True)
        stopped = str(stop)
    from imgclf.usercode import parse_code_name

    ref = parse_code_name(cfg.model.name)  # a network from a .py file: the Run rebuilds it from that file
    return Run(Path(cfg.run.out), model_code=ref and ref.path, model=network if ref is None else None,
               stopped=stopped)


def load(path, *, model_code: str | os.PathLike | None = None, trust_changed_code: bool = False,
         model=None) -> Run:
    """Open a run folder (its checkpoints/best.pt, else last.pt) or a checkpoint file as a Run.

    A network from a .py file (`--model FILE.py:Class`) is rebuilt from `model_code`, that file handed over
    again, and only if its SHA-256 is the recorded one or `trust_changed_code` is set (as `--model-code` and
    `--trust-changed-code`); a `python:Class` network (a class of a notebook or a script, trained with
    `fit`) from `model`: that class (built with the run's `model_args` and the data's `num_classes`,
    `in_channels`, `img_size` where its constructor names them) or an object of it, copied. Code is never
    imported by itself. A missing, damaged or foreign file is one UserError line."""
    path = Path(path).expanduser()
    if path.is_dir():
        folder = path
        checkpoint = next((folder / "checkpoints" / n for n in ("best.pt", "last.pt")
                           if (folder / "checkpoints" / n).is_file()), None)
        if checkpoint is None:
            raise UserError(f"{path} is not a run folder: it has no checkpoints/best.pt or checkpoints/last.pt")
    elif path.is_file():
        checkpoint, folder = path, path.parent.parent if path.parent.name == "checkpoints" else None
    else:
        raise UserError(f"no such run folder or checkpoint: {path}")
    if folder is not None and not (folder / "metrics.jsonl").is_file():
        folder = None  # a checkpoint that lies in a checkpoints/ folder of no run
    run = Run(folder, checkpoint=checkpoint, model_code=model_code, trust_changed_code=trust_changed_code)
    run._set_model(model)  # reads the checkpoint: a bad file or a wrong `model` fails here, in one line
    return run


class Run:
    """A training run (its folder) or a lone checkpoint, opened for use: `fit` and `load` return one.

    `folder`: the run folder (None for a lone checkpoint); `checkpoint`: the checkpoint this Run uses, its
    folder's best.pt (else last.pt); `stopped`: why `fit` ended early, else None. The checkpoint is read
    once, when first needed; `metrics` reads the folder's metrics.jsonl at every access."""

    def __init__(self, folder: Path | None, *, checkpoint: Path | None = None, model_code=None,
                 trust_changed_code: bool = False, model=None, stopped: str | None = None):
        self.folder, self._checkpoint, self.stopped = folder, checkpoint, stopped
        self._code = (os.fspath(model_code) if model_code is not None else None, trust_changed_code)
        self._object, self._ckpt, self._model, self._predictors = model, None, None, {}

    def __repr__(self) -> str:
        where = self.folder if self.folder is not None else self.checkpoint
        return f"Run({str(where)!r})"

    @property
    def checkpoint(self) -> Path:
        if self._checkpoint is None:
            found = [self.folder / "checkpoints" / n for n in ("best.pt", "last.pt")]
            self._checkpoint = next((p for p in found if p.is_file()), None)
            if self._checkpoint is None:
                raise UserError(f"{self.folder} has no checkpoint yet: the run stopped before its first epoch ended")
        return self._checkpoint

    @property
    def best(self) -> Path:
        """The best checkpoint: the run folder's checkpoints/best.pt (for a lone checkpoint, that file)."""
        best = self.folder / "checkpoints" / "best.pt" if self.folder is not None else None
        return best if best is not None and best.is_file() else self.checkpoint

    @property
    def metrics(self) -> list[dict]:
        """The run's metrics.jsonl records, one per epoch, oldest first ([] for a lone checkpoint)."""
        path = self.folder / "metrics.jsonl" if self.folder is not None else None
        if path is None or not path.is_file():
            return []
        from imgclf.runs import read_records

        return read_records(path)

    @property
    def classes(self) -> list[str]:
        return list(self._checkpoint_dict()["classes"])

    @property
    def config(self) -> TrainConfig:
        """The run's configuration, as `imgclf train` resolved it (the checkpoint's copy)."""
        return TrainConfig.from_dict(self._checkpoint_dict()["config"])

    @property
    def model(self) -> nn.Module:
        """The network with the checkpoint's weights, in eval mode, on the CPU (built once)."""
        if self._model is None:
            from imgclf.models import model_from_checkpoint

            with self._scope():
                self._model = model_from_checkpoint(self._checkpoint_dict())
        return self._model

    def evaluate(self, data=None, *, split: str | None = None, device: str = "auto") -> dict:
        """`imgclf eval CHECKPOINT --json` as a dict (split, count, loss, accuracy, per-class and macro
        figures, confusion matrix as lists). `data`: by default the run's own `--data`, with its
        `--data-root`, `--val-fraction`, `--labels` and `--cache-dir`; `split` as `--split` (by default the
        test split where there is one beside val, else the held-out one, and all of a plain folder)."""
        from imgclf.config import DataConfig
        from imgclf.evaluate import evaluate_checkpoint, evaluation_summary

        d = self.config.data
        cfg = DataConfig(data=d.data if data is None else os.fspath(data), data_root=d.data_root,
                         val_fraction=d.val_fraction, cache_dir=d.cache_dir, eval_batch_size=d.eval_batch_size,
                         labels=d.labels if data is None else None)
        with self._scope():
            return evaluation_summary(evaluate_checkpoint(self.checkpoint, cfg, split=split, device=device))

    def predict(self, paths, topk: int = 3, *, device: str = "auto", batch_size: int = 64) -> list[Prediction]:
        """`imgclf predict`: a Prediction(path, labels, probs, error) for each picture of `paths` (a path or
        a list of picture files and folders), the `topk` most probable classes first; a file that cannot
        be read has `error` set instead. Probabilities in fp32, as the exported models give them."""
        from imgclf.config import check_number
        from imgclf.predict import Predictor

        if not isinstance(topk, numbers.Integral) or isinstance(topk, bool):
            raise UserError(f"topk must be a whole number, got {topk!r}")
        check_number("topk", topk, 1)
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if device not in self._predictors:
            with self._scope():
                self._predictors[device] = Predictor(self._checkpoint_dict(), device=device)
        return self._predictors[device].predict([os.fspath(p) for p in paths], topk=topk, batch_size=batch_size)

    def export(self, fmt: str, out=None, *, int8: bool = False, calibration_data=None, eval_data=None,
               calibration_size: int | None = None, force: bool = False) -> Path:
        """`imgclf export --format FMT`: write the checkpoint as onnx, openvino, torchscript or safetensors to
        `out` (default beside the checkpoint, e.g. best.onnx), self-checked; `int8=True` (onnx, openvino) as
        `--int8`; `force=True` as `--force` (replace an existing file, never a checkpoint); return the file written."""
        from imgclf.export import export_checkpoint

        with self._scope():
            return export_checkpoint(self.checkpoint, fmt, out=out, int8=int8, calibration_data=calibration_data,
                                     eval_data=eval_data, calibration_size=calibration_size, force=force).path

    # ------------------------------------------------------------ loading the network

    def _checkpoint_dict(self) -> dict:
        if self._ckpt is None:
            from imgclf.checkpoint import load_checkpoint

            self._ckpt = load_checkpoint(self.checkpoint)
        return self._ckpt

    def _set_model(self, model) -> None:
        """Check and keep `load`'s `model=`: only for a `python:Class` checkpoint; a class is built here."""
        ckpt = self._checkpoint_dict()
        name = ckpt["model"]["name"]
        if model is None:
            return
        if not name.startswith(_python_prefix()):
            raise UserError(f"model= is for a network of a notebook or script (python:Class); this checkpoint's "
                            f"is {name}" + (", rebuilt with model_code=" if ckpt["model"].get("code") else ""))
        from torch import nn

        if isinstance(model, type) and issubclass(model, nn.Module):
            model = _instantiate(model, ckpt)
        elif not isinstance(model, nn.Module):
            raise UserError(f"model= must be an nn.Module class or object, got {type(model).__name__}")
        self._object = model

    def _scope(self):
        """The code (`model_code`) or the object (`model`) every checkpoint load of this Run builds from."""
        import contextlib

        from imgclf import usercode

        stack = contextlib.ExitStack()
        stack.enter_context(usercode.model_code_scope(*self._code))
        if self._object is not None:
            stack.enter_context(usercode.model_object_scope(self._object))
        return stack


def same_figures(record: dict) -> dict:
    """A metrics.jsonl record without its timing fields: what two runs with the same seed share exactly."""
    return {k: v for k, v in record.items() if k not in _TIMING}


# ---------------------------------------------------------------- fit's pieces

def _given(name: str, data, options: dict) -> dict[tuple[str, str], object]:
    """(section, field) -> value of what `imgclf train --model NAME --data DATA --flag value...` sets, each
    value checked by its option's one rule (config.check_option)."""
    known, given = option_keys(), {}
    for key, value in {"model": name, "data": data, **options}.items():
        if key not in known:
            raise UserError(_unknown_option(key, known))
        section, f, _ = known[key]
        given[section, f.name] = check_option(f, value, what=f"{key}={value!r}")
    return given


def _unknown_option(key: str, known: dict) -> str:
    """One line naming the unknown keyword and the closest valid one."""
    by_field = {f.name: keyword for keyword, (_, f, _) in known.items() if keyword not in ("model", "data")}
    close = [by_field[key]] if key in by_field else difflib.get_close_matches(key, [*known, *_ARGUMENTS], n=1)
    hint = f"did you mean {close[0]}=?" if close else "the options are imgclf train's flags"
    return (f"fit() has no option {key!r}: {hint} (options are the flags of `imgclf train --help` without the "
            f"dashes, - written _)")


def _train_config(given: dict, recipe: str, resume, network) -> TrainConfig:
    """What `imgclf train` makes of the same flags (cli.train_config): a new run's configuration, refused
    when `out` already holds a run; or with `resume`, the run's own configuration with the options given."""
    if not resume:
        cfg = resolve(given, recipe=recipe)
        refuse_existing_run(cfg.run.out, "continue it with resume=True", "out=")
        return cfg
    folder = (given.get(("run", "out")) or RunConfig().out) if resume is True else os.fspath(resume)
    if network is not None:  # the object's class must be the run's; its recorded name is kept
        given = {**given, ("model", "name"): None}
    cfg = resume_run(folder, given, recipe=recipe, check_code=False)
    if network is not None:
        recorded, mine = cfg.model.name.rpartition(":")[2], type(network).__qualname__
        if recorded != mine:
            raise UserError(f"{folder} trained {cfg.model.name}, but model is a {mine}; resume it with an "
                            f"object of the same class")
    return cfg


def _check_object_options(cfg: TrainConfig, network) -> None:
    """Refuse the model options that build or prepare a named model (pretrained, freeze_backbone...) when fit
    is given an object: they would be ignored. Only model_args (recorded, to rebuild it) goes with an object."""
    defaults = ModelConfig()
    for key, (section, f, _) in option_keys().items():
        if section == "model" and key not in ("model", "model_args") and \
                getattr(cfg.model, f.name) != getattr(defaults, f.name):
            raise UserError(f"{key}= is for a model that fit builds by name; prepare your "
                            f"{type(network).__name__} object yourself before fit (weights, requires_grad)")


def _network(model) -> tuple[str, object]:
    """(cfg.model.name, the nn.Module object or None) for fit's `model` (None: the configuration's)."""
    if model is None or isinstance(model, str):
        return model, None
    from torch import nn

    if isinstance(model, type) and issubclass(model, nn.Module):
        raise UserError(f"model is the class {model.__name__}; pass an object of it: {model.__name__}()")
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a model name (`imgclf models` lists them) or an nn.Module object, "
                        f"got {type(model).__name__}")
    return code_name(type(model)), model


def code_name(cls: type) -> str:
    """The model name a run records for an object of `cls`: '/abs/path/file.py:Class' when the class is
    defined at the top level of a .py file of the user's (rebuilt from that file, checked against its
    SHA-256, as `--model FILE.py:Class`); 'python:Class' for a class of a notebook, of the script being
    run (__main__, which must not run again), nested in a function, or of an installed package."""
    module = sys.modules.get(cls.__module__) if cls.__module__ != "__main__" else None
    file = getattr(module, "__file__", None)
    if file and file.endswith(".py") and getattr(module, cls.__qualname__, None) is cls and not _installed(file):
        return f"{Path(file).resolve()}:{cls.__qualname__}"
    return _python_prefix() + cls.__qualname__


def _installed(file: str) -> bool:
    """Whether `file` belongs to Python itself or to an installed package (not to the user's own code)."""
    path = Path(file).resolve()
    if {"site-packages", "dist-packages"} & set(path.parts):
        return True
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return any(path.is_relative_to(Path(root).resolve()) for root in roots)


def _python_prefix() -> str:
    from imgclf.usercode import PYTHON_PREFIX

    return PYTHON_PREFIX


def _epoch_hook(on_epoch) -> Callable[[dict], None] | None:
    """train's on_epoch: the user's function, given a copy of each record; True from it stops the run."""
    if on_epoch is None:
        return None
    if not callable(on_epoch):
        raise UserError(f"on_epoch must be a function of one metrics record, got {type(on_epoch).__name__}")

    def hook(record: dict) -> None:
        if on_epoch(dict(record)) is True:
            raise Stopped(f"stopped by on_epoch after epoch {record['epoch']}; continue with "
                          f"imgclf.fit(..., resume=True)", EXIT_OK)

    return hook


def _instantiate(cls: type, ckpt: dict):
    """An object of `cls` for `ckpt`: built with the run's model_args, plus num_classes / in_channels /
    img_size where its constructor names them (as a FILE.py:Class network is built); one line on failure."""
    import inspect

    from imgclf import usercode

    kwargs = usercode.parse_model_args((ckpt.get("config", {}).get("model") or {}).get("args"))
    inp = ckpt["input"]
    given = {"num_classes": len(ckpt["classes"]), "in_channels": inp["channels"], "img_size": inp["size"]}
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs.update({k: v for k, v in given.items() if k in params and k not in kwargs})
    try:
        return cls(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's constructor: its error, in one line
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise UserError(f"{cls.__name__}({shown}) failed: {usercode.first_line(err)}; pass an object "
                        f"(model={cls.__name__}(...)) instead") from None
