"""Frozen configuration, filled once by the CLI and read by the builders. No torch here, and no file reading.

Every training option is declared once, below, with `option(...)`: its default, help, flag, choices and
bounds. From that one declaration come `imgclf train`'s flag (imgclf.cli), `imgclf.fit`'s keyword
(imgclf.api), the configuration-file key (imgclf.configfile) and the one rule every value of it passes
(`check_option`), whoever read it. `TrainConfig.from_sources` stacks what the user set over a recipe or a
resumed run; imgclf.resolve is the one place that reads the files those come from."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
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
# What --monitor may watch -> whether a larger value is better: declared once, here (no torch here, so the
# tasks import it): each task of imgclf.tasks monitors the figures of this table it computes (Task.monitors).
MONITORS = {"val_acc": True, "val_loss": False, "val_macro_f1": True, "val_map": True}
# How a new head's weights start (imgclf.models.adapter.init_layers says what each does)
HEAD_INITS = ("default", "zero", "small")
# Pixel normalisation: auto takes the pretrained weights' input contract where they have one, else the data's
NORMALIZE = ("auto", "data", "weights")
# BatchNorm's running statistics while training: updated (PyTorch's way), or frozen at the pretrained values
BN_STATS = ("update", "frozen")
TASK_CHOICES = ("auto", "single-label", "multilabel")  # imgclf.tasks.TASKS, and auto: as the data say
# Upper bounds of numeric flags: far beyond any sensible value, low enough that nothing overflows.
MAX_SIDE = 4096  # pixels, a side of an input picture
MAX_CHANNELS = 64  # channels of an input picture (--input-size)
MAX_BATCH = 65536  # pictures in one batch
MAX_EPOCHS = 100_000
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits
MAX_FOLDS = 20  # --folds: beyond it each fold's held-out part says too little, and the runs cost too much
PROBABILITY = "a probability, in [0, 1]"
KIND_WORDS = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a string"}


def option(default, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
           resumable: bool = False, metavar: str | None = None, none: str = "none", const: str | None = None,
           low=None, high=None, low_open: bool = False, high_open: bool = False, words: str | None = None,
           also: tuple[str, ...] = ()):
    """A configuration field, its command-line flag and its rule in one declaration: `imgclf.cli` builds the
    flag (`--field-name` unless `flag` says otherwise), its help and its shown default from this, so `--help`
    cannot disagree with the code, and `check_option` checks every value of it (flag, file, fit option,
    recipe, resumed run) against the same rule. `resumable`: the flag may differ from the run being
    resumed; `none`: what a default of None means, for the help; `const`: the value of the flag given
    without one; `choices`: the values allowed; `low`, `high`, `low_open`, `high_open`, `words`: the bounds
    of a number, as `check_number` takes them. `also`: words a number flag takes
    besides numbers (`--batch-size auto`).
    """
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices,
                                            "resumable": resumable, "metavar": metavar, "none": none,
                                            "const": const, "also": also, "bounds": {"low": low, "high": high,
                                                                       "low_open": low_open,
                                                                       "high_open": high_open, "words": words}})


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a configuration field declared with `option`."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


@dataclass(frozen=True)
class DataConfig:
    data: str = option("cifar10", "fashion-mnist-mini (inside imgclf, no download), cifar10, cifar100, mnist, "
                                  "fashion-mnist, or a folder (docs/usage.md: Data layouts)",
                       resumable=True)
    data_root: str = option("data", "where built-in data sets are downloaded and found", resumable=True)
    img_size: int | None = option(None, "side of the square input", none="native; photos 224",
                                  low=8, high=MAX_SIDE, words=f"8..{MAX_SIDE}")
    channels: int | None = option(None, "channels of the pictures: 1 grey, 3 colour, or the band count of "
                                        "multi-band TIFFs (docs/usage.md: More channels and 16-bit pictures)",
                                  none="as the pictures have", metavar="N", low=1, high=MAX_CHANNELS)
    labels: str | None = option(None, "a CSV of filename,label rows naming the class of each picture under --data "
                                      "(Kaggle's layout)", none="class folders", metavar="FILE.csv")
    task: str = option("auto", "single-label: one class per picture; multilabel: any number (a --labels CSV of "
                                "filename,labels with the labels separated by spaces, or one 0/1 column per "
                                "class); auto: multilabel where the --labels CSV is in one of those layouts",
                       choices=TASK_CHOICES)
    val_fraction: float = option(0.2, "held-out share of a single folder of classes",
                                 low=0, high=1, low_open=True, high_open=True, words="between 0 and 1")
    # k-fold cross-validation (imgclf.folds, imgclf.crossval): the run trains one ordinary run per fold
    folds: int | None = option(None, "k-fold cross-validation: K runs OUT/fold-1 ... OUT/fold-K, each validated on "
                                     "its K-th of the training pictures (val/ joins them; a test split is tested "
                                     "by each), their figures' mean and std in OUT/folds.json (docs/usage.md: "
                                     "Cross-validation)", none="off", metavar="K", low=2, high=MAX_FOLDS,
                               words=f"2..{MAX_FOLDS}")
    fold: int | None = option(None, "with --folds K: train fold I alone, into --out (what --folds K trains into "
                                    "each OUT/fold-I)", none="every fold", metavar="I", low=1, high=MAX_FOLDS,
                              words=f"1..{MAX_FOLDS}")
    augment: str = option("auto", "training augmentation; auto: photo for photos, flip-crop for small square "
                                  "pictures such as CIFAR's", choices=AUGMENTS)
    store_size: int | None = option(None, "side at which training pictures are kept decoded, for random-resized "
                                          "crops (photo)", none="8/7 of --img-size for photos, else --img-size",
                                    low=8, high=MAX_SIDE, words=f"8..{MAX_SIDE}")
    crop_scale: float | None = option(None, "smallest area of a random-resized crop, as a share of the picture "
                                            "(photo)", none=f"0.25 from {LONG_RUN} epochs on, 0.35 below",
                                      low=0, high=1, low_open=True, words="in (0, 1]")
    auto_augment: str | None = option(None, "auto-augment policy of each training picture (photo)",
                                      none=f"trivialaugment from {LONG_RUN} epochs on, none below",
                               choices=AUTO_AUGMENTS)
    random_erasing: float | None = option(None, "probability of erasing a rectangle of each training picture "
                                                "(photo)", none=f"0.25 from {LONG_RUN} epochs on, 0 below",
                                          low=0, high=1, words=PROBABILITY)
    mixup: float = option(0.0, "mixup's Beta alpha; 0: no mixup", low=0)
    cutmix: float = option(0.0, "CutMix's Beta alpha; 0: no CutMix", low=0)
    mix_switch: float = option(0.5, "with both mixup and CutMix, the probability of CutMix for a batch",
                               low=0, high=1, words=PROBABILITY)
    crop_pad: int | None = option(None, "largest shift of flip-crop, in pixels", none="an eighth of the side",
                                  low=0, high=MAX_SIDE)
    progressive_resize: int | None = option(None, "progressive resizing: train the first epoch at this side, growing "
                                                  "to --img-size by three quarters of the run (cheaper early "
                                                  "epochs); evaluation stays at full size", none="off",
                                            metavar="PIXELS", low=8, high=MAX_SIDE, words=f"8..{MAX_SIDE}")
    normalize: str = option("auto", "pixel normalisation: the mean and std of the pretrained weights' input contract "
                                    "(weights), or of the training pictures (data); auto: weights with --pretrained "
                                    "weights that have one, else data", choices=NORMALIZE)
    batch_size: int | str = option(128, "global batch size, split across processes; auto: the largest that fits in "
                                        "GPU memory (imgclf.batchsize)", low=1, high=MAX_BATCH, also=("auto",),
                                   metavar="N|auto")
    drop_last: bool = option(False, "drop each epoch's last training batch when it is not full, as the speed records "
                                    "do: every step then has the same shape (a GPU tunes its kernels once)")
    balance: str = option("none", "unbalanced classes: sampler draws pictures inversely to their class's size; "
                                  "loss weights the loss so", choices=BALANCES)
    eval_batch_size: int | None = option(None, "batch size for evaluation", resumable=True,
                                         none="1024 small pictures, fewer large ones (about 12 MB of input)",
                                         low=1, high=MAX_BATCH)
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
                                   "then the whole network", low=0, high=MAX_EPOCHS)
    backbone_lr_scale: float = option(1.0, "staged fine-tuning: the backbone's learning rate as a share of --lr "
                                           "once it trains (e.g. 0.1)", low=0, high=1, low_open=True, words="in (0, 1]")
    head_init: str = option("default", "initial weights of the new classifier head: default (the layer's "
                                       "library's), zero (every class equally likely at first) or small "
                                       "(N(0, 0.01^2))", choices=HEAD_INITS)
    bn_stats: str = option("update", "BatchNorm running statistics while training: update them, or keep them "
                                     "frozen at their starting (pretrained) values", choices=BN_STATS)
    whiten_bias_epochs: int = option(0, "fastnet: train the bias of its whitening first layer for this many first "
                                        "epochs, as the speed records do (3); 0: frozen throughout",
                                     low=0, high=MAX_EPOCHS)
    args: str | None = option(None, "keyword arguments for the constructor of a timm/NAME model or of "
                                    "--model FILE.py:ClassName, as a JSON object", flag="--model-args",
                              metavar="JSON")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = option("sgd", "optimizer", choices=OPTIMIZERS)
    lr: float = option(0.05, "peak learning rate", low=0, low_open=True)
    momentum: float = option(0.9, "SGD momentum", low=0, high=1, high_open=True, words="in [0, 1)")
    nesterov: bool = option(True, "Nesterov momentum")
    weight_decay: float = option(5e-4, "on weights, not biases or norms (--decay-biases: on those too)", low=0)
    decay_biases: bool = option(False, "weight decay on biases and normalisation shifts too, at the weights' rate, "
                                       "as the speed records do")
    schedule: str = option("onecycle", "learning-rate schedule after warm-up", choices=SCHEDULES)
    warmup_epochs: float = option(1.0, "linear warm-up length, in epochs", low=0)
    warmup_start: float = option(0.0, "where the warm-up starts, as a share of the peak learning rate (the speed "
                                      "records: 0.2)", low=0, high=1, high_open=True, words="in [0, 1)")
    lr_end: float = option(0.0, "where the schedule ends, as a share of the peak learning rate (the speed records: "
                                "0.07)", low=0, high=1, high_open=True, words="in [0, 1)")
    label_smoothing: float = option(0.1, "cross-entropy label smoothing",
                                    low=0, high=1, high_open=True, words="in [0, 1)")
    epochs: int = option(10, "epochs in all", resumable=True, low=1, high=MAX_EPOCHS)
    patience: int | None = option(None, "end the run after this many epochs without a better --monitor figure",
                                  none="never", resumable=True, low=1, high=MAX_EPOCHS)
    monitor: str = option("val_acc", "validation figure that chooses best.pt and early stopping", choices=tuple(MONITORS))
    lookahead: bool = option(False, "every 5 steps, average the weights and continue from the average")
    lr_base_batch: int | None = option(None, "the batch size --lr is meant for: at another --batch-size the learning "
                                             "rate is scaled by batch/N (SGD) or its square root (Adam, AdamW), as "
                                             "timm's --lr-base-size", metavar="N", low=1, high=MAX_BATCH,
                                       none="the recipe's batch when --lr is not given, else --batch-size")
    # By default (optim.clip_norm) 10, as Ultralytics, for a network without BatchNorm: far above its healthy
    # steps' norms (0.4-1.3 measured for tutorial_cnn on CIFAR, whose runs it leaves bit for bit), far below a
    # diverging one's (3 -> 161 -> 2e5 in four steps). Off with BatchNorm, whose healthy norms on photos sit at
    # 10-20 (ResNet-18), where it would act at every step (docs/usage.md: Stable training)
    clip_grad: float | None = option(None, "scale the gradients down to this global norm before each step; 0: off",
                                     metavar="NORM", low=0, none="10 for a network without BatchNorm, else off")
    accumulate: int = option(1, "split each batch into N micro-batches whose gradients add up before one step: "
                                "the same training in 1/N of the activation memory (exact without BatchNorm, "
                                "which normalises each micro-batch by its own statistics)", metavar="N",
                             resumable=True, low=1, high=MAX_BATCH)


@dataclass(frozen=True)
class RunConfig:
    out: str = option("runs/run", "run folder")
    device: str = option("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", resumable=True)
    seed: int = option(0, "seed of initialisation, order and augmentation", low=0, high=MAX_SEED)
    # bf16 autocast where the hardware has it (AVX512-BF16/AMX CPUs, recent GPUs), else fp32. Runs stay
    # repeatable and resume bit-exactly across processes; within one process oneDNN's kernel choices can
    # depend on what ran before, so in-process comparisons (tests) pin fp32.
    precision: str = option("auto", "autocast precision (auto: bf16 where supported, else fp32)", choices=PRECISIONS)
    # The speed records keep fp16 weights: no weight casts in the step, one fused optimizer kernel over 16-bit
    # tensors (H200, one fastnet step: 7.48 -> 5.18 ms, benchmarks/RESULTS.md). Averages stay float32.
    bf16_weights: bool = option(False, "keep the weights themselves in bf16 (BatchNorm's in fp32) and train without "
                                       "autocast; needs bf16 arithmetic (--precision bf16, or auto where supported)")
    # NHWC convolutions: faster with oneDNN and tensor cores (benchmarks/)
    channels_last: bool = option(True, "channels_last memory format")
    compile: bool = option(False, "torch.compile the model", resumable=True)
    log_every: int = option(50, "TensorBoard train-loss interval, in steps", resumable=True, low=1)
    stop_after: int | None = option(None, "stop resumably after this many epochs of this invocation",
                                    none="never", resumable=True, low=1, high=MAX_EPOCHS)
    ema: bool = option(False, "evaluate and keep an exponential moving average of the weights")
    ema_decay: float = option(0.99, "--ema: how much of the average each update (every 5 steps) keeps, once warmed "
                                    "up; early updates keep less, (1 + n) / (10 + n) after n updates",
                              low=0, high=1, high_open=True, words="in [0, 1)")
    tta: bool = option(False, "the last epoch's evaluation averages flipped and 1-pixel-shifted views "
                              "(6 passes; engine.tta_logits)")
    # On a 2-core CPU the shifted views cost ~9 s of a 110 s CIFAR-10 run for +0.25 points (benchmarks/RESULTS.md)
    tta_shift: bool = option(True, "--tta also averages the views shifted by one pixel (6 passes); "
                                   "--no-tta-shift: the picture and its mirror image only (2 passes)")
    # A pass over the held-out pictures after every epoch is much of a short GPU run's time (issue 26); the
    # last epoch is always evaluated, so the run's final figure stays exact. Evaluating draws no random
    # numbers, so N changes which records have val_* figures, never the training (hence resumable).
    val_every: int = option(1, "evaluate the held-out split after every Nth epoch, and always after the last one "
                               "(and before a resumable stop); 0: after the last one only", metavar="N",
                            resumable=True, low=0, high=MAX_EPOCHS)
    calibrate: bool = option(True, "after training, fit a temperature on the validation split so that "
                                   "probabilities are calibrated (single-label; stored in the checkpoints and "
                                   "their exports; docs/usage.md: Calibrated confidence)", resumable=True)
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
        """The configuration of section -> {field: value} (config.json's layout; fields it does not name keep
        their defaults, names it has that TrainConfig lacks are ignored), each value checked and converted by
        `check_option`: one UserError line for the first bad one."""
        kwargs = {}
        for section in cls.SECTIONS:
            values = d.get(section, {})
            if not isinstance(values, dict):
                raise UserError(f"the {section} section must be a mapping of field: value, not "
                                f"{type(values).__name__}")
            kwargs[section] = SECTION_TYPES[section](**{
                f.name: check_option(f, values[f.name]) for _, f, _ in config_fields((section,)) if f.name in values})
        return cls(**kwargs)

    @classmethod
    def from_sources(cls, defaults: dict, *layers: dict[tuple[str, str], object],
                     base: TrainConfig | None = None, typed: frozenset | None = None) -> TrainConfig:
        """The one way from what a user set to a TrainConfig: `defaults` (a recipe's section -> {field: value})
        or, resuming, `base` (the run's own configuration), then each of `layers` in turn, (section, field) ->
        value, None meaning not set, a later layer winning (a --config file's values, then the flags or fit's
        options). With `base`, a value that differs from the run's where the option is not resumable is one
        UserError line. Every value passes `check_option`. A new run is then `settled` (`typed`: the options
        the user typed, None for all that are set)."""
        given = {key: value for layer in layers for key, value in layer.items() if value is not None}
        if base is None:
            sections = {name: dict(values) for name, values in defaults.items()}
        else:
            sections = base.to_dict()
            for section, f, flag in config_fields():
                value, used = given.get((section, f.name)), getattr(getattr(base, section), f.name)
                if value is not None and not f.metadata["resumable"] and used != value:
                    raise UserError(f"{flag} {value} contradicts the run being resumed (it used {used}); drop the "
                                    f"flag, or start a new run with --out")
        for (section, name), value in given.items():
            sections.setdefault(section, {})[name] = value
        cfg = cls.from_dict(sections)
        return cfg if base is not None else settled(cfg, cls.from_dict(defaults), given, typed)

    def validated(self) -> TrainConfig:
        """Return self, or raise UserError naming the first invalid value and what the flag accepts."""
        for section, f, _ in config_fields():
            check_option(f, getattr(getattr(self, section), f.name))
        return self


SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "run": RunConfig}


def config_fields(sections=TrainConfig.SECTIONS):
    """(section, field, flag) of every TrainConfig field, in declaration order: `imgclf train`'s flags and
    `imgclf.fit`'s options."""
    for section in sections:
        for f in dataclasses.fields(SECTION_TYPES[section]):
            yield section, f, flag_of(f)


def check_option(f: dataclasses.Field, value, what: str | None = None, *, bounds: bool = True):
    """The one checker of an option's value, whoever read it (flag, configuration file, fit's keyword,
    recipe, a resumed run's config.json): `value` converted to the field's kind (a whole number for a float
    field becomes a float, a path a string, a mapping for --model-args JSON text), or one UserError line
    naming `what` (how the user wrote it; default: the flag and the value) and what the flag accepts. None
    (an option left out) passes. `bounds=False`: the kind and choices only (the end of a searched range,
    whose bounds tune checks with the rest of a trial's configuration)."""
    if value is None:
        return None
    flag, kind = flag_of(f), f.type.split(" | ")[0]
    what = what or f"{flag} {value!r}"
    if isinstance(value, str) and value in f.metadata["also"]:  # --batch-size auto
        return value
    if kind == "str" and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if f.name == "args" and isinstance(value, dict):  # --model-args: a mapping is its JSON text
        try:
            value = json.dumps(value)
        except (TypeError, ValueError) as err:
            raise UserError(f"{what}: the constructor's arguments must be plain JSON values ({err})") from None
    ok = {"bool": isinstance(value, bool), "str": isinstance(value, str),
          "int": isinstance(value, numbers.Integral) and not isinstance(value, bool),
          "float": isinstance(value, numbers.Real) and not isinstance(value, bool)}[kind]
    if not ok:
        raise UserError(f"{what} is not {KIND_WORDS[kind]} ({flag} takes {KIND_WORDS[kind]})")
    try:
        value = {"int": int, "float": float}.get(kind, lambda v: v)(value)
    except OverflowError:  # a whole number beyond float's range (10**400) for a float option
        raise UserError(f"{flag} must be a finite number, got a number of {len(str(int(value)))} digits") from None
    choices = f.metadata["choices"]
    if choices and value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"{what} is not one of {', '.join(choices)}{hint}")
    if bounds and kind in ("int", "float"):
        check_number(flag, value, **f.metadata["bounds"])
    return value


def settled(cfg: TrainConfig, recipe: TrainConfig, given: dict[tuple[str, str], object],
            typed: frozenset | None) -> TrainConfig:
    """A new run's cross-option rules, over `cfg` as the user set it on top of `recipe`: an option set where it
    would do nothing is one UserError line (`refuse_idle`): one in `typed` (the flags typed; None: all of
    `given`) however set, another (a configuration file's) when it differs from the recipe's value, so that
    a run's own config.yaml stays valid as --config; then the learning rate follows the batch size
    (`lr_for_batch`)."""
    explicit = {key for key, value in given.items()
                if typed is None or key in typed or value != getattr(getattr(recipe, key[0]), key[1])}
    refuse_idle(cfg, explicit)
    return lr_for_batch(cfg, lr_given=("optim", "lr") in given, base_given=("optim", "lr_base_batch") in given,
                        recipe_batch=recipe.data.batch_size)


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
    used there (whatever its value): what `refuse_idle` refuses when the user set it. The augmentation
    options (--crop-pad, --crop-scale, --auto-augment, --random-erasing) are imgclf.augment.choose's."""
    d, m, o, r = cfg.data, cfg.model, cfg.optim, cfg.run
    builtin = d.data in ("cifar10", "cifar100", "mnist", "fashion-mnist")  # sources.BUILTINS (no torch here)
    adam = o.optimizer != "sgd"
    rules = {
        "--momentum": adam and f"--optimizer {o.optimizer} has no momentum term (its betas are fixed)",
        "--nesterov": o.nesterov and ((adam and f"--optimizer {o.optimizer} has no Nesterov momentum") or
                                      (o.momentum == 0 and "Nesterov momentum needs --momentum above 0")),
        "--warmup-start": o.warmup_epochs == 0 and "there is no warm-up (--warmup-epochs 0)",
        "--lr-end": o.schedule == "constant" and "--schedule constant keeps the peak rate to the end",
        "--decay-biases": o.weight_decay == 0 and "there is no weight decay (--weight-decay 0)",
        "--mix-switch": not (d.mixup > 0 and d.cutmix > 0) and "it chooses between mixup and CutMix: give both "
                                                                "--mixup and --cutmix",
        "--store-size": d.augment not in ("auto", "photo") and f"--augment {d.augment} takes no random-resized "
                                                               f"crops (photo does)",
        "--data-root": not builtin and "it is where the built-in data sets live, and --data is a folder",
        "--labels": builtin and f"{d.data} has its own labels",
        "--val-fraction": (builtin and f"{d.data} has its own test split, used for validation") or
                          (d.folds and f"with --folds {d.folds} each fold holds out its own part"),
        "--fold": d.fold is not None and d.folds is None and "it picks one fold of --folds K, which is off",
        "--strict-data": builtin and f"{d.data} is read by torchvision, not from picture files",
        "--cache-dir": builtin and f"{d.data} is read by torchvision, not decoded into the cache",
        "--normalize": not m.pretrained and d.normalize != "weights" and  # weights: refused when the run is built
                       "without --pretrained weights the training pictures' statistics normalise them",
        "--freeze-epochs": m.freeze_backbone and "--freeze-backbone keeps the backbone frozen for the whole run",
        "--backbone-lr-scale": not (m.freeze_epochs and not m.freeze_backbone) and
                               "it sets the backbone's rate once it trains after --freeze-epochs",
        "--patience": o.patience is not None and _patience_idle(o.patience, o.epochs, r.val_every),
        "--accumulate": isinstance(d.batch_size, int) and o.accumulate > d.batch_size and
                        f"a batch of {d.batch_size} cannot be cut into {o.accumulate} micro-batches",
        "--stop-after": r.stop_after is not None and r.stop_after >= o.epochs and
                        f"the run ends after its {o.epochs} epochs anyway",
        "--ema-decay": not r.ema and "it is the decay of --ema's average, which is off",
        "--tta-shift": not r.tta and "it says which views --tta averages, and --tta is off",
        "--mlflow-experiment": r.mlflow is None and "it names the experiment of --mlflow, which is off",
    }
    return {flag: why for flag, why in rules.items() if why}


def _patience_idle(patience: int, epochs: int, every: int) -> str | None:
    """Why --patience could never end a run of `epochs` evaluated every `every` epochs (--val-every), or None.
    It counts evaluations: the first sets the mark, and the wait must run out at one before the last epoch's."""
    if every == 0:
        return "with --val-every 0 only the last epoch is evaluated, so there is nothing to wait for"
    if patience < (epochs - 1) // every:  # the evaluations before the last epoch's
        return None
    where, unit = ("", "epochs") if every == 1 else (f" evaluated every {every} epochs", "evaluations")
    return f"a run of --epochs {epochs}{where} ends before it could wait {patience} {unit} for a better one"


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
