"""What imgclf knows about a family of networks, in one place: the `Adapter` base class, the `InputContract`
of pretrained weights, and the head helpers the families share.

One adapter per family (`imgclf.models.own`, `.torchvision_nets`, `.timm_nets`, `.user_nets`); `adapter_for`
(`imgclf.models.build`) picks it from a `--model` name. An adapter knows how to build its networks, which
layers are the classifier head (main first, then auxiliary classifiers), how to put a new head on for other
classes, how the parameters split into backbone and head (freezing, discriminative learning rates), and the
input contract of pretrained weights: the normalisation, resize and crop their authors used.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from imgclf.config import HEAD_INITS
from imgclf.errors import UserError, shown
from imgclf.transforms import Decoding

# How a new head's weights start (`Adapter.init_head`): "default", as the layer's library initialises it (what
# build_model does: a fixed-seed run is unchanged); "zero", weights and bias 0, so that every class starts
# equally likely (a linear head still learns: its gradient is (p - y) x^T, which differs per class); "small",
# weights ~ N(0, 0.01^2) and bias 0: first logits near 0 without being equal. Large first logits (timm's
# uniform +-1/sqrt(classes), +-0.71 for two classes) push a pretrained backbone hard in the first steps.
SMALL_INIT_STD = 0.01


@dataclass(frozen=True)
class InputContract:
    """How pretrained weights' authors fed pictures to the network, which fine-tuning should repeat.

    Pixels in [0, 1] are normalised as (x - mean) / std per channel. For evaluation a picture is resized (with
    `interpolation`) so that its shorter side is `resize_for(side)`, then centre-cropped to `side`: the crop
    keeps `crop_pct` of the resized side. `input_size` is the side the weights were trained at; `source` says
    where the values come from (timm's pretrained_cfg, torchvision's weights), for --print-config."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # "bilinear", "bicubic", "nearest"
    crop_pct: float  # in (0, 1]: torchvision's crop 224 of a 256 resize is 0.875
    input_size: int
    source: str

    def resize_for(self, side: int) -> int:
        """The shorter side to resize to before a centre crop of `side` (timm's rule: floor(side / crop_pct);
        transforms.Decoding, which decodes the pictures so)."""
        return Decoding(self.interpolation, self.crop_pct).resize_for(side)

    def for_channels(self, channels: int) -> InputContract:
        """The contract for pictures of `channels` channels: itself for 3; otherwise the channel-averaged mean
        and std, repeated (an approximation that fits the RGB-summed first convolution of `build_model`)."""
        if channels == len(self.mean):
            return self
        mean, std = sum(self.mean) / len(self.mean), sum(self.std) / len(self.std)
        return InputContract((mean,) * channels, (std,) * channels, self.interpolation, self.crop_pct,
                             self.input_size, self.source)


@dataclass(frozen=True)
class ParamGroups:
    """Every parameter of a network exactly once (trainable or not, in `model.parameters()` order), split
    into the classifier head's and the rest, the backbone's."""

    backbone: tuple[nn.Parameter, ...]
    head: tuple[nn.Parameter, ...]


@dataclass(frozen=True)
class LoadReport:
    """What `load_weights` took from a file: the keys loaded into the network, the file's keys left out
    (of another shape, or no weight of the network) and the shape of every tensor of the file."""

    source: str
    loaded: tuple[str, ...]
    skipped: tuple[str, ...]
    file_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


Say = Callable[[str], None]


def say_on_stderr(line: str) -> None:
    """Where `build_model` tells what it did with a pretrained file when its caller does not say otherwise."""
    print(f"imgclf: {line}", file=sys.stderr, flush=True)


