"""Train and eval presets (notes 09-12).

The pipeline is split where it is cheapest: every picture is decoded once by `load_image` (made upright,
converted to the model's channels, short side resized to `size`, centre-cropped to size x size) into uint8;
whole batches are then augmented (imgclf.augment's operations) and normalised as tensors by `BatchTransform`,
on the training device.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps

from imgclf.augment import Augmentation, Draws, build

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


# Pillow's filters by the names input contracts give them (timm's pretrained_cfg, torchvision's InterpolationMode)
INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "nearest-exact": Image.Resampling.NEAREST,
                  "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                  "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
                  "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class Decoding:
    """How a picture is brought to side x side for a network: its shorter side resized to `resize_for(side)`
    with `interpolation` (a name of INTERPOLATIONS), then the centre side x side cropped, which keeps `crop_pct`
    of the resized shorter side. PLAIN, the default, is imgclf's own way (bilinear, the shorter side straight
    to the side); a pretrained network's input contract asks for its own (tf_efficientnet_lite0's: bicubic to
    256, then the centre 224: crop_pct 0.875)."""

    interpolation: str = "bilinear"
    crop_pct: float = 1.0  # in (0, 1]

    def resize_for(self, side: int) -> int:
        """The shorter side before the centre crop of `side`: timm's floor(side / crop_pct) (the 1e-6 keeps a
        ratio such as torchvision's 224/232 from flooring one short)."""
        return max(side, math.floor(side / self.crop_pct + 1e-6))

    def for_training(self) -> Decoding:
        """Training pictures' decoding: the interpolation alone (their crops are augmentation's business)."""
        return Decoding(self.interpolation)

    def record(self, size: int) -> dict:
        """The entries of a checkpoint's or an export's "input" record that state it for pictures of `size`
        (`resize_side`: the shorter side before the crop, for readers; `input_decoding` reads the others back);
        none for PLAIN, so that a from-scratch run's records stay as they were."""
        return {} if self == PLAIN else {"interpolation": self.interpolation, "crop_pct": self.crop_pct,
                                         "resize_side": self.resize_for(size)}

    def tag(self) -> str:
        """What tells this decoding apart in a cache key; "" for PLAIN (older caches keep their keys)."""
        return "" if self == PLAIN else f":{self.interpolation}:{self.crop_pct!r}"


PLAIN = Decoding()


def input_decoding(inp: Mapping) -> Decoding:
    """The Decoding an "input" record (a checkpoint's, an export's metadata, checked by `decoding_problem`)
    states; PLAIN for one written before these entries existed."""
    return Decoding(inp.get("interpolation", PLAIN.interpolation), float(inp.get("crop_pct", PLAIN.crop_pct)))


def decoding_problem(inp: Mapping) -> str | None:
    """What is wrong with the decoding entries of an "input" record (`Decoding.record`; all optional: older
    records have none), or None."""
    interpolation, crop = inp.get("interpolation", PLAIN.interpolation), inp.get("crop_pct", PLAIN.crop_pct)
    side, size = inp.get("resize_side"), inp.get("size")
    if not (isinstance(interpolation, str) and interpolation in INTERPOLATIONS):
        return f"input interpolation is {str(interpolation)[:40]!r}, not one of {', '.join(INTERPOLATIONS)}"
    if not (isinstance(crop, int | float) and not isinstance(crop, bool) and 0 < crop <= 1):
        return f"input crop_pct is {str(crop)[:40]!r}, not a number in (0, 1]"
    if side is not None and (type(side) is not int or type(size) is not int
                             or side != Decoding(interpolation, crop).resize_for(size)):
        return f"input resize_side {str(side)[:40]!r} is not floor(size / crop_pct) of its size and crop_pct"
    return None


def load_image(path, *, size: int, channels: int, decoding: Decoding = PLAIN) -> np.ndarray:
    """Decode one picture into a uint8 array of shape (size, size, channels).

    `path` is a file's path, a file object, or a picture already decoded (a PIL image: a video's frame),
    which then takes the same steps from here on. EXIF orientation is applied; grayscale, 16-bit, CMYK,
    palette and alpha images are converted; the short side is resized as `decoding` says (by default to
    `size`) and the centre cropped. Raises BadImage (never anything else for bad bytes).
    """
    quiet_libtiff()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on odd metadata: it decodes or fails
            opened = contextlib.nullcontext(path) if isinstance(path, Image.Image) else Image.open(path)
            with opened as img:
                if img.width * img.height > MAX_PIXELS:
                    raise BadImage(f"{img.width}x{img.height} pixels is over the {MAX_PIXELS:,}-pixel limit")
                short = decoding.resize_for(size)
                img.draft("RGB" if channels == 3 else "L", (short, short))  # JPEG: decode at reduced scale
                img = ImageOps.exif_transpose(img)
                img = _to_mode(img, channels)
                img = _resize_center_crop(img, size, short, INTERPOLATIONS[decoding.interpolation])
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


