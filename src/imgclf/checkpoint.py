"""Checkpoints (note 25): atomic saves, safe loads, self-describing contents.

A checkpoint is a plain dict of tensors and plain values; it is always read with
`torch.load(path, weights_only=True)`, which refuses anything that could run code when unpickled.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from imgclf.errors import UserError

FORMAT = "imgclf-checkpoint"
FORMAT_VERSION = 1
PREFIXES = ("_orig_mod.", "module.")  # left by torch.compile and DistributedDataParallel


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)  # mkstemp makes owner-only files; give the result the permissions open() would
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_temporaries(run_dir: Path) -> None:
    """Delete the temporary files `atomic_write` leaves in a run folder when its process is killed mid-write."""
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        for path in folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


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
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:
            raise UserError(f"refused to load {path}: unpickling it would call {found.group(1)}, and a checkpoint "
                            f"holds only tensors and plain values (a hostile file, or one saved from Python objects: "
                            f"save model.state_dict() instead); nothing in it was run") from None
        cause = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        detail = cause.group(1).strip()[:200] if cause else type(err).__name__
        raise UserError(f"cannot read {path}: not a PyTorch weights file, or damaged ({detail})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
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


def model_from_checkpoint(ckpt: dict, *, lean_import: bool = False) -> torch.nn.Module:
    """Rebuild the network a checkpoint describes and load its weights (no download, no pretrained file).

    `lean_import`: see `imgclf.models.build_model` (a faster start for `predict`)."""
    from imgclf.models import build_model

    spec = ckpt["model"]
    model = build_model(spec["name"], num_classes=len(ckpt["classes"]), in_channels=ckpt["input"]["channels"],
                        img_size=ckpt["input"]["size"], lean_import=lean_import)
    state = ckpt.get("ema_state_dict") or ckpt["state_dict"]  # the averaged weights are the evaluated ones
    try:
        model.load_state_dict(strip_prefixes(state))
    except RuntimeError as err:
        raise UserError(f"checkpoint weights do not fit {spec['name']}: {str(err).splitlines()[0]}") from None
    return model.eval()
