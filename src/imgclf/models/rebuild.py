"""Networks rebuilt from a checkpoint (`model_from_checkpoint`), its weights checked against the network first
(`check_fits`, on the meta device: `on_meta`), and the name to resume a run with (`checked_model_name`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from imgclf import usercode
from imgclf.checkpoint import strip_prefixes
from imgclf.errors import UserError, shown
from imgclf.models.build import build_model


def model_from_checkpoint(ckpt: dict, *, base_builder: Callable[[], nn.Module] | None = None,
                          model_code: str | None = None, trust_changed_code: bool | None = None) -> nn.Module:
    """Rebuild the network a checkpoint describes and load its weights (no download, no pretrained file),
    in eval mode. A checkpoint whose weights do not fit is one UserError line naming a tensor and its shapes;
    an imgclf network is first built on the meta device for that check (`check_fits`), so that a checkpoint
    naming a huge network with a few weights takes no memory.

    `base_builder`: builds the checkpoint's torchvision classifier with torchvision's defaults (random
    weights, 1000 classes), to adapt where `base_fits` (predict's lean start-up, which imports torchvision's
    one module of that classifier): called once on the meta device for the check, once for real. A network from the user's .py file is built
    only from `model_code`, that file handed over again, and only if its SHA-256 is the recorded one or
    `trust_changed_code` is set (both default to those of the enclosing `usercode.model_code_scope`); code
    is never imported by itself.
    """
    spec, inp = ckpt["model"], ckpt["input"]
    dims = dict(num_classes=len(ckpt["classes"]), in_channels=inp["channels"], img_size=inp["size"])
    if spec.get("code"):
        ref, digest = usercode.verify_code(spec["code"], model_code, trust_changed_code)
        model = usercode.build_user_model(ref, spec["code"].get("args"), expected_sha256=digest, **dims)
    elif spec["name"].startswith(usercode.PYTHON_PREFIX):  # a class trained from Python: the object handed over
        model = usercode.python_model(spec["name"])
    else:
        check_fits(ckpt, base_builder=base_builder)
        base = base_builder() if base_builder is not None else None
        model = build_model(_built_in_name(spec), base=base, model_args=_config_args(ckpt), **dims)
    state = strip_prefixes(ckpt.get("ema_state_dict") or ckpt["state_dict"])  # the averaged weights are evaluated
    refuse_misfit(spec["name"], {key: value.shape for key, value in model.state_dict().items()}, state)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"checkpoint weights do not fit {spec['name']}: {str(err).splitlines()[0]}") from None
    return model.eval()


def check_fits(ckpt: dict, *, base_builder: Callable[[], nn.Module] | None = None) -> None:
    """One UserError line when the weights of `ckpt` do not fit the imgclf, torchvision or timm network it
    names, found by building that network on the meta device: no memory taken, nothing initialised. A
    network that cannot be built there is left to the ordinary build's checks."""
    spec, inp = ckpt["model"], ckpt["input"]
    if spec.get("code") or spec["name"].startswith(usercode.PYTHON_PREFIX):
        return
    name = _built_in_name(spec)
    try:
        with on_meta():
            base = base_builder() if base_builder is not None else None
            model = build_model(name, base=base, model_args=_config_args(ckpt), num_classes=len(ckpt["classes"]),
                                in_channels=inp["channels"], img_size=inp["size"])
            expected = {key: value.shape for key, value in model.state_dict().items()}
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - built as usual instead, and checked before its weights are loaded
        return
    refuse_misfit(name, expected, strip_prefixes(ckpt.get("ema_state_dict") or ckpt["state_dict"]))


@contextlib.contextmanager
def on_meta():
    """Build modules on the meta device within it: shapes without memory, and without initialisation."""
    with torch.device("meta"), _SkipInit():
        yield


# Constructors of tensors from values rather than from a shape: a network's builder computes with them (regnet's
# block widths, timm's stochastic-depth rates: torch.linspace(...).tolist()), which meta tensors, holding no
# values, cannot do. They are small, and made on the CPU within `on_meta`.
_FROM_VALUES = frozenset({torch.tensor, torch.as_tensor, torch.arange, torch.range, torch.linspace, torch.logspace,
                          torch.scalar_tensor})


class _SkipInit(TorchFunctionMode):
    """Within it, in-place operations on meta tensors (the initialisers' normal_, uniform_, zero_...) do
    nothing: a meta build needs the shapes alone, and the meta kernels of random initialisers would import
    sympy (seconds). Tensors made from values (_FROM_VALUES) are made on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FROM_VALUES and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "cpu"}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("__") and args and isinstance(args[0], torch.Tensor) \
                and args[0].is_meta:
            return args[0]
        return func(*args, **kwargs)


def refuse_misfit(name: str, expected: dict, state: dict) -> None:
    """One UserError line naming the first weight of `state` that is missing, extra or of another shape than
    in `expected`, the network's weights' shapes by name."""
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    more = lambda keys: f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""  # noqa: E731
    if wrong:
        key = wrong[0]
        problem = (f"{shown(key)} is {list(state[key].shape)} in the checkpoint but {list(expected[key])} in the "
                   f"network{more(wrong)}")
    elif missing:
        problem = f"the network's {shown(missing[0])}{more(missing)} is missing from the checkpoint"
    elif extra:
        problem = f"the checkpoint's {shown(extra[0])}{more(extra)} is no weight of the network"
    else:
        return
    raise UserError(f"checkpoint weights do not fit {name}: {problem} (a checkpoint of another network, or "
                    f"damaged)")


def checked_model_name(ckpt: dict, *, model_code: str | None = None, trust_changed_code: bool | None = None) -> str:
    """The `--model` to resume a checkpoint's run with: its model name, or for a network from the user's .py
    file 'FILE.py:Class' of `model_code` once checked as in `model_from_checkpoint` (one UserError line
    without it, or when its hash differs and the change is not trusted)."""
    spec = ckpt["model"]
    if spec.get("code"):
        return usercode.verify_code(spec["code"], model_code, trust_changed_code)[0].name
    if model_code:
        raise UserError(f"--model-code is for checkpoints of a network from a .py file; {spec['name']} is not one")
    return _built_in_name(spec)


def _built_in_name(spec: dict) -> str:
    """A checkpoint's model name, refused when it names a .py file that the checkpoint has no record of."""
    if usercode.parse_code_name(spec["name"]) is not None:
        raise UserError(f"this checkpoint names the network {spec['name']} but records no SHA-256 of its code; "
                        f"imgclf does not import code it cannot check")
    return spec["name"]


def _config_args(ckpt: dict):
    """The run's --model-args (timm models' constructor arguments), when its configuration was saved."""
    config = ckpt.get("config") or {}
    return (config.get("model") or {}).get("args")
