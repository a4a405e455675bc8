"""Train and eval presets (notes 09-12).

The pipeline is split where it is cheapest: every picture is decoded once by `load_image` (made upright,
converted to the model's channels, short side resized to `size`, centre-cropped to size x size) into uint8;
whole batches are then augmented and normalised as tensors by `BatchTransform`, on the training device.
"""

from __future__ import annotations

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


def compute_mean_std(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images, scaled to 0..1, in float64 chunks."""
    c = images.shape[1]
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


@dataclass(frozen=True)
class BatchTransform:
    """uint8 (N, C, H, W) batch -> normalised float batch, with the train preset's augmentation.

    Augmentation is per sample (each picture its own flip and shift) and driven only by the generator
    passed in, so a run is repeatable and resumable from any step.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"
    pad: int = 4

    def __call__(self, images: torch.Tensor, *, train: bool, generator: torch.Generator | None = None,
                 flip: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        x = images
        if train and self.augment != "none":  # on uint8: a quarter of the bytes of float
            x = augment_batch(x, self.augment, pad=self.pad, generator=generator, flip=flip)
        # (x / 255 - mean) / std as one multiply-add, converted straight into the layout the model wants
        std = torch.tensor(self.std, dtype=torch.float64)
        scale = (1.0 / (255.0 * std)).to(dtype=dtype, device=x.device).view(1, -1, 1, 1)
        shift = -torch.tensor(self.mean, dtype=torch.float64) / std
        shift = shift.to(dtype=dtype, device=x.device).view(1, -1, 1, 1)
        return x.to(dtype, memory_format=memory_format, copy=True).mul_(scale).add_(shift)  # never the caller's


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
