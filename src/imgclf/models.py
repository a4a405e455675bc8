"""Models (notes 15-21, 24): the notes' network, a fast CIFAR network, every torchvision classifier, timm's
models (`timm/NAME`, optional) and the user's own nn.Module (`path/to/net.py:ClassName`, `imgclf.usercode`).

`build_model(name, ...)` is the one entry point; the checkpoint records its arguments so that `predict`
and `eval` rebuild the same network from the checkpoint alone (a user's network: with its code handed
over again, `model_from_checkpoint`). `training_loss` is the loss of a training forward pass, auxiliary
classifiers included.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import math
import os
import socket
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from imgclf import usercode
from imgclf.checkpoint import safe_load, strip_prefixes
from imgclf.errors import UserError, shown


class TutorialCNN(nn.Module):
    """The network of note 21, for any input channels and size (shapes shown for 3x32x32)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, img_size: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),  # (N, 32, 32, 32)
            nn.MaxPool2d(2),  # (N, 32, 16, 16)
            nn.Conv2d(32, 32, kernel_size=5, padding=2),  # (N, 32, 16, 16)
            nn.MaxPool2d(2),  # (N, 32, 8, 8)
            nn.Conv2d(32, 64, kernel_size=5, padding=2),  # (N, 64, 8, 8)
            nn.MaxPool2d(2),  # (N, 64, 4, 4)
        )
        side = img_size // 2 // 2 // 2  # each MaxPool2d(2) halves the side, rounding down
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (N, 1024)
            nn.Linear(64 * side * side, 64),  # (N, 64)
            nn.Linear(64, num_classes),  # (N, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _Norm(nn.BatchNorm2d):
    """BatchNorm as the CIFAR speed records use it: no learned scale, a fast-moving running average, and a
    shift that learns 64x faster than the convolutions. The shift is stored divided by 8 and multiplied
    back in `forward`: for SGD, using a parameter times k multiplies its effective learning rate by k**2."""

    bias_scale = 8.0

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or self.running_mean is None
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                        self.bias * self.bias_scale, use_batch_stats, self.momentum, self.eps)


