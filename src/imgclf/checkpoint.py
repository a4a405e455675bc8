"""Checkpoints (note 25): atomic saves, safe loads, self-describing contents.

A checkpoint is a plain dict of tensors and plain values; it is always read with
`torch.load(path, weights_only=True)`, which refuses anything that could run code when unpickled.
"""

from __future__ import annotations

import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path

import torch

from imgclf import __version__
from imgclf.errors import UserError
from imgclf.files import atomic_write
from imgclf.usercode import code_identity

FORMAT = "imgclf-checkpoint"
FORMAT_VERSION = 1
PREFIXES = ("_orig_mod.", "module.")  # left by torch.compile and DistributedDataParallel


def build_checkpoint(*, model_name: str, classes: list[str], channels: int, size: int, mean, std, config: dict,
                     state: dict) -> dict:
    """The self-describing checkpoint: what the network is, what it classifies, how its input is prepared,
    the run's configuration, and `state` (`engine.TrainState.state_dict()`: weights, optimizer, progress).

    A network from the user's .py file (`--model FILE.py:Class`) is described by `model.code`: the file's
    name and SHA-256, the class and its constructor arguments (`usercode.code_identity`), never the code."""
    model = {"name": model_name, "num_classes": len(classes), "in_channels": channels, "img_size": size}
    code = code_identity(model_name, (config.get("model") or {}).get("args"))
    if code is not None:
        model["code"] = code
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "imgclf_version": __version__,
        "model": model,
        "classes": list(classes),
        "input": {"channels": channels, "size": size, "mean": list(mean), "std": list(std)},
        "config": config, **state,
    }


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def safe_load(path) -> object:
    """torch.load with weights_only=True; every failure becomes one UserError line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols; the outcome is reported below
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests turning weights_only off; we never do, so only its cause is kept
        # torch words it "Unsupported global: GLOBAL x.y", or for a blocked module "unsupported GLOBAL x.y whose ..."
        found = re.search(r"(?i)unsupported (?:global: )?GLOBAL ([\w.]+)", str(err))
        if found:
            raise UserError(f"refused to load {path}: unpickling it would call {found.group(1)}, and a checkpoint "
                            f"holds only tensors and plain values (a hostile file, or one saved from Python objects: "
                            f"save model.state_dict() instead); nothing in it was run") from None
        cause = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        detail = cause.group(1).strip()[:200] if cause else type(err).__name__
        raise UserError(f"cannot read {path}: not a PyTorch weights file, or damaged ({detail})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, AssertionError, struct.error) as err:  # what torch's unpickler raises on bytes that are not a pickle
        first = str(err).splitlines()[0][:200] if str(err).strip() else ""
        detail = first if isinstance(err, RuntimeError | OSError | ValueError) and first else \
            f"{type(err).__name__}{': ' + first if first else ''}"
        raise UserError(f"cannot read {path}: not a PyTorch weights file, or truncated ({detail})") from None


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
    """Load an imgclf checkpoint, checking that it is one."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not an imgclf checkpoint (plain weights go to --pretrained)")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer imgclf ({ckpt.get('imgclf_version')}); upgrade imgclf")
    ckpt["state_dict"] = strip_prefixes(ckpt["state_dict"])
    return ckpt
