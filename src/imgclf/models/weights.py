"""Pretrained weights from a file (`load_weights`): read safely, fitted to the network, reported."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import socket
from pathlib import Path

import torch
from torch import nn

from imgclf import usercode
from imgclf.checkpoint import safe_load, strip_prefixes
from imgclf.errors import UserError
from imgclf.models.adapter import LoadReport, adapt_rgb_filters


def load_weights(model: nn.Module, path: str, *, skip_mismatched: bool) -> LoadReport:
    """Load a state dict (or an imgclf checkpoint's) from `path` into `model`, safely: .safetensors files
    with safetensors, anything else with torch.load(weights_only=True); returns what was loaded.

    Prefixes left by DDP (`module.`) and torch.compile (`_orig_mod.`) are removed; RGB input convolutions
    are adapted to the model's channels and position embeddings resized to its input size; with
    `skip_mismatched`, tensors whose shape still differs (a classifier for other classes) are left as
    initialised.
    """
    return load_state(model, _read_state(path), source=path, skip_mismatched=skip_mismatched)


def refuse_weights_name(pretrained: str, model_name: str) -> None:
    """One UserError line when `pretrained` is no file but reads as a weights name (IMAGENET1K_V1, DEFAULT)
    given to `model_name`, a network that has no published weights (imgclf's own, the user's): only files."""
    if re.fullmatch(r"\w+", pretrained) and not Path(pretrained).exists():
        raise UserError(f"--pretrained {pretrained}: no such file, and {model_name} has no named weights such as "
                        f"IMAGENET1K_V1 (torchvision classifiers and timm/NAME models do); give a file of weights "
                        f"(.pt, .pth, .safetensors)")


def _read_state(path: str) -> dict:
    if str(path).endswith(".safetensors"):
        if importlib.util.find_spec("safetensors") is None:
            raise UserError(f"reading {path} needs the package safetensors: pip install safetensors")
        from safetensors.torch import load_file

        if not Path(path).expanduser().is_file():
            raise UserError(f"no such file: {path}")
        try:
            return load_file(str(Path(path).expanduser()))
        except Exception as err:  # noqa: BLE001 - safetensors' own error types
            raise UserError(f"cannot read {path}: not a safetensors file, or damaged "
                            f"({usercode.first_line(err)})") from None
    obj = safe_load(path)
    state = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors; save one with torch.save(model.state_dict())")
    return state


def load_state(model: nn.Module, state: dict, *, source: str, skip_mismatched: bool) -> LoadReport:
    """`load_weights` for a state dict already read (`source` names it in messages)."""
    own = model.state_dict()
    state = strip_prefixes(state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    state = {k: _fit_tensor(k, v, own[k].shape) if k in own else v for k, v in state.items()}
    if skip_mismatched:
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    matched = [k for k in state if k in own]
    if not matched:
        raise UserError(f"{source} has no weights that fit this model; is it for another architecture?")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise UserError(f"{source} does not fit this model: {str(err).splitlines()[-1].strip()[:200]}") from None
    return LoadReport(str(source), tuple(matched), tuple(k for k in shapes if k not in matched), shapes)


def _fit_tensor(key: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`value` adapted to `shape` where that keeps its meaning: an RGB input convolution for other channels
    (`adapter.adapt_rgb_filters`, timm's rule, as `torchvision_nets.adapt_first_conv`); a ViT position embedding
    (1, prefix + n*n, D) for another grid (bicubic, prefix tokens kept). Otherwise `value` unchanged."""
    if value.shape == shape:
        return value
    if value.ndim == 4 and value.shape[1] == 3 and value.shape[0] == shape[0] and value.shape[2:] == shape[2:]:
        return adapt_rgb_filters(value, shape[1])
    if value.ndim == 3 and "pos_embed" in key and value.shape[0] == 1 and value.shape[2] == shape[2]:
        return _resize_positions(value, shape[1])
    return value


def _resize_positions(pos: torch.Tensor, length: int) -> torch.Tensor:
    old = pos.shape[1]
    for prefix in range(9):  # class and distillation tokens, registers
        n, m = math.isqrt(max(old - prefix, 0)), math.isqrt(max(length - prefix, 0))
        if n and m and n * n == old - prefix and m * m == length - prefix:
            break
    else:
        return pos
    grid = pos[:, prefix:].reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
    grid = nn.functional.interpolate(grid, size=(m, m), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, m * m, -1).to(pos.dtype)], dim=1)


def check_reachable(host: str | None, *, what: str, page: str) -> None:
    """Raise one UserError line at once when `host` cannot be connected to (instead of a download's minute
    of retries). Skipped offline (HF_HUB_OFFLINE: weights come from the cache) and behind a proxy."""
    if not host or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        raise UserError(f"cannot reach {host} to download {what} ({err.strerror or err}); download {page} where "
                        f"a network is reachable and pass the file with --pretrained FILE") from None
