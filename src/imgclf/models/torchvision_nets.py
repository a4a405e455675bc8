"""torchvision's classifiers (note 24): every name `torchvision.models.list_models` gives, built for the
run's classes (the last layer replaced, and googlenet's / inception_v3's auxiliary classifiers), for its
input channels and, where the builder needs it, its input size; and their adapter. Named weights (DEFAULT,
IMAGENET1K_V1...) come with their input contract from torchvision's weights metadata."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from imgclf.errors import UserError
from imgclf.models.adapter import (
    Adapter,
    InputContract,
    LoadReport,
    Say,
    adapt_rgb_filters,
    last_layer,
    say_on_stderr,
)
from imgclf.models.weights import load_state, load_weights

# Weight of each auxiliary classifier's loss in training, by the type of the training output: 0.3 in the
# GoogLeNet paper (Szegedy et al., 2014); 0.4 in torchvision's recipe for Inception v3.
AUX_LOSS_WEIGHTS = {"GoogLeNetOutputs": 0.3, "InceptionOutputs": 0.4}
# Auxiliary classifiers' last layers, replaced for the run's classes like the main head.
AUX_HEADS = {"googlenet": ("aux1.fc2", "aux2.fc2"), "inception_v3": ("AuxLogits.fc",)}
INCEPTION_AUX_MIN_SIZE = 299  # inception_v3's auxiliary classifier needs a 17x17 map; below, it is left out
# Smallest side each torchvision classifier trains at (a forward and backward pass of 2 pictures; measured,
# tests/test_models_all.py); those not named take 8 (the smallest --img-size). vit_*: the patch size.
MIN_SIZES = {"alexnet": 63, "convnext_base": 32, "convnext_large": 32, "convnext_small": 32, "convnext_tiny": 32,
             "densenet121": 29, "densenet161": 29, "densenet169": 29, "densenet201": 29, "googlenet": 15,
             "inception_v3": 75, "maxvit_t": 221, "squeezenet1_0": 21, "squeezenet1_1": 17,
             "vgg11": 32, "vgg11_bn": 32, "vgg13": 32, "vgg13_bn": 32, "vgg16": 32, "vgg16_bn": 32, "vgg19": 32,
             "vgg19_bn": 32}

# With weights, torchvision turns `transform_input` on for these: they then take ImageNet-normalised input and
# re-normalise it to the (x - 0.5) / 0.5 that Google trained them with. imgclf turns it off (it normalises
# itself, see `_torchvision_model`), so their weights' contract is mean = std = 0.5.
GOOGLE_NORMALISED = frozenset({"googlenet", "inception_v3"})


class TorchvisionAdapter(Adapter):
    """A torchvision classifier: the head is its last Linear or Conv2d layer (squeezenet's is a 1x1
    convolution; checked for every classifier torchvision lists), plus its auxiliary classifiers."""

    family = "torchvision"

    def build(self, *, num_classes: int, in_channels: int = 3, img_size: int = 32, pretrained: str | None = None,
              model_args: str | dict | None = None, base: nn.Module | None = None, say: Say | None = None) -> nn.Module:
        """`base`: this classifier already built with torchvision's defaults (random weights, 1000 classes),
        adapted instead of building one where it fits (`base_fits`; predict's lean start-up)."""
        if model_args:
            raise UserError(f"--model-args is for timm/NAME models and FILE.py:ClassName networks, not {self.name}")
        check_size(self.name, img_size)
        plain = not builder_kwargs(self.name, img_size, named_weights=False)  # `base` was built with no arguments
        report = None
        if base is not None and plain and not pretrained:
            model = base
        else:
            model, report = _torchvision_model(self.name, pretrained, img_size)
        if in_channels != 3:
            adapt_first_conv(model, in_channels)
        self.replace_head(model, num_classes)
        if report is not None:
            (say or say_on_stderr)(self.describe_load(model, report, num_classes, new_head=True))
        return model

    def head(self, model: nn.Module) -> list[nn.Module]:
        layers = [last_layer(model)[1]]
        for path in AUX_HEADS.get(self.name, ()):
            try:
                layers.append(model.get_submodule(path))
            except AttributeError:  # inception_v3 below INCEPTION_AUX_MIN_SIZE has none
                continue
        return layers

    def input_contract(self, pretrained: bool | str | None) -> InputContract | None:
        """From the weights' own transforms (`weights.transforms()`): named weights' for a name, the DEFAULT
        weights' for True or a file (the weights of one architecture share their mean and std; only their
        resize ratio may differ)."""
        if not pretrained:
            return None
        from torchvision import models

        try:
            enum = models.get_model_weights(self.name)
        except (KeyError, ValueError):  # no such classifier: `build` says so
            return None
        text = pretrained if isinstance(pretrained, str) and not Path(pretrained).expanduser().exists() else "DEFAULT"
        weights = enum.DEFAULT if text.upper() == "DEFAULT" else _weights_named(self.name, enum, text)
        preset = weights.transforms()
        crop, resize = preset.crop_size[0], preset.resize_size[0]
        mean, std = ((0.5,) * 3, (0.5,) * 3) if self.name in GOOGLE_NORMALISED else (preset.mean, preset.std)
        return InputContract(tuple(mean), tuple(std), preset.interpolation.value, crop / resize, crop,
                             f"torchvision {weights}")


def training_loss(outputs, y: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(main logits, loss) of a forward pass in training mode, the loss computed in float32.

    `outputs` is a tensor of logits, or the training outputs of googlenet / inception_v3 (main logits and
    their auxiliary classifiers' logits), whose auxiliary losses are added as their authors did (weights in
    AUX_LOSS_WEIGHTS); in eval mode those models return plain logits. Anything else: one UserError line."""
    if isinstance(outputs, torch.Tensor):
        return outputs, loss_fn(outputs.float(), y)
    weight = AUX_LOSS_WEIGHTS.get(type(outputs).__name__)
    if weight is None:  # by name: predict's lean import of torchvision has classes of its own (imgclf.predict)
        raise UserError(f"the model returned a {type(outputs).__name__} in training mode; imgclf trains models "
                        f"that return one tensor of logits, (N, classes)")
    logits, *aux = outputs
    loss = loss_fn(logits.float(), y)
    for extra in aux:
        if extra is not None:
            loss = loss + weight * loss_fn(extra.float(), y)
    return logits, loss


def check_size(name: str, img_size: int) -> None:
    """One line saying which sizes `name` takes, when `img_size` is not one of them. Imports nothing: with
    `base`, predict's lean start-up does without the torchvision package (`imgclf.predict`)."""
    if name.startswith("vit_") and name.rsplit("_", 1)[1].isdigit():
        patch = int(name.rsplit("_", 1)[1])
        if img_size % patch:
            fit = max(patch, round(img_size / patch) * patch)
            raise UserError(f"{name} takes sides that are multiples of its patch size {patch} (such as {fit}), "
                            f"got {img_size}; pass --img-size {fit}")
    if name.startswith("maxvit_") and not 0 <= -img_size % 224 <= 3:
        raise UserError(f"{name} takes only sides from 221 to 224, 445 to 448, ... (its 7x7 partitions must tile "
                        f"every stage), got {img_size}; pass --img-size 224")
    minimum = MIN_SIZES.get(name, 8)
    if img_size < minimum:
        raise UserError(f"{name} needs pictures of at least {minimum}x{minimum}, got {img_size}x{img_size}; "
                        f"pass --img-size {minimum} or more")


def builder_kwargs(name: str, img_size: int, *, named_weights: bool) -> dict:
    """Arguments for torchvision's builder of `name` beyond weights: the input size of the transformers
    that need it, the auxiliary classifiers of googlenet and inception_v3."""
    if name in AUX_HEADS:
        kwargs = {"aux_logits": name == "googlenet" or img_size >= INCEPTION_AUX_MIN_SIZE}
        # explicit initialisation: the same as torchvision's default, without its FutureWarning (named
        # weights set it themselves, and refuse to be told)
        return kwargs if named_weights else {**kwargs, "init_weights": True}
    if name.startswith("vit_") and img_size != 224:  # 224: torchvision's default
        return {"image_size": img_size}
    if name.startswith("maxvit_") and img_size != 224:
        return {"input_size": (img_size, img_size)}
    return {}


def _torchvision_model(name: str, pretrained: str | None, img_size: int) -> tuple[nn.Module, LoadReport | None]:
    """torchvision's classifier `name` (1000 classes) with the weights `pretrained` names, or from its file
    (the report of that file's loading, else None)."""
    from torchvision import models

    if name not in models.list_models(module=models):
        raise UserError(f"unknown model {name!r}; choose tutorial_cnn, fastnet, a torchvision classifier such as "
                        f"resnet18, timm/NAME or FILE.py:ClassName (`imgclf models` lists them)")
    weights = None
    if pretrained and not Path(pretrained).expanduser().exists():
        weights = _torchvision_weights(name, pretrained)
    kwargs = builder_kwargs(name, img_size, named_weights=weights is not None)
    if weights is not None and name.startswith(("vit_", "maxvit_")):
        # their weights fix the size to 224: build for the requested size, load them with resized positions
        model = models.get_model(name, weights=None, **kwargs)
        load_state(model, weights.get_state_dict(progress=False), source=str(weights), skip_mismatched=False)
    else:
        model = models.get_model(name, weights=weights, **kwargs)
    if getattr(model, "transform_input", False):
        # torchvision turns this on with googlenet's and inception's weights: it re-normalises ImageNet-
        # normalised RGB the way Google trained them. imgclf normalises by the data's own statistics (which
        # the checkpoint records, and which exports and predict repeat), so that rescaling would not apply.
        model.transform_input = False
    if pretrained and weights is None:
        return model, load_weights(model, pretrained, skip_mismatched=True)
    return model, None


def _torchvision_weights(name: str, text: str):
    from torchvision import models

    try:
        weights_enum = models.get_model_weights(name)
    except (KeyError, ValueError):
        weights_enum = None
    weights = _weights_named(name, weights_enum, text)
    try:
        weights.get_state_dict(progress=False, check_hash=True)  # fails here, clearly, without a network
    except Exception as err:  # noqa: BLE001
        raise UserError(f"could not download {name} weights {weights} ({str(err).splitlines()[0]}); download "
                        f"{weights.url} elsewhere and pass the file with --pretrained FILE") from None
    return weights


def _weights_named(name: str, weights_enum, text: str):
    """The member of `weights_enum` (torchvision's weights of `name`) that `text` names: DEFAULT, IMAGENET1K_V1..."""
    try:
        return weights_enum[text.upper()] if text.upper() != "DEFAULT" else weights_enum.DEFAULT
    except (KeyError, TypeError, AttributeError):
        raise UserError(f"--pretrained {text!r} is neither a file nor a weights name of {name} "
                        f"(for example IMAGENET1K_V1, DEFAULT)") from None


def adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Let an RGB model take `in_channels` inputs: its first convolution's filters adapted by
    `adapt_rgb_filters` (timm's rule: summed for 1 channel, RGB repeated cyclically and scaled by 3/N for N)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                            module.dilation, module.groups, module.bias is not None)
            with torch.no_grad():
                new.weight.copy_(adapt_rgb_filters(module.weight, in_channels))
                if module.bias is not None:
                    new.bias.copy_(module.bias)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            return

