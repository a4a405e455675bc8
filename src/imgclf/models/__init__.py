"""Models (notes 15-21, 24): the notes' network, a fast CIFAR network, every torchvision classifier, timm's
models (`timm/NAME`, optional) and the user's own nn.Module (`path/to/net.py:ClassName`, `imgclf.usercode`).

One adapter per family knows how to build its networks, their classifier head (to replace, freeze around or
train at its own rate) and the input contract of their pretrained weights (`adapter.py`):

    own.py               tutorial_cnn, fastnet*: trained from the data
    torchvision_nets.py  torchvision's classifiers; contract from the weights' transforms
    timm_nets.py         timm/NAME; contract from timm's pretrained_cfg
    user_nets.py         FILE.py:ClassName (and python:ClassName objects)
    build.py             adapter_for(name), build_model(...), available_models()
    weights.py           load_weights: a pretrained file, read safely and fitted
    rebuild.py           model_from_checkpoint, check_fits (on the meta device)

`build_model(name, ...)` is the one entry point for a network; the checkpoint records its arguments so that
`predict` and `eval` rebuild the same network from the checkpoint alone (a user's network: with its code
handed over again, `model_from_checkpoint`). `training_loss` is the loss of a training forward pass,
auxiliary classifiers included. Importing this package imports neither torchvision nor timm.
"""

from imgclf.models.adapter import HEAD_INITS, Adapter, InputContract, LoadReport, ParamGroups
from imgclf.models.build import adapter_for, available_models, base_fits, build_model, family_of
from imgclf.models.own import OWN_MODELS, FastNet, TutorialCNN, _Norm, fastnet_small, fastnet_wide
from imgclf.models.rebuild import (
           check_fits,
           checked_model_name,
           model_from_checkpoint,
           on_meta,
           refuse_misfit,
)
from imgclf.models.timm_nets import TIMM_MISSING, TIMM_PREFIX
from imgclf.models.torchvision_nets import AUX_HEADS, AUX_LOSS_WEIGHTS, MIN_SIZES, training_loss
from imgclf.models.weights import load_weights

__all__ = ["AUX_HEADS", "AUX_LOSS_WEIGHTS", "HEAD_INITS", "MIN_SIZES", "OWN_MODELS", "TIMM_MISSING", "TIMM_PREFIX",
           "Adapter", "FastNet", "InputContract", "LoadReport", "ParamGroups", "TutorialCNN", "_Norm",
           "adapter_for", "available_models", "base_fits", "build_model", "check_fits", "checked_model_name",
           "family_of", "fastnet_small", "fastnet_wide", "load_weights", "model_from_checkpoint", "on_meta",
           "refuse_misfit", "training_loss"]
