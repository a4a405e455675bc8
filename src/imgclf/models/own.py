"""imgclf's own networks (notes 15-21): the notes' network (`tutorial_cnn`) and a fast CIFAR network
(`fastnet`, `fastnet_small`, `fastnet_wide`), and their adapter. They are trained from the data: no input
contract; each class names its head in `head_path`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from imgclf.errors import UserError
from imgclf.models.adapter import Adapter, Say, say_on_stderr
from imgclf.models.weights import load_weights, refuse_weights_name


class TutorialCNN(nn.Module):
    """The network of note 21, for any input channels and size (shapes shown for 3x32x32)."""

    head_path = "classifier.2"  # the last Linear: what a new head replaces, and what trains when frozen

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


class GlobalMaxPool(nn.Module):
    """(N, C, H, W) -> (N, C): the largest value of each channel, as AdaptiveMaxPool2d(1) and Flatten give, but
    as a plain max-pool over the whole map: its backward writes each input's gradient once, where the
    adaptive pool's adds them up with atomics on a GPU (benchmarks/RESULTS.md). The same outputs and gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.max_pool2d(x, x.shape[2:]).flatten(1)


class FastNet(nn.Module):
    """A small CIFAR network after the speed records (airbench, hlb-CIFAR10): a 2x2 whitening first layer
    (set from the data by `init_whitening`, frozen), three conv groups, global max-pool, a linear head
    and a fixed logit scale. Shapes shown for 3x32x32 and the default widths; pictures need a side >= 16."""

    head_path = "head"

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
            GlobalMaxPool(),  # (N, w2)
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


class OwnAdapter(Adapter):
    """imgclf's own networks (OWN_MODELS): built from the data's shape, a pretrained file loaded where its
    tensors fit; the head is the layer the class names in `head_path`."""

    family = "own"

    def build(self, *, num_classes: int, in_channels: int = 3, img_size: int = 32, pretrained: str | None = None,
              model_args: str | dict | None = None, base: nn.Module | None = None, say: Say | None = None) -> nn.Module:
        if model_args:
            raise UserError(f"--model-args is for timm/NAME models and FILE.py:ClassName networks, not {self.name}")
        if pretrained:
            refuse_weights_name(pretrained, self.name)
        model = OWN_MODELS[self.name](num_classes=num_classes, in_channels=in_channels, img_size=img_size)
        if pretrained:
            report = load_weights(model, pretrained, skip_mismatched=True)
            (say or say_on_stderr)(self.describe_load(model, report, num_classes))
        return model

    def head(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(type(model).head_path)]