class _ConvGroup(nn.Sequential):
    """conv 3x3 -> max-pool 2 -> norm -> GELU -> conv 3x3 -> norm -> GELU: the side is halved (rounded down)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2), _Norm(c_out), nn.GELU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), _Norm(c_out), nn.GELU(),
        )
        for conv in (self[0], self[4]):  # identity init of the first filters: the group starts near a pass-through
            nn.init.dirac_(conv.weight[: min(conv.in_channels, conv.out_channels)])


class FastNet(nn.Module):
    """A small CIFAR network after the speed records (airbench, hlb-CIFAR10): a 2x2 whitening first layer
    (set from the data by `init_whitening`, frozen), three conv groups, global max-pool, a linear head
    and a fixed logit scale. Shapes shown for 3x32x32 and the default widths; pictures need a side >= 16."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, img_size: int = 32,
                 widths: tuple[int, int, int] = (64, 256, 256)):
        super().__init__()
        if img_size < 16:
            raise UserError(f"fastnet needs pictures of at least 16x16, got {img_size}x{img_size}; pass --img-size 16")
        patch_dims = in_channels * 2 * 2
        self.whiten = nn.Conv2d(in_channels, 2 * patch_dims, kernel_size=2, padding=0)  # (N, 24, 31, 31)
        # Set from data (or a checkpoint), never trained. airbench also trains the bias for 3 epochs; here
        # it stays frozen, because then nothing before the first conv group needs a gradient: on a 2-core
        # CPU a trainable bias made fastnet_small train ~20% fewer pictures a second (benchmarks/RESULTS.md).
        self.whiten.requires_grad_(False)
        w0, w1, w2 = widths
        self.blocks = nn.Sequential(
            nn.GELU(),
            _ConvGroup(2 * patch_dims, w0),  # (N, w0, 15, 15)
            _ConvGroup(w0, w1),  # (N, w1, 7, 7)
            _ConvGroup(w1, w2),  # (N, w2, 3, 3)
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),  # (N, w2)
        )
        self.head = nn.Linear(w2, num_classes, bias=False)
        self.scale = 1 / 9  # a low logit temperature, which suits label smoothing (airbench)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.whiten(x))) * self.scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first layer to whiten 2x2 patches of `images` (normalised float, N, C, H, W): the
        eigenvectors of the patch covariance, scaled by 1/sqrt(eigenvalue), and their negatives. The layer
        layer is frozen: its outputs have (close to) identity covariance over those patches."""
        c = self.whiten.in_channels
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)  # (N, C, H-1, W-1, 2, 2)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4)  # (N*(H-1)*(W-1), C*2*2), as conv weights
        patches = patches - patches.mean(0, keepdim=True)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0).view(-1, 1) + eps)).float()
        filters = filters.view(c * 4, c, 2, 2)  # row i: one whitening direction, laid out like a conv filter
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()


def fastnet_small(**kwargs) -> FastNet:
    """FastNet at half the widths: about a quarter of the computation, for the shortest time budgets."""
    return FastNet(widths=(32, 128, 128), **kwargs)


def fastnet_wide(**kwargs) -> FastNet:
    """FastNet at the widths of airbench95 (128, 384, 512): about 3.5x the computation, for longer budgets."""
    return FastNet(widths=(128, 384, 512), **kwargs)


OWN_MODELS: dict[str, Callable[..., nn.Module]] = {"tutorial_cnn": TutorialCNN, "fastnet": FastNet,
                                                   "fastnet_small": fastnet_small, "fastnet_wide": fastnet_wide}
TIMM_PREFIX = "timm/"
TIMM_MISSING = "pip install 'imgclf[timm]'"
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
                model_args: str | dict | None = None) -> nn.Module:
    """Build `name` for `num_classes` classes and (in_channels, img_size, img_size) inputs.

    `name`: one of `available_models()` (torchvision models: last layer replaced, note 24; `timm/NAME`:
    timm's architecture NAME, needs timm) or `path/to/net.py:ClassName`, the user's own nn.Module, imported
    from that file (`imgclf.usercode`). `model_args`: keyword arguments (a JSON object, or a dict) for the
    constructor of a timm or user model. `pretrained`: a local weights file (state dict .pth/.pt, read with
    weights_only=True, or .safetensors; tensors of another shape, such as another head, are skipped) or the
    name of weights to download (torchvision: IMAGENET1K_V1, DEFAULT...; timm: DEFAULT or a tag such as
    a1_in1k). `base`: torchvision classifier `name` already built (random weights, 1000 classes), to adapt
    instead of building one (predict's lean start-up, `imgclf.predict`). Every bad input is one UserError line.
    """
    ref = usercode.parse_code_name(name)
    if name.startswith(usercode.PYTHON_PREFIX):
        raise UserError(f"{name} is a class of a notebook or script, trained with imgclf.fit; continue it there: "
                        f"imgclf.fit({name[len(usercode.PYTHON_PREFIX):]}(), DATA, resume=RUN)")
    if ref is not None:
        model = usercode.build_user_model(ref, model_args, num_classes=num_classes, in_channels=in_channels,
                                          img_size=img_size)
        if pretrained:
            load_weights(model, pretrained, skip_mismatched=True)
        heads = [_last_layer(model, name)] if freeze_backbone else []
    elif name.startswith(TIMM_PREFIX):
        model = _timm_model(name, num_classes=num_classes, in_channels=in_channels, img_size=img_size,
                            pretrained=pretrained, model_args=model_args)
        classifier = model.get_classifier()
        heads = list(classifier) if isinstance(classifier, tuple) else [classifier]
    else:
        if model_args:
            raise UserError(f"--model-args is for timm/NAME models and FILE.py:ClassName networks, not {name}")
        if name in OWN_MODELS:
            model = OWN_MODELS[name](num_classes=num_classes, in_channels=in_channels, img_size=img_size)
            if pretrained:
                load_weights(model, pretrained, skip_mismatched=True)
            heads = [model.classifier[-1]] if name == "tutorial_cnn" else [model.head]
        else:
            model, heads = _torchvision_classifier(name, num_classes=num_classes, in_channels=in_channels,
                                                   img_size=img_size, pretrained=pretrained, base=base)
    if freeze_backbone:
        for p in model.parameters():
            p.requires_grad_(False)
        for module in heads:
            for p in module.parameters():
                p.requires_grad_(True)
    return model


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


def _torchvision_classifier(name: str, *, num_classes: int, in_channels: int, img_size: int, pretrained: str | None,
                            base: nn.Module | None) -> tuple[nn.Module, list[nn.Module]]:
    """A torchvision classifier for the request, and its new last layers (main and auxiliary heads)."""
    _check_torchvision_size(name, img_size)
    plain = not _builder_kwargs(name, img_size, named_weights=False)  # `base` was built with no arguments
    model = base if base is not None and plain and not pretrained else _torchvision_model(name, pretrained, img_size)
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    heads = [_replace_head(model, num_classes)]
    for path in AUX_HEADS.get(name, ()):
        try:
            old = model.get_submodule(path)
        except AttributeError:  # inception_v3 below INCEPTION_AUX_MIN_SIZE has none
            continue
        heads.append(nn.Linear(old.in_features, num_classes))
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, heads[-1])
    return model, heads


def base_fits(name: str, img_size: int) -> bool:
    """Whether `build_model(name, img_size=img_size, base=...)` uses a `base` built with torchvision's
    defaults (no arguments): torchvision classifiers whose builder needs none for this size. For the others
    (googlenet, inception_v3, vit_* and maxvit_* not at 224, imgclf's, timm's and the user's own models)
    there is no point in building one."""
    return (name not in OWN_MODELS and not name.startswith(TIMM_PREFIX) and ":" not in name
            and not _builder_kwargs(name, img_size, named_weights=False))


def _check_torchvision_size(name: str, img_size: int) -> None:
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


def _builder_kwargs(name: str, img_size: int, *, named_weights: bool) -> dict:
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


def _torchvision_model(name: str, pretrained: str | None, img_size: int) -> nn.Module:
    from torchvision import models

    if name not in models.list_models(module=models):
        raise UserError(f"unknown model {name!r}; choose tutorial_cnn, fastnet, a torchvision classifier such as "
                        f"resnet18, timm/NAME or FILE.py:ClassName (`imgclf models` lists them)")
    weights = None
    if pretrained and not Path(pretrained).expanduser().exists():
        weights = _torchvision_weights(name, pretrained)
    kwargs = _builder_kwargs(name, img_size, named_weights=weights is not None)
    if weights is not None and name.startswith(("vit_", "maxvit_")):
        # their weights fix the size to 224: build for the requested size, load them with resized positions
        model = models.get_model(name, weights=None, **kwargs)
        _load_state(model, weights.get_state_dict(progress=False), source=str(weights), skip_mismatched=False)
    else:
        model = models.get_model(name, weights=weights, **kwargs)
    if getattr(model, "transform_input", False):
        # torchvision turns this on with googlenet's and inception's weights: it re-normalises ImageNet-
        # normalised RGB the way Google trained them. imgclf normalises by the data's own statistics (which
        # the checkpoint records, and which exports and predict repeat), so that rescaling would not apply.
        model.transform_input = False
    if pretrained and weights is None:
        load_weights(model, pretrained, skip_mismatched=True)
    return model


def _torchvision_weights(name: str, text: str):
    from torchvision import models

    try:
        weights_enum = models.get_model_weights(name)
        weights = weights_enum[text.upper()] if text.upper() != "DEFAULT" else weights_enum.DEFAULT
    except (KeyError, ValueError):
        raise UserError(f"--pretrained {text!r} is neither a file nor a weights name of {name} "
                        f"(for example IMAGENET1K_V1, DEFAULT)") from None
    try:
        weights.get_state_dict(progress=False, check_hash=True)  # fails here, clearly, without a network
    except Exception as err:  # noqa: BLE001
        raise UserError(f"could not download {name} weights {weights} ({str(err).splitlines()[0]}); download "
                        f"{weights.url} elsewhere and pass the file with --pretrained FILE") from None
    return weights


def _import_timm(name: str):
    try:
        import timm
    except ImportError:
        raise UserError(f"--model {name} needs the package timm: {TIMM_MISSING}") from None
    return timm


def _timm_model(name: str, *, num_classes: int, in_channels: int, img_size: int, pretrained: str | None,
                model_args: str | dict | None) -> nn.Module:
    """timm's architecture `name` (timm/ARCH), built for the request and checked on one blank picture."""
    timm = _import_timm(name)
    arch = name[len(TIMM_PREFIX):]
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(TIMM_PREFIX + c for c in close)}? " if close else ""
        raise UserError(f"timm has no model {arch!r}; {hint}`imgclf models --search TEXT` lists them")
    hub = _timm_hub_name(timm, arch, pretrained) if pretrained and not Path(pretrained).expanduser().exists() else None
    kwargs = {**usercode.parse_model_args(model_args), "num_classes": num_classes, "in_chans": in_channels}
    model = _timm_create(timm, name, hub or arch, img_size, pretrained=hub is not None, **kwargs)
    if pretrained and hub is None:
        load_weights(model, pretrained, skip_mismatched=True)
    usercode.check_output(model, name, num_classes=num_classes, in_channels=in_channels, img_size=img_size)
    return model


def _timm_create(timm, name: str, arch: str, img_size: int, *, pretrained: bool, **kwargs) -> nn.Module:
    """timm.create_model for `img_size` where the architecture takes that argument, else at its own size
    (refused in one line when that size is fixed and differs)."""
    try:
        try:
            return timm.create_model(arch, pretrained=pretrained, img_size=img_size, **kwargs)
        except TypeError as err:  # the architecture has no img_size argument: it adapts to any size, or none
            if "img_size" not in str(err):
                raise
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    except Exception as err:  # noqa: BLE001 - timm and the architectures raise many types
        what = f"with the weights {arch}" if pretrained else f"for {img_size}x{img_size} pictures"
        raise UserError(f"could not build {name} {what} ({usercode.first_line(err)})") from None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size") or ())[1:]
    if cfg.get("fixed_input_size") and size and size != (img_size, img_size):
        raise UserError(f"{name} takes only {size[0]}x{size[1]} pictures, got {img_size}x{img_size}; pass "
                        f"--img-size {size[0]}")
    return model


def _timm_hub_name(timm, arch: str, text: str) -> str:
    """timm's name of the weights `--pretrained text` asks for (DEFAULT, a tag such as a1_in1k, or ARCH.TAG),
    after checking that they exist and that their server answers (else one line, at once)."""
    base = arch.partition(".")[0]
    tag = text.strip()
    # DEFAULT: timm's default weights of the architecture, or those of the tag in `--model timm/ARCH.TAG`
    full = arch if tag.upper() == "DEFAULT" else tag if tag.startswith(base + ".") else f"{base}.{tag}"
    known = timm.list_pretrained(base + ".*")
    if not (known if full == base else full in known):
        tags = ", ".join(k.partition(".")[2] for k in known[:6]) or "none"
        raise UserError(f"--pretrained {text!r} is neither a file nor weights timm has for {base} (DEFAULT, or "
                        f"a tag: {tags})")
    cfg = timm.models.get_pretrained_cfg(full)
    if cfg.hf_hub_id:
        import huggingface_hub

        page, host = f"{huggingface_hub.constants.ENDPOINT}/{cfg.hf_hub_id}", huggingface_hub.constants.ENDPOINT
    else:
        page = host = cfg.url or ""
    _check_reachable(urllib.parse.urlparse(host).hostname, what=f"the timm weights {full}", page=page)
    return full


def _check_reachable(host: str | None, *, what: str, page: str) -> None:
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


def load_weights(model: nn.Module, path: str, *, skip_mismatched: bool) -> None:
    """Load a state dict (or an imgclf checkpoint's) from `path` into `model`, safely: .safetensors files
    with safetensors, anything else with torch.load(weights_only=True).

    Prefixes left by DDP (`module.`) and torch.compile (`_orig_mod.`) are removed; RGB input convolutions
    are adapted to the model's channels and position embeddings resized to its input size; with
    `skip_mismatched`, tensors whose shape still differs (a classifier for other classes) are left as
    initialised.
    """
    _load_state(model, _read_state(path), source=path, skip_mismatched=skip_mismatched)


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


def _load_state(model: nn.Module, state: dict, *, source: str, skip_mismatched: bool) -> None:
    own = model.state_dict()
    state = {k: _fit_tensor(k, v, own[k].shape) if k in own else v for k, v in strip_prefixes(state).items()}
    if skip_mismatched:
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    matched = [k for k in state if k in own]
    if not matched:
        raise UserError(f"{source} has no weights that fit this model; is it for another architecture?")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise UserError(f"{source} does not fit this model: {str(err).splitlines()[-1].strip()[:200]}") from None


def _fit_tensor(key: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`value` adapted to `shape` where that keeps its meaning: an RGB input convolution for other channels
    (filters summed over RGB and spread, as `_adapt_first_conv`); a ViT position embedding (1, prefix +
    n*n, D) for another grid (bicubic, prefix tokens kept). Otherwise `value` unchanged."""
    if value.shape == shape:
        return value
    if value.ndim == 4 and value.shape[1] == 3 and value.shape[0] == shape[0] and value.shape[2:] == shape[2:]:
        return value.sum(dim=1, keepdim=True).repeat(1, shape[1], 1, 1) / shape[1]
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


def _replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the last Linear layer (or squeezenet's final 1x1 conv) with one for `num_classes`."""
    last_name, last = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.out_channels == 1000):
            last_name, last = name, module
    if last is None:
        raise UserError("this model has no final Linear layer to replace; choose another model")
    if isinstance(last, nn.Linear):
        new = nn.Linear(last.in_features, num_classes)
    else:
        new = nn.Conv2d(last.in_channels, num_classes, kernel_size=last.kernel_size)
    parent_name, _, attr = last_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return new


def _last_layer(model: nn.Module, name: str) -> nn.Module:
    """The last Linear or Conv2d layer of a user's network: what --freeze-backbone leaves trainable."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not layers:
        raise UserError(f"--freeze-backbone: {name} has no Linear or Conv2d layer to train")
    return layers[-1]


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Let an RGB model take `in_channels` inputs: the first conv's filters are summed over RGB and spread."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                            module.dilation, module.groups, module.bias is not None)
            with torch.no_grad():
                summed = module.weight.sum(dim=1, keepdim=True)
                new.weight.copy_(summed.repeat(1, in_channels, 1, 1) / in_channels)
                if module.bias is not None:
                    new.bias.copy_(module.bias)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            return


def model_from_checkpoint(ckpt: dict, *, base: nn.Module | None = None, model_code: str | None = None,
                          trust_changed_code: bool | None = None) -> nn.Module:
    """Rebuild the network a checkpoint describes and load its weights (no download, no pretrained file),
    in eval mode. A checkpoint whose weights do not fit is one UserError line naming a tensor and its shapes;
    an imgclf network is first built on the meta device for that check (`check_fits`), so that a checkpoint
    naming a huge network with a few weights takes no memory.

    `base`: see `build_model`; its caller has run `check_fits`. A network from the user's .py file is built
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
        if base is None:
            check_fits(ckpt)
        model = build_model(_built_in_name(spec), base=base, model_args=_config_args(ckpt), **dims)
    state = strip_prefixes(ckpt.get("ema_state_dict") or ckpt["state_dict"])  # the averaged weights are evaluated
    refuse_misfit(spec["name"], {key: value.shape for key, value in model.state_dict().items()}, state)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"checkpoint weights do not fit {spec['name']}: {str(err).splitlines()[0]}") from None
    return model.eval()


def check_fits(ckpt: dict, *, base: nn.Module | None = None) -> None:
    """One UserError line when the weights of `ckpt` do not fit the imgclf, torchvision or timm network it
    names, found by building that network on the meta device: no memory taken, nothing initialised. A
    network that cannot be built there is left to the ordinary build's checks."""
    spec, inp = ckpt["model"], ckpt["input"]
    if spec.get("code") or spec["name"].startswith(usercode.PYTHON_PREFIX):
        return
    name = _built_in_name(spec)
    try:
        with on_meta():
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


class _SkipInit(TorchFunctionMode):
    """Within it, in-place operations on meta tensors (the initialisers' normal_, uniform_, zero_...) do
    nothing: a meta build needs the shapes alone, and the meta kernels of random initialisers would import
    sympy (seconds)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("__") and args and isinstance(args[0], torch.Tensor) \
                and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


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