class Adapter:
    """A family's way with its networks; one object per `--model` name (`name`), stateless.

    Subclasses implement `build` and `head`, and `replace_head` / `input_contract` where the defaults below
    do not fit. Every bad input is one UserError line."""

    family = "abstract"

    def __init__(self, name: str):
        self.name = name

    def build(self, *, num_classes: int, in_channels: int = 3, img_size: int = 32, pretrained: str | None = None,
              model_args: str | dict | None = None, base: nn.Module | None = None, say: Say | None = None) -> nn.Module:
        """The network for `num_classes` classes and (in_channels, img_size, img_size) inputs, with a head for
        those classes; see `imgclf.models.build_model` for the arguments. Works inside `on_meta()`. A
        pretrained file's loading is told in one line to `say` (default: stderr)."""
        raise NotImplementedError

    def head(self, model: nn.Module) -> list[nn.Module]:
        """The classifier layers of `model` (built by this adapter): the main one first, then any auxiliary."""
        raise NotImplementedError

    def replace_head(self, model: nn.Module, num_classes: int, *, init: str = "default") -> list[nn.Module]:
        """Put new classifier layers for `num_classes` classes in place of `head(model)` (same input width,
        same bias or not), initialised as `init` says (HEAD_INITS); returns them, main first."""
        new = [swap_layer(model, path, num_classes) for path in head_paths(model, self.head(model))]
        init_layers(new, init)
        return new

    def init_head(self, model: nn.Module, init: str) -> None:
        """Re-initialise `model`'s head in place as `init` says (HEAD_INITS)."""
        init_layers(self.head(model), init)

    def param_groups(self, model: nn.Module) -> ParamGroups:
        """`model`'s parameters split into backbone and head (`ParamGroups`)."""
        head_ids = {id(p) for module in self.head(model) for p in module.parameters()}
        params = list(model.parameters())
        return ParamGroups(tuple(p for p in params if id(p) not in head_ids),
                           tuple(p for p in params if id(p) in head_ids))

    def freeze_backbone(self, model: nn.Module) -> None:
        """Only the head trains: requires_grad off for the backbone's parameters, on for the head's."""
        groups = self.param_groups(model)
        for p in groups.backbone:
            p.requires_grad_(False)
        for p in groups.head:
            p.requires_grad_(True)

    def input_contract(self, pretrained: bool | str | None) -> InputContract | None:
        """The input contract of the network started from `pretrained` (True: the family's default weights
        for this name; a weights name or tag; a file, taken to hold those default weights), or None where
        the data decides (no pretrained weights, or a family without a contract)."""
        return None

    def describe_load(self, model: nn.Module, report: LoadReport, num_classes: int, *,
                      new_head: bool | None = None) -> str:
        """One line for the user: how many tensors `model` holds from the file, what became of its head
        (`new_head`: it was replaced after loading; by default, whether the file's did not fit) and what else
        did not fit."""
        layers = self.head(model)
        paths = head_paths(model, layers)
        head_keys = {f"{p}.{k}" if p else k for p, m in zip(paths, layers, strict=True) for k in m.state_dict()}
        used = [k for k in report.loaded if k not in head_keys]
        text = f"loaded {len(used)} tensors from {shown(report.source)}"
        main_weight = f"{paths[0]}.weight" if paths[0] else "weight"
        file_head = report.file_shapes.get(main_weight)
        if new_head is None:
            new_head = main_weight not in report.loaded
        if file_head and new_head:
            text += f"; replaced the {file_head[0]}-class head by a {num_classes}-class one"
        elif file_head:
            text += f"; kept its {num_classes}-class head"
        else:
            text += f"; a new {num_classes}-class head"
        other = [k for k in report.skipped if k not in head_keys]
        if other:
            text += f"; left out {len(other)} of the file's tensors that do not fit (first: {shown(other[0])})"
        absent = [k for k, _ in model.named_parameters() if k not in report.loaded and k not in head_keys]
        if absent:
            text += f"; {len(absent)} of the network's weights are not in the file (first: {shown(absent[0])})"
        return text


def adapt_rgb_filters(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """An RGB input convolution's filters (out, 3, kh, kw) for `channels` input channels, as timm's
    `adapt_input_conv` does: 1 channel takes the sum over RGB (a grey picture excites a filter as the same
    grey in RGB would); more repeat R, G, B cyclically (R, G, B, R, ...) scaled by 3 / channels, so that a
    picture whose channels are all equal gives the same first activations as that grey in RGB. Pure."""
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-channels // 3)
    return weight.repeat(1, repeats, 1, 1)[:, :channels] * (3 / channels)


def head_paths(model: nn.Module, layers: list[nn.Module]) -> list[str]:
    """The dotted names of `layers` in `model`."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] for layer in layers]


def last_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The last Linear or Conv2d layer of `model` (in registration order) and its name: the classifier of
    every torchvision classifier (squeezenet's is a 1x1 convolution) and of most hand-written networks."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not found:
        raise UserError(f"{type(model).__name__} has no Linear or Conv2d layer, so no classifier head that "
                        f"imgclf can find (to replace, freeze around or fine-tune)")
    return found[-1]


def swap_layer(model: nn.Module, path: str, num_classes: int) -> nn.Module:
    """Put a new Linear (or Conv2d) for `num_classes` outputs in place of the layer at `path`, keeping its
    input width, bias or not, and a convolution's geometry; returns it (initialised by PyTorch)."""
    old = model.get_submodule(path)
    bias = old.bias is not None
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=bias)
    elif isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size, stride=old.stride,
                        padding=old.padding, bias=bias)
    else:
        raise UserError(f"the head {path or type(model).__name__} is a {type(old).__name__}; imgclf replaces "
                        f"Linear and Conv2d heads")
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return new


def init_layers(layers: list[nn.Module], init: str) -> None:
    """Initialise the weights and biases of `layers` as `init` says (HEAD_INITS)."""
    if init not in HEAD_INITS:
        raise UserError(f"head initialisation {init!r} is none of {', '.join(HEAD_INITS)}")
    if init == "default":
        return
    with torch.no_grad():
        for layer in layers:
            weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
            if weight is not None:
                weight.zero_() if init == "zero" else weight.normal_(0.0, SMALL_INIT_STD)
            if bias is not None:
                bias.zero_()
