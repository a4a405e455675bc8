"""Checkpoints (note 25): atomic saves, safe loads, self-describing contents.

A checkpoint is a plain dict of tensors and plain values; it is always read with
`torch.load(path, weights_only=True)`, which refuses anything that could run code when unpickled.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import re
import stat
import warnings
import zipfile
from pathlib import Path

import torch

from imgclf import __version__
from imgclf.calibration import MAX_T, MIN_T
from imgclf.config import MAX_CHANNELS, MAX_SIDE
from imgclf.errors import UserError, shown
from imgclf.files import atomic_write
from imgclf.transforms import PLAIN, Decoding, decoding_problem
from imgclf.usercode import code_identity

FORMAT = "imgclf-checkpoint"
FORMAT_VERSION = 1
PREFIXES = ("_orig_mod.", "module.")  # left by torch.compile and DistributedDataParallel
MAX_PICKLE_BYTES = 256 << 20  # a checkpoint's pickle (its tensors are stored beside it): names and numbers
MAX_CLASSES = 100_000
MAX_NAME = 1_000  # characters of a class or model name
MAX_VALUES = 1_000_000  # values in a checkpoint, each counted every time it is reached (shared references too)
MAX_DEPTH = 64  # nesting of lists and dicts


def build_checkpoint(*, model_name: str, classes: list[str], channels: int, size: int, mean, std, config: dict,
                     state: dict, task: dict | None = None, decoding: Decoding = PLAIN,
                     temperature: float | None = None, depth: int = 8) -> dict:
    """The self-describing checkpoint: what the network is, what it classifies, how its input is prepared,
    the run's configuration, and `state` (`engine.TrainState.state_dict()`: weights, optimizer, progress).

    A network from the user's .py file (`--model FILE.py:Class`) is described by `model.code`: the file's
    name and SHA-256, the class and its constructor arguments (`usercode.code_identity`), never the code.
    `task`: the task's entries (`tasks.Task.checkpoint_entries`: "task" and a multi-label run's
    "thresholds"; none for single-label, whose checkpoints name no task). `decoding`: how its pictures are
    resized and cropped (transforms.Decoding, a pretrained network's input contract): "input" then holds its
    interpolation, crop_pct and resize_side (the shorter side before the crop); a PLAIN one adds nothing, so that
    a record without them (and every older checkpoint) means imgclf's own bilinear resize to the side.
    `temperature`: a single-label model's fitted temperature (imgclf.calibration), stored only when given
    (absent means 1). `depth`: bits a sample of the pictures, 8 or 16 (imgclf.bands; a checkpoint without it
    is 8)."""
    model = {"name": model_name, "num_classes": len(classes), "in_channels": channels, "img_size": size}
    code = code_identity(model_name, (config.get("model") or {}).get("args"))
    if code is not None:
        model["code"] = code
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "imgclf_version": __version__,
        "model": model,
        "classes": list(classes),
        "input": {"channels": channels, "size": size, "depth": depth, "mean": list(mean), "std": list(std),
                  **decoding.record(size)},
        "config": config, **state, **(task or {}),
        **({"temperature": float(temperature)} if temperature is not None else {}),
    }


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def safe_load(path) -> object:
    """torch.load with weights_only=True; every failure becomes one UserError line. Before torch reads it,
    the file must be a regular file, and its pickle may not call what makes memory from a number
    (`bytearray(N)`, `torch.FloatTensor(N)`): a small hostile file may not take gigabytes."""
    path = Path(path).expanduser()
    _check_regular_file(path)
    _refuse_allocating_calls(path)
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols; the outcome is reported below
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests turning weights_only off; we never do, so only its cause is kept
        # torch words it "Unsupported global: GLOBAL x.y", or for a blocked module "unsupported GLOBAL x.y whose ..."
        found = re.search(r"(?i)unsupported (?:global: )?GLOBAL ([\w.]+)", str(err))
        if found:
            raise _refused(path, found.group(1)) from None
        cause = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        detail = cause.group(1).strip().splitlines()[0][:200] if cause else type(err).__name__
        raise UserError(f"cannot read {shown(path)}: not a PyTorch weights file, or damaged ({shown(detail)})") from None
    except MemoryError:
        raise UserError(f"cannot read {shown(path)}: it asks for more memory than there is (a damaged or hostile "
                        f"file)") from None
    except Exception as err:  # noqa: BLE001 - torch's unpickler raises anything on bytes that are not a pickle
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        detail = first if isinstance(err, RuntimeError | OSError | ValueError) and first else \
            f"{type(err).__name__}{': ' + first if first else ''}"
        raise UserError(f"cannot read {shown(path)}: not a PyTorch weights file, or truncated ({shown(detail)})") from None


def _refused(path: Path, call: str) -> UserError:
    return UserError(f"refused to load {shown(path)}: unpickling it would call {call}, and a checkpoint holds only "
                     f"tensors and plain values (a hostile file, or one saved from Python objects: save "
                     f"model.state_dict() instead); nothing in it was run")


def _check_regular_file(path: Path) -> None:
    """One UserError line unless `path` is a regular file, saying what it is instead."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"no such file: {shown(path)}") from None
    except OSError as err:
        raise UserError(f"cannot read {shown(path)}: {err.strerror or err}") from None
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISCHR: "a device",
             stat.S_ISBLK: "a device", stat.S_ISSOCK: "a socket"}
    for test, kind in kinds.items():
        if test(mode):
            raise UserError(f"{shown(path)} is {kind}, not a checkpoint file; give the path of a .pt file")


