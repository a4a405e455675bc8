"""Models (notes 15-21, 24): the notes' network, a fast CIFAR network, and every torchvision classifier.

`build_model(name, ...)` is the one entry point; the checkpoint records its arguments so that `predict`
and `eval` rebuild the same network from the checkpoint alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from imgclf.checkpoint import safe_load, strip_prefixes
from imgclf.errors import UserError


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


def available_models() -> list[str]:
    from torchvision import models

    return sorted(OWN_MODELS) + sorted(models.list_models(module=models))


def build_model(name: str, *, num_classes: int, in_channels: int = 3, img_size: int = 32,
                pretrained: str | None = None, freeze_backbone: bool = False, base: nn.Module | None = None) -> nn.Module:
    """Build `name` for `num_classes` classes (torchvision models: last layer replaced, note 24).

    `pretrained` is a local weights file (read with weights_only=True) or a torchvision weights name
    such as IMAGENET1K_V1 (downloaded where a network is reachable); it loads before the head is replaced.
    `base`: torchvision classifier `name` already built (random weights, 1000 classes), to adapt instead of
    building one (predict's lean start-up, `imgclf.predict`).
    """
    if name in OWN_MODELS:
        model = OWN_MODELS[name](num_classes=num_classes, in_channels=in_channels, img_size=img_size)
        if pretrained:
            load_weights(model, pretrained, skip_mismatched=True)
        head = [model.classifier[-1]] if name == "tutorial_cnn" else [model.head]
    else:
        model = base if base is not None and not pretrained else _torchvision_model(name, pretrained)
        if in_channels != 3:
            _adapt_first_conv(model, in_channels)
        head = [_replace_head(model, num_classes)]
    if freeze_backbone:
        for p in model.parameters():
            p.requires_grad_(False)
        for module in head:
            for p in module.parameters():
                p.requires_grad_(True)
    return model


def _torchvision_model(name: str, pretrained: str | None) -> nn.Module:
    from torchvision import models

    if name not in models.list_models(module=models):
        raise UserError(f"unknown model {name!r}; choose tutorial_cnn, fastnet, fastnet_small or a torchvision "
                        f"classifier such as resnet18, vgg16, mobilenet_v3_small (`imgclf models` lists all)")
    weights = None
    if pretrained and not Path(pretrained).expanduser().exists():
        weights = _torchvision_weights(name, pretrained)
    model = models.get_model(name, weights=weights)
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


def load_weights(model: nn.Module, path: str, *, skip_mismatched: bool) -> None:
    """Load a state dict (or an imgclf checkpoint's) from `path` into `model`, safely.

    Prefixes left by DDP (`module.`) and torch.compile (`_orig_mod.`) are removed; with `skip_mismatched`,
    tensors whose shape differs (a classifier for other classes) are left as initialised.
    """
    obj = safe_load(path)
    state = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors; save one with torch.save(model.state_dict())")
    state = strip_prefixes(state)
    own = model.state_dict()
    if skip_mismatched:
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    matched = [k for k in state if k in own]
    if not matched:
        raise UserError(f"{path} has no weights that fit this model; is it for another architecture?")
    model.load_state_dict(state, strict=False)


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


def model_from_checkpoint(ckpt: dict, *, base: nn.Module | None = None) -> nn.Module:
    """Rebuild the network a checkpoint describes and load its weights (no download, no pretrained file).

    `base`: see `build_model`."""
    spec = ckpt["model"]
    model = build_model(spec["name"], num_classes=len(ckpt["classes"]), in_channels=ckpt["input"]["channels"],
                        img_size=ckpt["input"]["size"], base=base)
    state = ckpt.get("ema_state_dict") or ckpt["state_dict"]  # the averaged weights are the evaluated ones
    try:
        model.load_state_dict(strip_prefixes(state))
    except RuntimeError as err:
        raise UserError(f"checkpoint weights do not fit {spec['name']}: {str(err).splitlines()[0]}") from None
    return model.eval()
