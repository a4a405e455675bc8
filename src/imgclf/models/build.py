"""From a `--model` name to its family's adapter (`adapter_for`) and to a network (`build_model`)."""

from __future__ import annotations

import importlib.util

from torch import nn

from imgclf import usercode
from imgclf.models.adapter import Adapter, Say
from imgclf.models.own import OWN_MODELS, OwnAdapter
from imgclf.models.timm_nets import TIMM_PREFIX, TimmAdapter
from imgclf.models.torchvision_nets import TorchvisionAdapter, builder_kwargs
from imgclf.models.user_nets import UserAdapter

ADAPTERS: dict[str, type[Adapter]] = {"own": OwnAdapter, "torchvision": TorchvisionAdapter, "timm": TimmAdapter,
                                      "user": UserAdapter}


def family_of(name: str) -> str:
    """The family of a `--model` name, by its form alone (nothing imported, nothing raised): "user" for
    FILE.py:ClassName (and python:ClassName, a class handed over in Python), "timm" for timm/NAME, "own" for
    imgclf's networks, "torchvision" for anything else (an unknown name is refused when built)."""
    if name.startswith(usercode.PYTHON_PREFIX) or name.endswith(".py") or name.rpartition(":")[0].endswith(".py"):
        return "user"
    if name.startswith(TIMM_PREFIX):
        return "timm"
    return "own" if name in OWN_MODELS else "torchvision"


def adapter_for(name: str) -> Adapter:
    """The adapter of the family `name` belongs to (`family_of`); a malformed FILE.py:ClassName is one
    UserError line."""
    family = family_of(name)
    if family == "user" and not name.startswith(usercode.PYTHON_PREFIX):
        usercode.parse_code_name(name)  # its one line for a file without a class, or a bad class name
    return ADAPTERS[family](name)


def available_models(search: str | None = None) -> list[str]:
    """Every name `--model` takes: imgclf's own, torchvision's classifiers and, when timm is installed,
    `timm/NAME` for each timm architecture; only those containing `search` (case-insensitively) if given.
    (`FILE.py:ClassName`, the user's own network, is not listed.)"""
    from torchvision import models

    names = sorted(OWN_MODELS) + sorted(models.list_models(module=models))
    if importlib.util.find_spec("timm") is not None:
        import timm

        names += [TIMM_PREFIX + n for n in timm.list_models()]
    return [n for n in names if search is None or search.lower() in n.lower()]


def build_model(name: str, *, num_classes: int, in_channels: int = 3, img_size: int = 32,
                pretrained: str | None = None, freeze_backbone: bool = False, base: nn.Module | None = None,
                model_args: str | dict | None = None, say: Say | None = None) -> nn.Module:
    """Build `name` for `num_classes` classes and (in_channels, img_size, img_size) inputs (`adapter_for(name)
    .build`), with only its head trainable if `freeze_backbone`.

    `name`: one of `available_models()` (torchvision models: last layer replaced, note 24; `timm/NAME`:
    timm's architecture NAME, needs timm) or `path/to/net.py:ClassName`, the user's own nn.Module, imported
    from that file (`imgclf.usercode`). `model_args`: keyword arguments (a JSON object, or a dict) for the
    constructor of a timm or user model. `pretrained`: a local weights file (state dict .pth/.pt, read with
    weights_only=True, or .safetensors; tensors of another shape, such as another head, are skipped, and
    what was loaded is told in one line to `say`, default stderr) or the name of weights to download
    (torchvision: IMAGENET1K_V1, DEFAULT...; timm: DEFAULT or a tag such as a1_in1k). `base`: torchvision
    classifier `name` already built (random weights, 1000 classes), to adapt instead of building one where
    `base_fits` (predict's lean start-up, `imgclf.predict`). Every bad input is one UserError line.
    """
    adapter = adapter_for(name)
    model = adapter.build(num_classes=num_classes, in_channels=in_channels, img_size=img_size, pretrained=pretrained,
                          model_args=model_args, base=base, say=say)
    if freeze_backbone:
        adapter.freeze_backbone(model)
    return model


def base_fits(name: str, img_size: int) -> bool:
    """Whether `build_model(name, img_size=img_size, base=...)` uses a `base` built with torchvision's
    defaults (no arguments): torchvision classifiers whose builder needs none for this size. For the others
    (googlenet, inception_v3, vit_* and maxvit_* not at 224, imgclf's, timm's and the user's own models)
    there is no point in building one."""
    return family_of(name) == "torchvision" and ":" not in name and not builder_kwargs(name, img_size,
                                                                                         named_weights=False)