def _scan_pickle(path: Path, stream) -> None:
    """Refuse the pickle in `stream` if it calls an allocating callable (GLOBAL), or by the STACK_GLOBAL of
    protocols 4 and 5 (which torch.save never writes, and torch's loader does not read) anything but torch's
    own: Python's pickles of objects, such as the classic os.system one, are refused by name; a Python pickle
    of tensors is one line saying so. Strings pushed and memoized are followed loosely, to name the callables."""
    pushed, memo, stacked = [], {}, []  # what the last opcodes pushed (strings, else None); the memo's strings
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST") and _ALLOCATING.match(str(arg)):
            raise _refused(path, str(arg).replace("__builtin__ ", "builtins ").replace(" ", "."))
        if name == "STACK_GLOBAL":
            stacked.append(".".join(str(part or "?") for part in pushed[-2:]))
            if not _BENIGN.match(stacked[-1]):
                raise _refused(path, stacked[-1])
        if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            memo[len(memo) if name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif name not in ("PROTO", "FRAME", "STOP"):
            pushed.append(arg if isinstance(arg, str) and ("UNICODE" in name or "STRING" in name) else None)
        del pushed[:-2]
    if stacked:
        raise UserError(f"cannot read {shown(path)}: it was written by Python's pickle, not by torch.save; save "
                        f"the checkpoint with torch.save")


_BENIGN = re.compile(r"^torch(\.\w+)*$|^collections\.(OrderedDict|Counter)$|^builtins\.(set|complex)$|"
                     r"^_codecs\.encode$")  # what torch's loader allows by default (it checks GLOBALs itself)

# What a weights-only pickle may name but an imgclf checkpoint never calls: each makes memory from a number
# written in the file (bytearray(N) zero-fills N bytes; the legacy tensor classes allocate N elements).
_ALLOCATING = re.compile(r"^(builtins|__builtin__) bytearray$|^torch(\.cuda)? \w*Tensor$")


def _refuse_allocating_calls(path: Path) -> None:
    """Read the pickles of `path` (the zip format's data.pkl, or the legacy format's first five) opcode by
    opcode, building nothing, and refuse a file that names an allocating callable. Files that are no pickle
    are left to torch.load to report."""
    try:
        with open(path, "rb") as f:
            if zipfile.is_zipfile(f):
                with zipfile.ZipFile(f) as archive:
                    names = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                    if not names or archive.getinfo(names[0]).file_size > MAX_PICKLE_BYTES:
                        return
                    streams = [io.BytesIO(archive.read(names[0]))]
            else:
                f.seek(0)
                streams = [f] * 5  # legacy: magic number, protocol, system information, the object, storage keys
            for stream in streams:
                _scan_pickle(path, stream)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - not a pickle, or a damaged one: torch.load says so in its turn
        return


def strip_prefixes(state: dict) -> dict:
    """Remove `_orig_mod.` and `module.` wherever they lead a key (in any order, any number of times)."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def load_checkpoint(path) -> dict:
    """Load an imgclf checkpoint, checking that it is one, whole and sound, before anything is built from it:
    its structure and types as `build_checkpoint` writes them (sizes bounded, class names a list of short
    strings, no value reached more than MAX_VALUES times through shared references), and finite weights.
    Every failure is one UserError line."""
    ckpt = safe_load(path)
    name = shown(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{name} is not an imgclf checkpoint (plain weights go to --pretrained)")
    version = ckpt.get("format_version", 0)
    if type(version) is not int:
        raise UserError(f"{name} is a damaged imgclf checkpoint: format_version is {_kind(version)}, not a number")
    if version > FORMAT_VERSION:
        raise UserError(f"{name} was written by a newer imgclf ({str(ckpt.get('imgclf_version'))[:40]}); upgrade "
                        f"imgclf")
    problem = _schema_problem(ckpt) or _walk_problem(ckpt)
    if problem:
        raise UserError(f"{name} is a damaged or hand-made imgclf checkpoint: {problem}; use another checkpoint "
                        f"of the run, or train again")
    for part in ("state_dict", "ema_state_dict"):
        key = non_finite(ckpt.get(part) or {})
        if key is not None:
            raise UserError(f"{name} holds weights that are not finite ({part} {shown(key)} has NaN or infinite "
                            f"values): the run that saved it diverged; use an earlier checkpoint, or train again "
                            f"with a lower --lr")
    ckpt["state_dict"] = strip_prefixes(ckpt["state_dict"])
    # as training names them (folder names and --labels escaped by `shown`): a control character in a
    # hand-made or older checkpoint's class name never reaches the terminal, whichever command prints it
    ckpt["classes"] = [shown(c) for c in ckpt["classes"]]
    return ckpt


def non_finite(state: dict) -> str | None:
    """The name of the first floating-point tensor of `state` with a NaN or infinite value, or None."""
    for key, value in state.items():
        floating = isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())
        if floating and not bool(torch.isfinite(value).all()):
            return str(key)
    return None


def _walk_problem(ckpt: dict) -> str | None:
    """What makes `ckpt` too large to handle as a tree (each value counted every time it is reached, so a
    "billion laughs" of shared references ends at MAX_VALUES), or a tensor claiming more elements than its
    storage holds (a broadcast view that would take memory once used); None if nothing."""
    stack, count = [(ckpt, 0)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES or depth > MAX_DEPTH:
            return (f"it holds more than {MAX_VALUES:,} values" if count > MAX_VALUES else
                    f"it nests lists and dicts more than {MAX_DEPTH} deep") + " (shared references repeated?)"
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, list | tuple | set | frozenset):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, bytes | bytearray | str) and len(value) > MAX_PICKLE_BYTES // 16:
            return f"it holds a {type(value).__name__} of {len(value):,} elements"
        elif isinstance(value, torch.Tensor) and (value.layout != torch.strided or value.device.type != "cpu"):
            return f"it holds a {value.layout} tensor on {value.device}, where weights are dense tensors"
        elif isinstance(value, torch.Tensor) and value.numel() * value.element_size() > \
                value.untyped_storage().nbytes():
            return f"a tensor of shape {tuple(value.shape)} claims more elements than its storage holds"
    return None


def _schema_problem(ckpt: dict) -> str | None:
    """What in `ckpt` is not as `build_checkpoint` writes it (the parts every command uses), or None."""
    model, classes, inp = ckpt.get("model"), ckpt.get("classes"), ckpt.get("input")
    if not isinstance(model, dict) or not _short_text(model.get("name")):
        return f"model is {_kind(model)}, not a description with a name of at most {MAX_NAME} characters"
    code = model.get("code")
    if code is not None and not (isinstance(code, dict) and all(_short_text(code.get(k)) for k in ("file", "class"))
                                 and re.fullmatch(r"[0-9a-f]{64}", str(code.get("sha256")))
                                 and isinstance(code.get("args"), dict | None)):
        return f"model code is {_kind(code)}, not the record of a .py file (file, sha256, class, args)"
    if not isinstance(classes, list) or not 0 < len(classes) <= MAX_CLASSES or \
            not all(_short_text(c) for c in classes):
        return (f"classes is {_kind(classes)}, not a list of 1 to {MAX_CLASSES:,} names of at most {MAX_NAME} "
                f"characters")
    if not isinstance(inp, dict):
        return f"input is {_kind(inp)}, not a description of the input"
    channels, size = inp.get("channels"), inp.get("size")
    if not _whole(channels, 1, MAX_CHANNELS) or not _whole(size, 1, MAX_SIDE):
        return (f"input channels {_kind(channels)} and size {_kind(size)} are not numbers of 1 to {MAX_CHANNELS} "
                f"and 1 to {MAX_SIDE}")
    if type(inp.get("depth", 8)) is not int or inp.get("depth", 8) not in (8, 16):  # the type first: a tensor
        return f"input depth {_kind(inp.get('depth'))} is not 8 or 16 bits"
    for part in ("mean", "std"):
        values = inp.get(part)
        if not isinstance(values, list | tuple) or len(values) != channels or not all(
                _real(v) and math.isfinite(v) and (part == "mean" or v > 0) for v in values):
            return f"input {part} is {_kind(values)}, not {channels} finite numbers"
    problem = decoding_problem(inp)
    if problem:
        return problem
    for key, value in (("num_classes", len(classes)), ("in_channels", channels)):
        if key in model and (type(model[key]) is not int or model[key] != value):
            return f"model {key} {_kind(model[key])} disagrees with the {value} of its classes and input"
    for part in ("state_dict", "ema_state_dict"):
        weights = ckpt.get(part)
        if part == "ema_state_dict" and weights is None:
            continue
        if not isinstance(weights, dict) or not weights or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
            return f"{part} is {_kind(weights)}, not a dict of named tensors"
    if not isinstance(ckpt.get("config", {}), dict):
        return f"config is {_kind(ckpt.get('config'))}, not a dict"
    return _calibration_problem(ckpt)


def _calibration_problem(ckpt: dict) -> str | None:
    """What is wrong with the optional "temperature" and "reject_below" entries (imgclf.calibration), or None."""
    t, p = ckpt.get("temperature", 1.0), ckpt.get("reject_below", 0.0)
    if not (_real(t) and MIN_T <= t <= MAX_T):
        return f"temperature is {_kind(t)}, not a number in [{MIN_T:g}, {MAX_T:g}]"
    if not (_real(p) and 0 <= p <= 1):
        return f"reject_below is {_kind(p)}, not a probability"
    return None


def _kind(value) -> str:
    """A short, one-line description of `value` for a message: small numbers and strings as they are."""
    if isinstance(value, bool) or value is None or (isinstance(value, int | float) and abs(value) < 1e12):
        return repr(value)
    if isinstance(value, str) and len(value) <= 40:
        return repr(value)
    size = f" of {len(value):,}" if isinstance(value, list | dict | tuple | str) else ""
    return f"a {type(value).__name__}{size}"


def _short_text(value) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME


def _whole(value, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
