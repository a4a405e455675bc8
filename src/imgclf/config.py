"""Frozen configuration, filled once by the CLI and read by the builders. No torch here."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from imgclf.errors import UserError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "onecycle")
AUGMENTS = ("auto", "none", "flip", "flip-crop", "flip-crop-cutout", "photo")
AUTO_AUGMENTS = ("none", "trivialaugment", "randaugment")
# The photo recipe's strong augmentations (auto-augment, erasing, small crops) pay off on long runs and cost
# accuracy on short ones (measured: benchmarks/RESULTS.md, pets at 3 epochs); from this many epochs on they are on.
LONG_RUN = 10
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BALANCES = ("none", "sampler", "loss")
MONITORS = ("val_acc", "val_loss", "val_macro_f1")  # imgclf.metrics.MONITORS says which way is better
# Upper bounds of numeric flags: far beyond any sensible value, low enough that nothing overflows.
MAX_SIDE = 4096  # pixels, a side of an input picture
MAX_CHANNELS = 64  # channels of an input picture (--input-size)
MAX_BATCH = 65536  # pictures in one batch
MAX_EPOCHS = 100_000
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits


def option(default, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
           resumable: bool = False, metavar: str | None = None, none: str = "none", const: str | None = None,
           words: tuple[str, ...] = ()):
    """A configuration field and its command-line flag in one declaration: `imgclf.cli` builds the flag
    (`--field-name` unless `flag` says otherwise), its help and its shown default from this, so `--help`
    cannot disagree with the code. `resumable`: the flag may differ from the run being resumed; `none`: what
    a default of None means, for the help; `const`: the value of the flag given without one; `words`: words
    a number flag also takes (`--batch-size auto`)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices,
                                            "resumable": resumable, "metavar": metavar, "none": none,
                                            "const": const, "words": words})


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a configuration field declared with `option`."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


@dataclass(frozen=True)
class DataConfig:
    data: str = option("cifar10", "cifar10, cifar100, mnist, fashion-mnist, or a folder (see README)",
                       resumable=True)
    data_root: str = option("data", "where built-in data sets are downloaded and found", resumable=True)
    img_size: int | None = option(None, "side of the square input", none="native; photos 224")
    labels: str | None = option(None, "a CSV of filename,label rows naming the class of each picture under --data "
                                      "(Kaggle's layout)", none="class folders", metavar="FILE.csv")
    val_fraction: float = option(0.2, "held-out share of a single folder of classes")
    augment: str = option("auto", "training augmentation; auto: photo for photos, flip-crop for small square "
                                  "pictures such as CIFAR's", choices=AUGMENTS)
    store_size: int | None = option(None, "side at which training pictures are kept decoded, for random-resized "
                                          "crops (photo)", none="8/7 of --img-size for photos, else --img-size")
    crop_scale: float | None = option(None, "smallest area of a random-resized crop, as a share of the picture "
                                            "(photo)", none=f"0.25 from {LONG_RUN} epochs on, 0.35 below")
    auto_augment: str | None = option(None, "auto-augment policy of each training picture (photo)",
                                      none=f"trivialaugment from {LONG_RUN} epochs on, none below",
                               choices=AUTO_AUGMENTS)
    random_erasing: float | None = option(None, "probability of erasing a rectangle of each training picture "
                                                "(photo)", none=f"0.25 from {LONG_RUN} epochs on, 0 below")
    mixup: float = option(0.0, "mixup's Beta alpha; 0: no mixup")
    cutmix: float = option(0.0, "CutMix's Beta alpha; 0: no CutMix")
    mix_switch: float = option(0.5, "with both mixup and CutMix, the probability of CutMix for a batch")
    crop_pad: int | None = option(None, "largest shift of flip-crop, in pixels", none="an eighth of the side")
    progressive_resize: int | None = option(None, "progressive resizing: train the first epoch at this side, growing "
                                                  "to --img-size by three quarters of the run (cheaper early "
                                                  "epochs); evaluation stays at full size", none="off",
                                            metavar="PIXELS")
    batch_size: int | str = option(128, "global batch size, split across processes; auto: the largest that fits in "
                                        "GPU memory (batchsize.py)", words=("auto",), metavar="N|auto")
    balance: str = option("none", "unbalanced classes: sampler draws pictures inversely to their class's size; "
                                  "loss weights the loss so", choices=BALANCES)
    eval_batch_size: int | None = option(None, "batch size for evaluation", resumable=True,
                                         none="1024 small pictures, fewer large ones (about 12 MB of input)")
    strict: bool = option(False, "fail before training on any bad file", flag="--strict-data")
    cache_dir: str | None = option(None, "where decoded folders are cached", none="~/.cache/imgclf",
                                resumable=True)


