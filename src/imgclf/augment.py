"""Training augmentation as a table of small named operations (notes 11-12).

`OPS` maps a name to an operation: a frozen dataclass whose fields are its options and whose
`__call__(x, draws)` takes a uint8 (or float in 0..1) batch (N, C, H, W) on the training device and returns one.
`PRESETS` names, for each `--augment` value, the operations it runs, in order. Each operation draws its random
numbers only from its own stream, named by the operation (`Draws`), so adding, removing or reordering one
operation never changes what the others draw: a new operation changes no existing run.

To add an operation (this file, and its test):
1. write its class below: options as fields with defaults, `per_picture` (True when it draws only through
   `draws.uniform` / `draws.seeds`, so that each process can augment just its own share of a batch), and
   `__call__(x, draws)` that draws only from its own stream under its name (a torchvision.transforms.v2
   transform runs per picture through `each_picture`);
2. enter it in `OPS`, and in the `PRESETS` that should run it (a new preset name also goes into
   `config.AUGMENTS`; a test keeps the two equal);
3. if a flag sets one of its options: declare the flag in `config.DataConfig`, give the option's value in
   `options` below and the flag in `FLAGS` (so that the flag given without its operation switches it on or
   is refused in one line, never silently ignored).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from imgclf.config import LONG_RUN, DataConfig, flag_of
from imgclf.errors import UserError


def mix_seed(*values) -> int:
    """A 63-bit seed from several integers or names, so (seed, epoch, step, op) streams never collide."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# The batch stream of the flip-crop family as it was before the table: the shifts took the first two draws per
# picture, cutout the next two. Those two keep drawing there, so that runs made before replay byte for byte.
SHARED = None