def _resize_center_crop(img: Image.Image, size: int, short: int | None = None,
                        resample: int = Image.BILINEAR) -> Image.Image:
    """The shorter side resized to `short` (default `size`) with `resample`, then the centre size x size."""
    w, h = img.size
    short = short or size
    if (w, h) != (size, size) or short != size:
        scale = short / min(w, h)
        nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
        img = img.resize((nw, nh), resample, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def resize_batch(images: torch.Tensor, size: int, decoding: Decoding = PLAIN) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), short side resized as `decoding` says (antialiased;
    bicubic when it says so, else bilinear) then centre-cropped."""
    n, c, h, w = images.shape
    short = decoding.resize_for(size)
    if (h, w) == (size, size) and short == size:
        return images
    scale = short / min(h, w)
    nh, nw = max(short, round(h * scale)), max(short, round(w * scale))
    mode = "bicubic" if decoding.interpolation == "bicubic" else "bilinear"
    _refuse_beyond_memory(n * c * size * size, f"{n} pictures of {c}x{size}x{size}")
    out = torch.empty(n, c, size, size, dtype=torch.uint8)
    step = max(1, min(1024, (256 << 20) // (4 * c * nh * nw)))  # float chunks of at most 256 MB
    for i in range(0, n, step):
        x = torch.nn.functional.interpolate(images[i : i + step].float(), size=(nh, nw), mode=mode,
                                            antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        out[i : i + step] = x[:, :, top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)
    return out


def _refuse_beyond_memory(nbytes: int, what: str) -> None:
    """UserError before `nbytes` are allocated when they are over half of this machine's memory (a huge
    --img-size on a built-in data set asked for 100 GB and ended in a traceback)."""
    import os

    from imgclf.errors import UserError

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > total // 2:
        raise UserError(f"{what} take {nbytes / 1e9:,.1f} GB in memory, over half of this machine's "
                        f"{total / 1e9:,.0f} GB; give a smaller --img-size")


def compute_mean_std(images: torch.Tensor, chunk: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images (uint16: 16-bit pictures), scaled to 0..1, in float64
    chunks (of about 64 MB unless `chunk` pictures are asked for: memory stays flat for a large, memory-mapped set)."""
    c = images.shape[1]
    full = 65535.0 if str(images.dtype).endswith("uint16") else 255.0
    chunk = chunk or max(1, (64 << 20) // (8 * c * images.shape[2] * images.shape[3]))
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for i in range(0, images.shape[0], chunk):
        x = torch.as_tensor(np.asarray(images[i : i + chunk])).to(torch.float64) / full
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / max(count, 1)
    std = (total_sq / max(count, 1) - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(max(v, 1e-3), 4) for v in std.tolist())


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
    """uint8 (N, C, H, W) batch -> normalised float batch, with the train preset's augmentation; a uint16 batch
    (16-bit pictures) is scaled by 1/65535 instead of 1/255.

    `augment`: a preset of `imgclf.augment.PRESETS`, run with `pad` (flip-crop's largest shift), crops to
    `size` and `options` (op name -> {option: value}, imgclf.augment.options) as its operations' options.
    Augmentation is per sample and driven only by `draws` (each operation its own stream of them), so a run is
    repeatable and resumable from any step. `size`: the side the model sees; pictures stored larger (the photo
    recipe keeps its training pictures at a larger side, for random-resized crops) are centre-cropped to it
    outside training (and after a preset that keeps their side).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"
    pad: int = 4
    size: int | None = None
    options: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    augmentation: Augmentation = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        given = {"crop": {"pad": self.pad}, "resized-crop": {"size": self.size}}
        merged = {op: {**given.get(op, {}), **self.options.get(op, {})} for op in {*given, *self.options}}
        object.__setattr__(self, "augmentation", build(self.augment, merged))

    def __call__(self, images: torch.Tensor, *, train: bool, draws: Draws | None = None,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """`draws` (imgclf.augment.Draws): the batch's random streams; without them, one `generator` (torch's
        global one when None) leads every draw."""
        x, full = images, 255.0
        if x.dtype == torch.uint16:  # 16-bit pictures (imgclf.bands): augmented as floats in 0..1
            x, full = x.to(dtype).div_(65535.0), 1.0
        if train and self.augmentation.ops:  # on uint8: a quarter of the bytes of float
            x = self.augmentation(x, draws or Draws.from_generator(generator, len(x)))
        if self.size is not None and x.shape[-1] > self.size:
            x = center_crop(x, self.size)
        # (x / 255 - mean) / std as one multiply-add, converted straight into the layout the model wants; a
        # 16-bit batch (--bf16-weights) is computed in float32 and rounded once
        work = dtype if dtype.itemsize >= 4 else torch.float32
        std = torch.tensor(self.std, dtype=torch.float64)
        scale = (1.0 / (full * std)).to(dtype=work, device=x.device).view(1, -1, 1, 1)
        shift = -torch.tensor(self.mean, dtype=torch.float64) / std
        shift = shift.to(dtype=work, device=x.device).view(1, -1, 1, 1)
        x = x.to(work, memory_format=memory_format, copy=True).mul_(scale).add_(shift)  # never the caller's
        return x if work == dtype else x.to(dtype)


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
    """Preset `kind` (none, flip, flip-crop, flip-crop-cutout: imgclf.augment.PRESETS) on a uint8 or float
    (N, C, H, W) batch, with shifts of up to `pad` pixels, every draw led by `generator` (torch's global one when
    None); `flip`: the rows to mirror (without it, a random half)."""
    return build(kind, {"crop": {"pad": pad}})(x, Draws.from_generator(generator, len(x), flip=flip))


def eval_preset(*, size: int, mean, std):
    """The torchvision equivalent of the eval path, for people who use PIL pictures directly."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