@dataclass(frozen=True)
class ModelConfig:
    name: str = option("tutorial_cnn", "tutorial_cnn, fastnet, any torchvision classifier, timm/NAME, or your "
                                       "own network as FILE.py:ClassName (`imgclf models`)", flag="--model")
    pretrained: str | None = option(None, "backbone weights: a local file, or a weights name such as IMAGENET1K_V1",
                                    metavar="FILE|NAME")
    freeze_backbone: bool = option(False, "train only the new last layer")
    freeze_epochs: int = option(0, "staged fine-tuning (note 24): the last layer alone for this many epochs, "
                                   "then the whole network")
    backbone_lr_scale: float = option(1.0, "staged fine-tuning: the backbone's learning rate as a share of --lr "
                                           "once it trains (e.g. 0.1)")
    args: str | None = option(None, "keyword arguments for the constructor of a timm/NAME model or of "
                                    "--model FILE.py:ClassName, as a JSON object", flag="--model-args",
                              metavar="JSON")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = option("sgd", "optimizer", choices=OPTIMIZERS)
    lr: float = option(0.05, "peak learning rate")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(True, "Nesterov momentum")
    weight_decay: float = option(5e-4, "on weights, not biases or norms")
    schedule: str = option("onecycle", "learning-rate schedule after warm-up", choices=SCHEDULES)
    warmup_epochs: float = option(1.0, "linear warm-up length, in epochs")
    label_smoothing: float = option(0.1, "cross-entropy label smoothing")
    epochs: int = option(10, "epochs in all", resumable=True)
    patience: int | None = option(None, "end the run after this many epochs without a better --monitor figure",
                                  none="never", resumable=True)
    monitor: str = option("val_acc", "validation figure that chooses best.pt and early stopping", choices=MONITORS)
    lookahead: bool = option(False, "every 5 steps, average the weights and continue from the average")
    lr_base_batch: int | None = option(None, "the batch size --lr is meant for: at another --batch-size the learning "
                                             "rate is scaled by batch/N (SGD) or its square root (Adam, AdamW), as "
                                             "timm's --lr-base-size", metavar="N",
                                       none="the recipe's batch when --lr is not given, else --batch-size")
    clip_grad: float | None = option(None, "clip the gradients' global norm to this before each step",
                                     metavar="NORM", none="off")
    accumulate: int = option(1, "split each batch into N micro-batches whose gradients add up before one step: "
                                "the same training in 1/N of the activation memory (exact without BatchNorm, "
                                "which normalises each micro-batch by its own statistics)", metavar="N",
                            resumable=True)


