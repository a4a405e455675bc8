"""Frozen configuration, filled once by the CLI and read by the builders. No torch here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from imgclf.errors import UserError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "onecycle")
AUGMENTS = ("none", "flip", "flip-crop", "flip-crop-cutout")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class DataConfig:
    data: str = "cifar10"  # a built-in name or a folder
    data_root: str = "data"  # where built-ins are downloaded / found
    img_size: int | None = None  # None: the data set's native size (folders: 224 unless small and square)
    val_fraction: float = 0.2  # for a single folder of classes
    augment: str = "flip-crop"
    crop_pad: int | None = None  # flip-crop shift in pixels; None: an eighth of the side (4 at 32)
    batch_size: int = 128  # global batch size, split across processes
    eval_batch_size: int = 1024
    strict: bool = False  # check every file before training and fail on any bad one
    cache_dir: str | None = None  # default: $XDG_CACHE_HOME/imgclf


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tutorial_cnn"
    pretrained: str | None = None  # a local file, or a torchvision weights name such as IMAGENET1K_V1
    freeze_backbone: bool = False


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    epochs: int = 10
    lookahead: bool = False  # average the weights every 5 steps and continue from the average (optim.Lookahead)


@dataclass(frozen=True)
class RunConfig:
    out: str = "runs/run"
    device: str = "auto"
    seed: int = 0
    # bf16 autocast where the hardware has it (AVX512-BF16/AMX CPUs, recent GPUs), else fp32. Runs stay
    # repeatable and resume bit-exactly across processes; within one process oneDNN's kernel choices can
    # depend on what ran before, so in-process comparisons (tests) pin fp32.
    precision: str = "auto"
    channels_last: bool = True  # NHWC convolutions: faster with oneDNN and tensor cores (benchmarks/)
    compile: bool = False
    log_every: int = 50  # TensorBoard train-loss interval, in steps
    stop_after: int | None = None  # stop (resumably) after this many epochs in this invocation
    ema: bool = False  # evaluate and save an exponential moving average of the weights
    tta: bool = False  # final evaluation averages flipped and shifted views (engine.tta_logits)


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        parts = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "run": RunConfig}
        kwargs = {}
        for name, klass in parts.items():
            known = {f.name for f in dataclasses.fields(klass)}
            kwargs[name] = klass(**{k: v for k, v in d.get(name, {}).items() if k in known})
        return cls(**kwargs).validated()

    def validated(self) -> TrainConfig:
        """Return self, or raise UserError naming the first invalid value."""
        d, o, r = self.data, self.optim, self.run
        _check(d.batch_size >= 1, f"--batch-size must be at least 1, got {d.batch_size}")
        _check(d.img_size is None or 8 <= d.img_size <= 4096, f"--img-size must be 8..4096, got {d.img_size}")
        _check(0.0 < d.val_fraction < 1.0, f"--val-fraction must be between 0 and 1, got {d.val_fraction}")
        _check(d.crop_pad is None or d.crop_pad >= 0, f"--crop-pad must be >= 0, got {d.crop_pad}")
        _check(d.augment in AUGMENTS, f"unknown --augment {d.augment!r}; choose one of {', '.join(AUGMENTS)}")
        _check(o.optimizer in OPTIMIZERS, f"unknown --optimizer {o.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        _check(o.schedule in SCHEDULES, f"unknown --schedule {o.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        _check(o.lr > 0, f"--lr must be positive, got {o.lr}")
        _check(o.epochs >= 1, f"--epochs must be at least 1, got {o.epochs}")
        _check(0.0 <= o.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {o.label_smoothing}")
        _check(o.weight_decay >= 0, f"--weight-decay must be >= 0, got {o.weight_decay}")
        _check(r.precision in PRECISIONS, f"unknown --precision {r.precision!r}; choose one of {', '.join(PRECISIONS)}")
        _check(r.stop_after is None or r.stop_after >= 1, "--stop-after must be at least 1")
        return self


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


# Named recipes: values that replace the defaults above unless a flag sets them explicitly.
RECIPES: dict[str, dict[str, dict]] = {
    "default": {},
    # Exactly the notes' sections 26-30: SGD 0.01 without momentum, batch 64, no augmentation.
    "notes": {
        "data": {"batch_size": 64, "augment": "none"},
        "optim": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0,
                  "schedule": "constant", "warmup_epochs": 0.0, "label_smoothing": 0.0},
    },
    # The CIFAR speed records' recipe (airbench94) for the fastnet model, scaled to batch 512: Nesterov SGD
    # at momentum 0.85, per-step weight decay 1e-3, label smoothing 0.2, shifts of up to 2 pixels, flips
    # alternating per picture, Lookahead averaging, bf16 where the hardware has it, flip-and-shift test-time
    # augmentation. On a GPU use --batch-size 1024 --lr 1.5 (the records' batch). Measurements: benchmarks/RESULTS.md.
    "fast": {
        "model": {"name": "fastnet"},
        "data": {"batch_size": 512, "augment": "flip-crop", "crop_pad": 2, "eval_batch_size": 1000},
        "optim": {"optimizer": "sgd", "lr": 0.75, "momentum": 0.85, "nesterov": True, "weight_decay": 1.33e-3,
                  "schedule": "onecycle", "warmup_epochs": 0.5, "label_smoothing": 0.2, "epochs": 4,
                  "lookahead": True},
        "run": {"tta": True},
    },
}


def parse_size(text: str) -> tuple[int, int, int]:
    """'3x32x32' -> (3, 32, 32); raise UserError on anything else."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise UserError(f"malformed size {text!r}; write CxHxW, for example 3x32x32")
    return dims  # type: ignore[return-value]
