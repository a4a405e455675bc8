"""The user's own network (notes 15-21): `--model path/to/net.py:ClassName`, built from a Python file.

The file is imported by path when a run is *started* with it, because the user named it. A checkpoint
records only the file's name, its SHA-256, the class and its arguments (`code_identity`), never the code;
loading such a checkpoint (predict, eval, export, resume) imports nothing by itself: the code must be handed
over again (`--model-code FILE`), and a file whose hash differs is refused unless the user says they trust
it (`verify_code`). `model_code_scope` hands those two choices to every checkpoint load inside it, so that
a command line can set them once for all the library calls it makes.

The hash covers that one file: modules it imports are not checked (and its own folder is not put on
sys.path), so a network that should be verifiable lives in one file beside installed packages.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgclf.errors import UserError, shown

# The model name of a network class that no .py file of the user's holds (a notebook's, a script's __main__'s),
# trained with imgclf.fit: 'python:ClassName'. Its checkpoints are loaded in Python, with the class handed over.
PYTHON_PREFIX = "python:"
# Constructor parameters that imgclf fills from the data when the class declares them (and --model-args does not).
DATA_PARAMETERS = ("num_classes", "in_channels", "img_size")


@dataclass(frozen=True)
class CodeRef:
    """A network named as FILE.py:ClassName."""

    path: Path
    class_name: str

    @property
    def name(self) -> str:
        return f"{self.path}:{self.class_name}"


def parse_code_name(name: str) -> CodeRef | None:
    """'dir/net.py:Net' -> CodeRef; None for any name that does not end in `.py:Something` (a model name)."""
    if name.endswith(".py"):
        raise UserError(f"--model {name}: name the class too, as {name}:ClassName")
    file, sep, class_name = name.rpartition(":")  # rpartition: a Windows drive letter also has a colon
    if not sep or not file.endswith(".py"):
        return None
    if not class_name.isidentifier():
        raise UserError(f"--model {name}: {class_name!r} is not a Python class name; write FILE.py:ClassName")
    return CodeRef(Path(file).expanduser(), class_name)


def parse_model_args(args: str | dict | None) -> dict:
    """--model-args text (a JSON object) or an already parsed dict -> keyword arguments; {} for None."""
    if args is None or isinstance(args, dict):
        return dict(args or {})
    try:
        parsed = json.loads(args)
    except json.JSONDecodeError as err:
        raise UserError(f"--model-args is not valid JSON ({err.msg} at character {err.pos}); write an object "
                        f"such as '{{\"width\": 64}}'") from None
    if not isinstance(parsed, dict):
        raise UserError(f"--model-args must be a JSON object of keyword arguments such as '{{\"width\": 64}}', "
                        f"got {type(parsed).__name__}")
    return parsed


def file_sha256(path: Path) -> str:
    return hashlib.sha256(_read(path)).hexdigest()


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(f"no such file: {path} (the network's code, FILE.py:ClassName)")
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None


# resolved path -> sha256 of the code last imported from it in this process: what a checkpoint records
_IMPORTED: dict[str, str] = {}
# (resolved path, sha256) -> module: each version of a file is executed once per process
_MODULES: dict[tuple[str, str], object] = {}


def load_class(ref: CodeRef, *, expected_sha256: str | None = None) -> type[nn.Module]:
    """Import `ref.path` (hashing and executing the same bytes) and return its class `ref.class_name`.

    With `expected_sha256`, code whose hash differs is refused (the file changed after it was checked)."""
    data = _read(ref.path)
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise UserError(f"{ref.path} changed while it was being loaded; run the command again")
    key = (str(ref.path.resolve()), digest)
    module = _MODULES.get(key) or _execute(ref.path, data, digest)
    _MODULES[key], _IMPORTED[key[0]] = module, digest
    cls = getattr(module, ref.class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        found = sorted(n for n, v in vars(module).items()
                       if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == module.__name__)
        what = "no class" if cls is None else "something that is not an nn.Module class"
        raise UserError(f"{shown(ref.path)} has {what} named {shown(ref.class_name)}; its nn.Module classes: "
                        f"{', '.join(found) or 'none'}")
    return cls


def _execute(path: Path, data: bytes, digest: str):
    """Run `data` (the bytes read from `path`) as a fresh module with a name of its own."""
    stem = re.sub(r"\W", "_", path.stem)
    name = f"imgclf_user_code_{stem}_{digest[:16]}"  # unique per content: two versions never collide
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, typing and pickling look a class's module up here
    try:
        exec(compile(data, str(path), "exec"), module.__dict__)  # noqa: S102 - the user named this file
    except Exception as err:  # noqa: BLE001 - any error of the user's code: one line, with where it happened
        del sys.modules[name]
        raise UserError(f"importing {path} failed: {_describe(err, path)}") from None
    return module


def _describe(err: BaseException, path: Path) -> str:
    """'SyntaxError: invalid syntax (line 3)': the error and the line of `path` where it was raised."""
    line = getattr(err, "lineno", None) if isinstance(err, SyntaxError) else None
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    where = f" (line {line} of {path.name})" if line else ""
    return f"{first_line(err)}{where}"


def first_line(err: BaseException) -> str:
    """'TypeError: the first line of the message' (the type alone when there is no message)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def build_user_model(ref: CodeRef, args: str | dict | None, *, num_classes: int, in_channels: int, img_size: int,
                     expected_sha256: str | None = None) -> nn.Module:
    """Instantiate `ref`'s class with `args` (plus num_classes / in_channels / img_size where its constructor
    names them and `args` does not) and check on one blank picture that it maps (1, C, S, S) to
    (1, num_classes). Every failure is one UserError line."""
    cls = load_class(ref, expected_sha256=expected_sha256)
    kwargs = parse_model_args(args)
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    given = dict(num_classes=num_classes, in_channels=in_channels, img_size=img_size)
    kwargs.update({k: v for k, v in given.items() if k in params and k not in kwargs})
    call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    try:
        model = cls(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's constructor: its error, in one line
        raise UserError(f"{ref.class_name}({call}) failed: {_describe(err, ref.path)}; its arguments come from "
                        f"--model-args '{{...}}'") from None
    check_output(model, f"{ref.class_name}({call})", num_classes=num_classes, in_channels=in_channels,
                 img_size=img_size)
    return model


def check_output(model: nn.Module, what: str, *, num_classes: int, in_channels: int, img_size: int) -> None:
    """Run `model` once in eval mode on a blank (1, C, S, S) batch; raise one UserError line unless it returns
    a (1, num_classes) tensor. The model's mode is restored afterwards."""
    was_training = model.training
    x = torch.zeros(1, in_channels, img_size, img_size)
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as err:  # noqa: BLE001 - whatever the network raises on this input
        raise UserError(f"{what} cannot take {in_channels}x{img_size}x{img_size} pictures ({first_line(err)}); "
                        f"choose another --img-size, or a network built for it") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise UserError(f"{what} returns a {type(out).__name__} in eval mode; it must return one tensor of "
                        f"logits, (N, classes)")
    if tuple(out.shape) != (1, num_classes):
        hint = ("a constructor parameter `num_classes` is filled in by imgclf" if out.ndim == 2 else
                "flatten the features before the last layer")
        raise UserError(f"{what} returns logits of shape {tuple(out.shape)} for one picture, but the data has "
                        f"{num_classes} classes: it must return (1, {num_classes}); {hint}, or use --model-args")


def code_identity(name: str, args: str | dict | None) -> dict | None:
    """What a checkpoint records about FILE.py:Class `name`: file name, SHA-256 (of the code imported in this
    process, else of the file now), class and constructor arguments; None for a model name."""
    ref = parse_code_name(name)
    if ref is None:
        return None
    digest = _IMPORTED.get(str(ref.path.resolve())) or file_sha256(ref.path)
    return {"file": ref.path.name, "sha256": digest, "class": ref.class_name, "args": parse_model_args(args)}


_SCOPE: contextvars.ContextVar[tuple[str | None, bool]] = contextvars.ContextVar("imgclf_model_code",
                                                                                  default=(None, False))


@contextlib.contextmanager
def model_code_scope(model_code: str | None, trust_changed_code: bool = False) -> Iterator[None]:
    """Within the block, checkpoint loads that are not told otherwise use `model_code` (the .py file of a
    checkpoint's network) and `trust_changed_code` (accept that file although its hash differs)."""
    token = _SCOPE.set((model_code, trust_changed_code))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def verify_code(code: dict, model_code: str | None = None,
                trust_changed_code: bool | None = None) -> tuple[CodeRef, str]:
    """The file to build a checkpoint's network from, and the SHA-256 its code must have when imported.

    `code` is the checkpoint's record (`code_identity`); `model_code`/`trust_changed_code` default to those
    of the enclosing `model_code_scope`. Raises one UserError line when no file is given (code is never
    imported by itself), or when its SHA-256 differs from the recorded one and `trust_changed_code` is not set."""
    scoped_code, scoped_trust = _SCOPE.get()
    model_code = model_code if model_code is not None else scoped_code
    trust = trust_changed_code if trust_changed_code is not None else scoped_trust
    if not model_code:
        raise UserError(f"this checkpoint's network is class {code['class']} of {code['file']} (sha256 "
                        f"{code['sha256'][:12]}...), and a checkpoint holds no code: pass --model-code "
                        f"path/to/{code['file']} to run it (imgclf never imports code by itself)")
    path = Path(model_code).expanduser()
    digest = file_sha256(path)
    if digest != code["sha256"] and not trust:
        raise UserError(f"refused --model-code {path}: its sha256 {digest[:12]}... differs from that of the "
                        f"{code['file']} the checkpoint was trained with ({code['sha256'][:12]}...); pass "
                        f"--trust-changed-code if you changed it and trust it")
    return CodeRef(path, code["class"]), digest


def check_pinned_code(name: str, sha256: str, *, source: str, trust: bool = False) -> None:
    """UserError, one line, when the file of the FILE.py:Class network `name` is not the code whose SHA-256
    `source` (a run's config.yaml) recorded, unless `trust` (--trust-changed-code)."""
    ref = parse_code_name(name)
    digest = file_sha256(ref.path)
    if digest != sha256 and not trust:
        raise UserError(f"refused {shown(ref.path)}: its sha256 {digest[:12]}... differs from the "
                        f"{sha256[:12]}... that {shown(source)} records for the run it describes; pass "
                        f"--trust-changed-code if you changed it and trust it")


_OBJECT: contextvars.ContextVar[nn.Module | None] = contextvars.ContextVar("imgclf_model_object", default=None)


@contextlib.contextmanager
def model_object_scope(model: nn.Module | None) -> Iterator[None]:
    """Within the block, loads of a checkpoint whose network is `python:Class` build it as a copy of `model`,
    the network object handed over in Python (`imgclf.load(..., model=...)`, the Run that `imgclf.fit` returns)."""
    token = _OBJECT.set(model)
    try:
        yield
    finally:
        _OBJECT.reset(token)


def python_model(name: str) -> nn.Module:
    """A copy, on the CPU, of the object of the enclosing `model_object_scope`, for the checkpoint weights of
    the network `name` ('python:Class'); one UserError line when there is none: no file holds such a class."""
    model = _OBJECT.get()
    if model is None:
        short = name[len(PYTHON_PREFIX):].rpartition(".")[2]
        raise UserError(f"this checkpoint's network is class {name[len(PYTHON_PREFIX):]} of a notebook or script, "
                        f"which no .py file holds; load it in Python with the class: imgclf.load(CHECKPOINT, "
                        f"model={short})")
    return copy.deepcopy(model).cpu()