@dataclass(frozen=True)
class RunConfig:
    out: str = option("runs/run", "run folder")
    device: str = option("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", resumable=True)
    seed: int = option(0, "seed of initialisation, order and augmentation")
    # bf16 autocast where the hardware has it (AVX512-BF16/AMX CPUs, recent GPUs), else fp32. Runs stay
    # repeatable and resume bit-exactly across processes; within one process oneDNN's kernel choices can
    # depend on what ran before, so in-process comparisons (tests) pin fp32.
    precision: str = option("auto", "autocast precision (auto: bf16 where supported, else fp32)", choices=PRECISIONS)
    # NHWC convolutions: faster with oneDNN and tensor cores (benchmarks/)
    channels_last: bool = option(True, "channels_last memory format")
    compile: bool = option(False, "torch.compile the model", resumable=True)
    log_every: int = option(50, "TensorBoard train-loss interval, in steps", resumable=True)
    stop_after: int | None = option(None, "stop resumably after this many epochs of this invocation",
                                    none="never", resumable=True)
    ema: bool = option(False, "evaluate and keep an exponential moving average of the weights")
    ema_decay: float = option(0.99, "--ema: how much of the average each update (every 5 steps) keeps, once warmed "
                                    "up; early updates keep less, (1 + n) / (10 + n) after n updates")
    tta: bool = option(False, "the last epoch's evaluation averages flipped and 1-pixel-shifted views "
                              "(6 passes; engine.tta_logits)")
    # MLflow beside TensorBoard (imgclf.mlflowrun); recorded, so that a resumed run goes on logging there
    mlflow: str | None = option(None, "also log the run to this MLflow tracking server (http://HOST:5000, "
                                      "sqlite:///mlflow.db, ./mlruns); --mlflow alone: $MLFLOW_TRACKING_URI's "
                                      "(pip install 'imgclf[mlflow]')", metavar="URI", resumable=True,
                                none="off", const="env")
    mlflow_experiment: str = option("imgclf", "the MLflow experiment of the run (--mlflow)", metavar="NAME",
                                    resumable=True)


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    SECTIONS = ("data", "model", "optim", "run")

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
        """Return self, or raise UserError naming the first invalid value and what the flag accepts."""
        d, o, r = self.data, self.optim, self.run
        check_number("--img-size", d.img_size, 8, MAX_SIDE, words=f"8..{MAX_SIDE}")
        check_number("--val-fraction", d.val_fraction, 0, 1, low_open=True, high_open=True, words="between 0 and 1")
        check_number("--crop-pad", d.crop_pad, 0, MAX_SIDE)
        check_number("--progressive-resize", d.progressive_resize, 8, MAX_SIDE, words=f"8..{MAX_SIDE}")
        check_number("--store-size", d.store_size, 8, MAX_SIDE, words=f"8..{MAX_SIDE}")
        check_number("--crop-scale", d.crop_scale, 0, 1, low_open=True, words="in (0, 1]")
        check_number("--random-erasing", d.random_erasing, 0, 1, words="a probability, in [0, 1]")
        check_number("--mixup", d.mixup, 0)
        check_number("--cutmix", d.cutmix, 0)
        check_number("--mix-switch", d.mix_switch, 0, 1, words="a probability, in [0, 1]")
        if d.batch_size != "auto":
            check_number("--batch-size", d.batch_size, 1, MAX_BATCH)
        check_number("--eval-batch-size", d.eval_batch_size, 1, MAX_BATCH)
        check_number("--freeze-epochs", self.model.freeze_epochs, 0, MAX_EPOCHS)
        check_number("--backbone-lr-scale", self.model.backbone_lr_scale, 0, 1, low_open=True, words="in (0, 1]")
        check_number("--lr", o.lr, 0, low_open=True)
        check_number("--momentum", o.momentum, 0, 1, high_open=True, words="in [0, 1)")
        check_number("--weight-decay", o.weight_decay, 0)
        check_number("--warmup-epochs", o.warmup_epochs, 0)
        check_number("--label-smoothing", o.label_smoothing, 0, 1, high_open=True, words="in [0, 1)")
        check_number("--epochs", o.epochs, 1, MAX_EPOCHS)
        check_number("--lr-base-batch", o.lr_base_batch, 1, MAX_BATCH)
        check_number("--clip-grad", o.clip_grad, 0, low_open=True)
        check_number("--accumulate", o.accumulate, 1, MAX_BATCH)
        check_number("--patience", o.patience, 1, MAX_EPOCHS)
        check_number("--seed", r.seed, 0, MAX_SEED)
        check_number("--log-every", r.log_every, 1)
        check_number("--stop-after", r.stop_after, 1, MAX_EPOCHS)
        check_number("--ema-decay", r.ema_decay, 0, 1, high_open=True, words="in [0, 1)")
        for section in self.SECTIONS:  # fields with a fixed set of values (also a recipe's or a checkpoint's)
            part = getattr(self, section)
            for f in dataclasses.fields(part):
                choices, value = f.metadata["choices"], getattr(part, f.name)
                _check(not choices or value is None or value in choices,
                       f"unknown {flag_of(f)} {value!r}; choose one of {', '.join(choices or ())}")
        return self


def config_fields(sections=TrainConfig.SECTIONS):
    """(section, field, flag) of every TrainConfig field, in declaration order: `imgclf train`'s flags and
    `imgclf.fit`'s options."""
    for section in sections:
        for f in dataclasses.fields(TrainConfig.__dataclass_fields__[section].default_factory):
            yield section, f, flag_of(f)


