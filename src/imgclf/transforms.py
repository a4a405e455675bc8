"""Train and eval presets (notes 09-12).

The pipeline is split where it is cheapest: every picture is decoded once by `load_image` (made upright,
converted to the model's channels, short side resized to `size`, centre-cropped to size x size) into uint8;
whole batches are then augmented and normalised as tensors by `BatchTransform`, on the training device.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

# Published per-channel statistics of the built-in data sets (pixels scaled to 0..1).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit; larger pictures are refused, never decoded


class BadImage(ValueError):
    """A file that is not a picture we can decode; the message says why."""


def load_image(path, *, size: int, channels: int) -> np.ndarray:
    """Decode one picture into a uint8 array of shape (size, size, channels).

    EXIF orientation is applied; grayscale, 16-bit, CMYK, palette and alpha images are converted; the short
    side is resized to `size` and the centre cropped. Raises BadImage (never anything else for bad bytes).
    """
    quiet_libtiff()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on odd metadata: it decodes or fails
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise BadImage(f"{img.width}x{img.height} pixels is over the {MAX_PIXELS:,}-pixel limit")
                img.draft("RGB" if channels == 3 else "L", (size, size))  # JPEG: decode at reduced scale
                img = ImageOps.exif_transpose(img)
                img = _to_mode(img, channels)
                img = _resize_center_crop(img, size)
                arr = np.array(img, dtype=np.uint8)  # a writable copy, safe for torch.from_numpy
    except BadImage:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            EOFError, TypeError, IndexError, KeyError, ZeroDivisionError, MemoryError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadImage(reason) from None
    return arr.reshape(size, size, channels)


@functools.cache
def quiet_libtiff() -> None:
    """Stop libtiff, Pillow's TIFF codec, printing its own warnings and errors on stderr ("ZIPDecode: Decoding
    error at scanline 0"), lines that no option controls: a TIFF it cannot decode is told once, by imgclf's own
    line (BadImage). libtiff's handlers are process-wide, so this is done once per process, before its first
    picture (not on import); a Pillow without libtiff is left as it is."""
    import ctypes

    from PIL import _imaging

    try:
        codecs = ctypes.CDLL(_imaging.__file__)  # the loaded module: its symbols include the libtiff it links
        for name in ("TIFFSetWarningHandler", "TIFFSetErrorHandler"):
            setter = getattr(codecs, name)
            setter.restype, setter.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
            setter(None)
    except (OSError, AttributeError):
        pass


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grayscale: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("P", "PA", "LA", "RGBA", "La") or "transparency" in img.info:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))  # transparent -> white, as viewers show
        img = Image.alpha_composite(background, img)
    return img.convert("RGB" if channels == 3 else "L")


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), short side resized then centre-cropped."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = torch.empty(n, c, size, size, dtype=torch.uint8)
    for i in range(0, n, 1024):
        x = torch.nn.functional.interpolate(images[i : i + 1024].float(), size=(nh, nw), mode="bilinear",
                                            antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        out[i : i + 1024] = x[:, :, top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)
    return out


def compute_mean_std(images: torch.Tensor, chunk: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images, scaled to 0..1, in float64 chunks (of about
    64 MB unless `chunk` pictures are asked for: memory stays flat for a large, memory-mapped set)."""
    c = images.shape[1]
    chunk = chunk or max(1, (64 << 20) // (8 * c * images.shape[2] * images.shape[3]))
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for i in range(0, images.shape[0], chunk):
        x = torch.as_tensor(np.asarray(images[i : i + chunk])).to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / max(count, 1)
    std = (total_sq / max(count, 1) - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(max(v, 1e-3), 4) for v in std.tolist())


# ---------------------------------------------------------------- the photo recipe (random-resized crops and more)

AUTO_AUGMENTS = ("none", "trivialaugment", "randaugment")


@functools.cache
def _policy(name: str):
    from torchvision.transforms import v2

    return {"trivialaugment": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}[name]()


@dataclass(frozen=True)
class PhotoAugment:
    """The photo recipe's training augmentation, for uint8 pictures stored at a side S >= `size`.

    Each picture gets a random-resized crop (an area `scale` of the stored square, aspect `ratio`, as
    torchvision's RandomResizedCrop draws them), mirrored at random and resized to `size` (one grid_sample
    for the whole batch); then an auto-augment `policy` (torchvision.transforms.v2, on uint8); then, with
    probability `erasing`, one rectangle filled with the mean colour `fill` (0 once normalised, as timm's
    RandomErasing fills by default). Every random number of a picture comes from its own seed, so a process
    can augment only its share of a global batch and still get what one process would.
    """

    size: int
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    policy: str = "trivialaugment"
    erasing: float = 0.25
    fill: tuple[int, ...] = (128, 128, 128)

    def __call__(self, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """uint8 (N, C, S, S) and one seed per picture -> uint8 (N, C, size, size)."""
        u = torch.stack([torch.rand(10, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                         for s in seeds])  # (N, 10): every draw of each picture
        x = self._crop_flip(images, u)
        if self.policy != "none":
            with torch.random.fork_rng(devices=[]):  # the policy draws from the global generator: seed it
                for i, seed in enumerate(seeds):
                    torch.default_generator.manual_seed(seed)  # torch.manual_seed also seeds every GPU: slower
                    x[i] = _policy(self.policy)(x[i])
        return self._erase(x, u) if self.erasing > 0 else x

    def _crop_flip(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        n, c, side, _ = images.shape
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        area = self.scale[0] + u[:, 0] * (self.scale[1] - self.scale[0])  # share of the stored square
        aspect = torch.exp(lo + u[:, 1] * (hi - lo))
        w, h = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)  # of the side
        cx, cy = w / 2 + u[:, 2] * (1 - w), h / 2 + u[:, 3] * (1 - h)  # centres, in [0, 1]
        mirror = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)  # output [-1, 1] -> input [-1, 1]
        theta[:, 0, 0], theta[:, 0, 2] = w * mirror, 2 * cx - 1
        theta[:, 1, 1], theta[:, 1, 2] = h, 2 * cy - 1
        theta = theta.to(device=images.device, dtype=torch.float32)
        grid = torch.nn.functional.affine_grid(theta, [n, c, self.size, self.size], align_corners=False)
        out = torch.nn.functional.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                                              align_corners=False)  # (N, C, size, size)
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def _erase(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        n, c, side, _ = x.shape
        area = (0.02 + u[:, 6] * (1 / 3 - 0.02)) * side * side  # RandomErasing's default ranges
        aspect = torch.exp(math.log(0.3) + u[:, 7] * (math.log(1 / 0.3) - math.log(0.3)))
        eh = (area * aspect).sqrt().round().clamp(1, side)
        ew = (area / aspect).sqrt().round().clamp(1, side)
        top, left = (u[:, 8] * (side - eh + 1)).floor(), (u[:, 9] * (side - ew + 1)).floor()
        ys = torch.arange(side, dtype=torch.float64).view(1, side, 1)
        xs = torch.arange(side, dtype=torch.float64).view(1, 1, side)
        hole = ((ys >= top.view(n, 1, 1)) & (ys < (top + eh).view(n, 1, 1)) & (xs >= left.view(n, 1, 1))
                & (xs < (left + ew).view(n, 1, 1)) & (u[:, 5] < self.erasing).view(n, 1, 1))
        fill = torch.tensor(self.fill[:c], dtype=torch.uint8, device=x.device).view(1, c, 1, 1)
        return torch.where(hole.unsqueeze(1).to(x.device), fill, x)


@dataclass(frozen=True)
class Mixer:
    """Mixup (`mixup` > 0: its Beta alpha) and/or CutMix (`cutmix` > 0) of a normalised batch, with soft
    labels; with both, CutMix is chosen with probability `switch` (timm's switch_prob). torchvision's
    transforms.v2 does the mixing, seeded per batch."""

    num_classes: int
    mixup: float = 0.0
    cutmix: float = 0.0
    switch: float = 0.5

    def __call__(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms import v2

        choices = []
        if self.mixup > 0:
            choices.append((v2.MixUp(alpha=self.mixup, num_classes=self.num_classes), 1 - self.switch))
        if self.cutmix > 0:
            choices.append((v2.CutMix(alpha=self.cutmix, num_classes=self.num_classes), self.switch))
        if not choices or len(y) < 2:
            return x, y
        mix = choices[0][0] if len(choices) == 1 else v2.RandomChoice([t for t, _ in choices],
                                                                       p=[p for _, p in choices])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return mix(x, y)


@dataclass(frozen=True)
class BatchTransform:
    """uint8 (N, C, H, W) batch -> normalised float batch, with the train preset's augmentation.

    Augmentation is per sample (each picture its own flip and shift) and driven only by the generator
    passed in (the photo recipe: by one seed per picture), so a run is repeatable and resumable from any step.
    `size`: the side the model sees; pictures stored larger (the photo recipe keeps its training pictures
    at a larger side, for random-resized crops) are centre-cropped to it outside training.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"
    pad: int = 4
    size: int | None = None
    photo: PhotoAugment | None = None  # with augment "photo"

    def __call__(self, images: torch.Tensor, *, train: bool, generator: torch.Generator | None = None,
                 flip: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 seeds: list[int] | None = None) -> torch.Tensor:
        x = images
        if train and self.augment == "photo":
            x = self.photo(x, seeds)
        elif train and self.augment != "none":  # on uint8: a quarter of the bytes of float
            x = augment_batch(x, self.augment, pad=self.pad, generator=generator, flip=flip)
        if self.size is not None and x.shape[-1] > self.size:
            x = center_crop(x, self.size)
        # (x / 255 - mean) / std as one multiply-add, converted straight into the layout the model wants
        std = torch.tensor(self.std, dtype=torch.float64)
        scale = (1.0 / (255.0 * std)).to(dtype=dtype, device=x.device).view(1, -1, 1, 1)
        shift = -torch.tensor(self.mean, dtype=torch.float64) / std
        shift = shift.to(dtype=dtype, device=x.device).view(1, -1, 1, 1)
        return x.to(dtype, memory_format=memory_format, copy=True).mul_(scale).add_(shift)  # never the caller's


def progressive_side(epoch: int, *, epochs: int, start: int | None, full: int) -> int:
    """The training side of epoch `epoch` (counted from 0) under progressive resizing: `start` in the first
    epoch, growing linearly to `full`, which is reached at three quarters of the run and kept to its end (the
    last epochs at full size settle BatchNorm's statistics for evaluation). `full` throughout when `start` is
    None or not smaller. Pure: a resumed run trains each epoch at the same side."""
    ramp = (3 * epochs) // 4  # 0 for a one-epoch run: it trains at full size
    if start is None or start >= full or epoch >= ramp:
        return full
    return round(start + (full - start) * epoch / ramp)


def resized(x: torch.Tensor, side: int) -> torch.Tensor:
    """A normalised float batch (N, C, H, W) resized to side x side (antialiased bilinear); `x` if it has it."""
    if x.shape[-2:] == (side, side):
        return x
    return torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                                           align_corners=False)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre size x size of (N, C, H, W) pictures (a view)."""
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


def augment_batch(x: torch.Tensor, kind: str, *, pad: int, generator: torch.Generator | None,
                  flip: torch.Tensor | None = None) -> torch.Tensor:
    """Horizontal flips (of the samples where the bool `flip` is true; without it, of a random half), then
    (for flip-crop*) random shifts of up to `pad` pixels (reflect-padded borders), then (for *cutout) one
    grey square, each per sample; for uint8 or float (N, C, H, W) batches. Random numbers are drawn on the
    generator's device (the CPU without one)."""
    n, _, h, w = x.shape
    dev = x.device
    rng = dict(generator=generator, device=generator.device if generator is not None else "cpu")
    if flip is None:
        flip = torch.rand(n, **rng) < 0.5
    x = torch.where(flip.to(dev).view(n, 1, 1, 1), x.flip(3), x)
    if kind.startswith("flip-crop") and pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")  # (N, C, H+2p, W+2p)
        dy = torch.randint(0, 2 * pad + 1, (n,), **rng).to(dev)
        dx = torch.randint(0, 2 * pad + 1, (n,), **rng).to(dev)
        windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # a view: (N, C, 2p+1, 2p+1, H, W)
        x = windows[torch.arange(n, device=dev), :, dy, dx]  # one window per sample: (N, C, H, W)
    if kind.endswith("cutout"):
        size = max(1, h // 4)
        cy = torch.randint(0, h, (n,), **rng).to(dev).view(n, 1, 1)
        cx = torch.randint(0, w, (n,), **rng).to(dev).view(n, 1, 1)
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        hole = ((ys - cy).abs() <= size // 2) & ((xs - cx).abs() <= size // 2)
        x = x.masked_fill(hole.unsqueeze(1), 0.5 if x.is_floating_point() else 128)
    return x


def eval_preset(*, size: int, mean, std):
    """The torchvision equivalent of the eval path, for people who use PIL pictures directly."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