@dataclass(frozen=True)
class Draws:
    """Where the random numbers of one training batch come from: (run seed, epoch, step) and each row's place
    in the global batch. An operation asks for its own stream by its name; `flip`: the loader's schedule of
    mirrored rows (each picture every other epoch), or None."""

    seed: int
    epoch: int
    step: int
    places: tuple[int, ...]
    device: torch.device = torch.device("cpu")
    flip: torch.Tensor | None = None

    @classmethod
    def from_generator(cls, generator: torch.Generator | None, n: int, *, flip=None) -> Draws:
        """Draws for a batch of `n` led by one generator (torch's global one when None): for direct calls."""
        device = generator.device if generator is not None else torch.device("cpu")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
        return cls(seed, 0, 0, tuple(range(n)), device, flip)

    def generator(self, op: str | None, *, skip: int = 0) -> torch.Generator:
        """The whole batch's stream of `op`, on `device` (SHARED: the flip-crop family's, past `skip` draws
        per picture). An operation that draws here sees every row of the global batch in every process."""
        key = (self.seed, self.epoch, self.step + 1) + (() if op is SHARED else (op,))
        gen = torch.Generator(device=self.device).manual_seed(mix_seed(*key))
        for _ in range(skip):  # randint of any range below 2**32 advances the generator by one draw a picture
            torch.randint(0, 2, (len(self.places),), generator=gen, device=self.device)
        return gen

    def seeds(self, op: str) -> list[int]:
        """One seed per row: a function of the picture's place in the global batch and `op` alone."""
        return [mix_seed(self.seed, self.epoch, self.step + 1, place, op) for place in self.places]

    def uniform(self, op: str, k: int) -> torch.Tensor:
        """(N, k) float64 uniform numbers on the CPU, each row from its picture's own stream of `op`."""
        return torch.stack([torch.rand(k, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                            for s in self.seeds(op)])


def each_picture(transform: Callable, x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """`transform` (a torchvision.transforms.v2 transform, which draws from torch's global generator) on each
    picture with that generator seeded by the picture's seed; the caller's generator state is kept."""
    out = []
    with torch.random.fork_rng(devices=[]):
        for picture, seed in zip(x, seeds, strict=True):
            torch.default_generator.manual_seed(seed)  # torch.manual_seed also seeds every GPU: slower
            out.append(transform(picture))
    return torch.stack(out)


# ---------------------------------------------------------------- the operations


@dataclass(frozen=True)
class Flip:
    """Mirror left-right the rows the loader's schedule names; without one, each with probability 1/2."""

    per_picture: ClassVar[bool] = True

    def __call__(self, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        flip = draws.flip if draws.flip is not None else draws.uniform("flip", 1)[:, 0] < 0.5
        return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


@dataclass(frozen=True)
class Shift:
    """Random shifts of up to `pad` pixels (reflect-padded borders, a window of the padded picture)."""

    pad: int = 4
    per_picture: ClassVar[bool] = False

    def __call__(self, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        if self.pad <= 0:
            return x
        n, _, h, w, dev, pad = *x.shape, x.device, self.pad
        gen = draws.generator(SHARED)
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")  # (N, C, H+2p, W+2p)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(dev)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(dev)
        windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # a view: (N, C, 2p+1, 2p+1, H, W)
        return windows[torch.arange(n, device=dev), :, dy, dx]  # one window per sample: (N, C, H, W)


@dataclass(frozen=True)
class Cutout:
    """One grey square of a quarter of the side per picture, centred anywhere (clipped at the borders)."""

    per_picture: ClassVar[bool] = False

    def __call__(self, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        n, _, h, w, dev = *x.shape, x.device
        gen = draws.generator(SHARED, skip=2)  # after the shifts' two draws a picture, whether they run or not
        size = max(1, h // 4)
        cy = torch.randint(0, h, (n,), generator=gen, device=gen.device).to(dev).view(n, 1, 1)
        cx = torch.randint(0, w, (n,), generator=gen, device=gen.device).to(dev).view(n, 1, 1)
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        hole = ((ys - cy).abs() <= size // 2) & ((xs - cx).abs() <= size // 2)
        return x.masked_fill(hole.unsqueeze(1), 0.5 if x.is_floating_point() else 128)


@dataclass(frozen=True)
class ResizedCrop:
    """A random-resized crop of each picture (an area `scale` of it, aspect `ratio`, as torchvision's
    RandomResizedCrop draws them), resized to `size` (None: the input's side) by one grid_sample a batch."""

    size: int | None = None
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    per_picture: ClassVar[bool] = True

    def __call__(self, images: torch.Tensor, draws: Draws) -> torch.Tensor:
        n, c, side, _ = images.shape
        size = self.size or side
        u = draws.uniform("resized-crop", 4)
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        area = self.scale[0] + u[:, 0] * (self.scale[1] - self.scale[0])  # share of the stored square
        aspect = torch.exp(lo + u[:, 1] * (hi - lo))
        w, h = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)  # of the side
        cx, cy = w / 2 + u[:, 2] * (1 - w), h / 2 + u[:, 3] * (1 - h)  # centres, in [0, 1]
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)  # output [-1, 1] -> input [-1, 1]
        theta[:, 0, 0], theta[:, 0, 2] = w, 2 * cx - 1
        theta[:, 1, 1], theta[:, 1, 2] = h, 2 * cy - 1
        theta = theta.to(device=images.device, dtype=torch.float32)
        grid = torch.nn.functional.affine_grid(theta, [n, c, size, size], align_corners=False)
        out = torch.nn.functional.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                                              align_corners=False)  # (N, C, size, size)
        return out.round_().clamp_(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else out


@functools.cache
def _policy(name: str):
    from torchvision.transforms import v2

    return {"trivialaugment": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}[name]()


@dataclass(frozen=True)
class Policy:
    """An auto-augment policy of torchvision.transforms.v2 on each uint8 picture (config.AUTO_AUGMENTS;
    "none": nothing)."""

    policy: str = "trivialaugment"
    per_picture: ClassVar[bool] = True

    def __call__(self, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        if self.policy == "none":
            return x
        return each_picture(_policy(self.policy), x, draws.seeds("policy"))


@dataclass(frozen=True)
class Erase:
    """With probability `erasing`, one rectangle of each uint8 picture filled with `fill` (the mean colour: 0 once
    normalised, as timm's RandomErasing fills by default); torchvision's default area and aspect ranges."""

    erasing: float = 0.25
    fill: tuple[int, ...] = (128, 128, 128)
    per_picture: ClassVar[bool] = True

    def __call__(self, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        if self.erasing <= 0:
            return x
        n, c, side, _ = x.shape
        u = draws.uniform("erase", 5)
        area = (0.02 + u[:, 1] * (1 / 3 - 0.02)) * side * side
        aspect = torch.exp(math.log(0.3) + u[:, 2] * (math.log(1 / 0.3) - math.log(0.3)))
        eh = (area * aspect).sqrt().round().clamp(1, side)
        ew = (area / aspect).sqrt().round().clamp(1, side)
        top, left = (u[:, 3] * (side - eh + 1)).floor(), (u[:, 4] * (side - ew + 1)).floor()
        ys = torch.arange(side, dtype=torch.float64).view(1, side, 1)
        xs = torch.arange(side, dtype=torch.float64).view(1, 1, side)
        hole = ((ys >= top.view(n, 1, 1)) & (ys < (top + eh).view(n, 1, 1)) & (xs >= left.view(n, 1, 1))
                & (xs < (left + ew).view(n, 1, 1)) & (u[:, 0] < self.erasing).view(n, 1, 1))
        fill = torch.tensor(self.fill[:c], device=x.device).view(1, c, 1, 1)
        fill = (fill / 255.0 if x.is_floating_point() else fill).to(x.dtype)  # a float batch holds 0..1
        return torch.where(hole.unsqueeze(1).to(x.device), fill, x)


# ---------------------------------------------------------------- the table, the presets, the flags

OPS: dict[str, type] = {"flip": Flip, "crop": Shift, "cutout": Cutout, "resized-crop": ResizedCrop,
                        "policy": Policy, "erase": Erase}

PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "flip": ("flip",),
    "flip-crop": ("flip", "crop"),  # CIFAR's measured recipe (and the short-run default for photos)
    "flip-crop-cutout": ("flip", "crop", "cutout"),
    "photo": ("resized-crop", "flip", "policy", "erase"),  # the photo recipe (docs/usage.md: Your own photos)
}

# DataConfig fields that set an operation's option: (the operation, the value with which it does nothing).
NOTHING = object()  # an option with no such value
FLAGS: dict[str, tuple[str, object]] = {"crop_pad": ("crop", 0), "crop_scale": ("resized-crop", NOTHING),
                                        "auto_augment": ("policy", "none"), "random_erasing": ("erase", 0.0)}


@dataclass(frozen=True)
class Augmentation:
    """A preset's operations, run in order on a batch (nothing for "none")."""

    name: str
    ops: tuple = ()

    @property
    def per_picture(self) -> bool:
        """Every operation draws per picture: each process may augment only its share of a global batch."""
        return all(op.per_picture for op in self.ops)

    def __call__(self, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        for op in self.ops:
            x = op(x, draws)
        return x


def build(preset: str, options: Mapping[str, Mapping[str, object]] | None = None) -> Augmentation:
    """The operations of `preset`, each with its options from `options` (op name -> {option: value}), the
    class's defaults for the rest."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; one of {', '.join(PRESETS)}")
    options = options or {}
    return Augmentation(preset, tuple(OPS[name](**options.get(name, {})) for name in PRESETS[preset]))


def options(cfg: DataConfig, *, size: int, mean: tuple[float, ...], epochs: int) -> dict[str, dict]:
    """Each operation's options from the configuration: flip-crop's shift (an eighth of the side unless
    --crop-pad), the photo recipe's crops at the model's side and its strength by the run's length where
    `cfg` leaves it open (strong from LONG_RUN epochs on: benchmarks/RESULTS.md, pets at 3 epochs)."""
    long = epochs >= LONG_RUN
    return {"crop": {"pad": max(1, size // 8) if cfg.crop_pad is None else cfg.crop_pad},
            "resized-crop": {"size": size, "scale": (_given(cfg.crop_scale, 0.25 if long else 0.35), 1.0)},
            "policy": {"policy": _given(cfg.auto_augment, "trivialaugment" if long else "none")},
            "erase": {"erasing": _given(cfg.random_erasing, 0.25 if long else 0.0),
                      "fill": tuple(round(255 * m) for m in mean)}}


def _given(value, default):
    return default if value is None else value


def choose(cfg: DataConfig, *, photos: bool, epochs: int) -> str:
    """The preset `cfg` asks for. "auto": the photo recipe for photos on runs of LONG_RUN epochs or more,
    flip-crop for small square pictures (CIFAR's measured recipe) and short runs, where it measured best on
    photos too; unless an option of another preset's operation is given (--crop-scale, --auto-augment,
    --random-erasing: the photo recipe; --crop-pad: flip-crop), which switches that preset on. An option
    whose operation the chosen preset lacks is refused in one line, never silently ignored."""
    given = {field: (op, getattr(cfg, field)) for field, (op, idle) in FLAGS.items()
             if getattr(cfg, field) is not None and getattr(cfg, field) != idle}
    wanted = {op for op, _ in given.values()}
    if cfg.augment == "auto":
        default = "photo" if photos and epochs >= LONG_RUN else "flip-crop"
        fits = [name for name in (default, *PRESETS) if wanted <= set(PRESETS[name])]
        if not fits:
            shown = ", ".join(f"{_flag(field)} ({op})" for field, (op, _) in given.items())
            raise UserError(f"{shown} set operations of different augmentations; choose one with --augment "
                            f"({', '.join(PRESETS)}) and give only its options")
        return fits[0]
    for field, (op, value) in given.items():
        if op not in PRESETS[cfg.augment]:
            idle = FLAGS[field][1]
            other = next(name for name in PRESETS if op in PRESETS[name])
            drop = "leave it out" + ("" if idle is NOTHING else f" (or give {_flag(field)} {idle})")
            raise UserError(f"{_flag(field)} {value} sets the {op} operation, which --augment {cfg.augment} "
                            f"does not run; {drop}, or use --augment {other} or auto")
    return cfg.augment


def _flag(field: str) -> str:
    return next(flag_of(f) for f in dataclasses.fields(DataConfig) if f.name == field)