def resolve_config(given: dict[tuple[str, str], object], *, recipe: str = "default",
                   base: TrainConfig | None = None, typed: frozenset | None = None) -> TrainConfig:
    """The one way from what a user set (`imgclf train`'s flags, `imgclf.fit`'s options) to a TrainConfig:
    `base` (a resumed run's) or the recipe's defaults, then every value of `given`, (section, field) ->
    value, None meaning not given. A value that differs from `base`'s where the field is not resumable is one
    UserError line. A new run's learning rate follows its batch size (`lr_for_batch`), and an option set
    where it would do nothing is one UserError line (`refuse_idle`): the options in `typed` (the flags
    typed; None: all of `given`) however set, the others (a configuration file's) when they differ from
    the recipe's value, so that a run's own config.yaml stays valid as --config."""
    given = {key: value for key, value in given.items() if value is not None}
    if base is None:
        sections = {name: dict(values) for name, values in RECIPES[recipe].items()}
        defaults = TrainConfig.from_dict(sections)
        explicit = {key for key, value in given.items()
                    if typed is None or key in typed or value != getattr(getattr(defaults, key[0]), key[1])}
        for (section, name), value in given.items():
            sections.setdefault(section, {})[name] = value
        cfg = TrainConfig.from_dict(sections)
        refuse_idle(cfg, explicit)
        return lr_for_batch(cfg, lr_given=("optim", "lr") in given,
                            base_given=("optim", "lr_base_batch") in given, recipe_batch=defaults.data.batch_size)
    else:
        sections = base.to_dict()
        for section, f, flag in config_fields():
            value, used = given.get((section, f.name)), getattr(getattr(base, section), f.name)
            if value is not None and not f.metadata["resumable"] and used != value:
                raise UserError(f"{flag} {value} contradicts the run being resumed (it used {used}); drop the "
                                f"flag, or start a new run with --out")
    for (section, name), value in given.items():
        sections.setdefault(section, {})[name] = value
    return TrainConfig.from_dict(sections)


def lr_for_batch(cfg: TrainConfig, *, lr_given: bool, base_given: bool, recipe_batch) -> TrainConfig:
    """timm's lr-base rule: --lr is meant for --lr-base-batch pictures a step, by default the recipe's batch
    when --lr is not given (a recipe's learning rate goes with its batch), else the batch it is given with;
    `scaled_lr` then moves it to --batch-size, so that a smaller batch does not take the large steps of a
    large one (measured: the notes' network on 48 pictures at batch 16 diverged at lr 0.05). Afterwards
    lr_base_batch is the batch the lr is for: --batch-size, or with --batch-size auto the base to scale
    from once the batch is known (None: a given --lr, taken as it is)."""
    base = cfg.optim.lr_base_batch if base_given else (cfg.data.batch_size if lr_given else recipe_batch)
    if base == "auto":  # --lr given with --batch-size auto, or a recipe of auto: the lr is taken as it is
        base = None
    optim = scaled_lr(dataclasses.replace(cfg.optim, lr_base_batch=base), cfg.data.batch_size)
    return dataclasses.replace(cfg, optim=optim)


def scaled_lr(optim: OptimConfig, batch) -> OptimConfig:
    """`optim` with its lr moved from `optim.lr_base_batch` pictures a step to `batch`: times batch/base for
    SGD, times its square root for Adam and AdamW (timm's linear and sqrt rules); then lr_base_batch is
    `batch`. Unchanged without lr_base_batch, or while `batch` is "auto" (scaled once it is known)."""
    base = optim.lr_base_batch
    if base is None or batch == "auto" or batch == base:
        return optim
    ratio = batch / base
    factor = ratio if optim.optimizer == "sgd" else math.sqrt(ratio)
    return dataclasses.replace(optim, lr=optim.lr * factor, lr_base_batch=batch)


def idle_options(cfg: TrainConfig) -> dict[str, str]:
    """Flag -> why it would change nothing in the run `cfg` describes, for every option whose value is not
    used there (whatever its value): what `refuse_idle` refuses when the user set it."""
    d, m, o, r = cfg.data, cfg.model, cfg.optim, cfg.run
    builtin = d.data in ("cifar10", "cifar100", "mnist", "fashion-mnist")  # sources.BUILTINS (no torch here)
    adam = o.optimizer != "sgd"
    rules = {
        "--momentum": adam and f"--optimizer {o.optimizer} has no momentum term (its betas are fixed)",
        "--nesterov": o.nesterov and ((adam and f"--optimizer {o.optimizer} has no Nesterov momentum") or
                                      (o.momentum == 0 and "Nesterov momentum needs --momentum above 0")),
        "--mix-switch": not (d.mixup > 0 and d.cutmix > 0) and "it chooses between mixup and CutMix: give both "
                                                                "--mixup and --cutmix",
        "--crop-pad": d.augment in ("none", "flip", "photo") and f"--augment {d.augment} makes no shifted crops "
                                                                 f"(flip-crop does)",
        "--store-size": d.augment not in ("auto", "photo") and f"--augment {d.augment} takes no random-resized "
                                                               f"crops (photo does)",
        "--data-root": not builtin and "it is where the built-in data sets live, and --data is a folder",
        "--labels": builtin and f"{d.data} has its own labels",
        "--val-fraction": builtin and f"{d.data} has its own test split, used for validation",
        "--strict-data": builtin and f"{d.data} is read by torchvision, not from picture files",
        "--cache-dir": builtin and f"{d.data} is read by torchvision, not decoded into the cache",
        "--freeze-epochs": m.freeze_backbone and "--freeze-backbone keeps the backbone frozen for the whole run",
        "--backbone-lr-scale": not (m.freeze_epochs and not m.freeze_backbone) and
                               "it sets the backbone's rate once it trains after --freeze-epochs",
        "--patience": o.patience is not None and o.patience >= o.epochs - 1 and  # epoch 1 sets the first mark
                      f"a run of --epochs {o.epochs} ends before it could wait {o.patience} epochs for a better one",
        "--accumulate": isinstance(d.batch_size, int) and o.accumulate > d.batch_size and
                        f"a batch of {d.batch_size} cannot be cut into {o.accumulate} micro-batches",
        "--stop-after": r.stop_after is not None and r.stop_after >= o.epochs and
                        f"the run ends after its {o.epochs} epochs anyway",
        "--ema-decay": not r.ema and "it is the decay of --ema's average, which is off",
        "--mlflow-experiment": r.mlflow is None and "it names the experiment of --mlflow, which is off",
    }
    return {flag: why for flag, why in rules.items() if why}


def refuse_idle(cfg: TrainConfig, explicit: set[tuple[str, str]]) -> None:
    """One UserError line for the first option in `explicit` ((section, field) keys) that `idle_options`
    finds unused: an option given either acts or is refused, never silently ignored."""
    idle = idle_options(cfg)
    for section, f, flag in config_fields():
        if (section, f.name) in explicit and flag in idle:
            raise UserError(f"{flag} would change nothing here: {idle[flag]}; drop it")


def check_number(flag: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                 words: str | None = None) -> None:
    """Raise UserError, one line naming `flag` and what it accepts, unless `value` is None or a finite number
    within [low, high] (an open end excludes its bound; a bound of None is no bound). `words` describes the
    accepted values; by default, the bound that was crossed ("at least 1", "positive", "at most 65536")."""
    if value is None:
        return
    finite = not isinstance(value, float) or math.isfinite(value)  # ints: any size (math.isfinite overflows)
    above_low = low is None or (value > low if low_open else value >= low)
    below_high = high is None or (value < high if high_open else value <= high)
    if finite and above_low and below_high:
        return
    if words is None and not finite:
        words = "a finite number"
    elif words is None and not above_low:
        words = ("positive" if low == 0 else f"above {low}") if low_open else f"at least {low}"
    elif words is None:
        words = f"below {high}" if high_open else f"at most {high}"
    raise UserError(f"{flag} must be {words}, got {value}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


class _Recipes(Mapping):
    """Named recipes, name -> {section: {field: value}}: values that replace the defaults above unless a flag
    sets them. Each is a configuration file a user can read, imgclf/recipes/NAME.yaml (imgclf.configfile),
    read when asked for."""

    def __getitem__(self, name: str) -> dict[str, dict]:
        from imgclf.configfile import read_recipe

        return read_recipe(name)

    def __iter__(self):
        from imgclf.configfile import recipe_names

        return iter(recipe_names())

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __contains__(self, name) -> bool:
        return name in list(iter(self))


RECIPES: Mapping[str, dict[str, dict]] = _Recipes()


def parse_size(text: str) -> tuple[int, int, int]:
    """'3x32x32' -> (3, 32, 32); raise UserError on anything else."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise UserError(f"malformed size {text!r}; write CxHxW, for example 3x32x32")
    if dims[0] > MAX_CHANNELS or max(dims[1:]) > MAX_SIDE:
        raise UserError(f"--input-size {text} is too large: at most {MAX_CHANNELS} channels and {MAX_SIDE} pixels "
                        f"a side")
    return dims  # type: ignore[return-value]
