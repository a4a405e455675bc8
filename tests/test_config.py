"""imgclf.config: every rule of TrainConfig.validated, each with a value just inside and just outside its range
(and NaN and infinities for the float fields); every training flag's --help shows its field's default."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import re

import pytest

from imgclf.cli import build_parser, config_fields
from imgclf.config import MAX_SEED, TrainConfig, check_number, parse_size
from imgclf.errors import EXIT_USAGE, UserError

INF, NAN = math.inf, math.nan

# (section, field): (values accepted, values refused). The flag named in the message comes from the field's
# declaration. Float fields are also refused as NaN, +inf and -inf (added below).
RULES = {
    ("data", "img_size"): ([None, 8, 4096], [7, 4097, 0, -1]),
    ("data", "channels"): ([None, 1, 64], [0, 65, -1]),
    ("data", "val_fraction"): ([1e-9, 0.5, 1 - 1e-9], [0.0, 1.0, -0.1]),
    ("data", "crop_pad"): ([None, 0, 4096], [-1, 4097]),
    ("data", "store_size"): ([None, 8, 4096], [7, 4097]),
    ("data", "progressive_resize"): ([None, 8, 4096], [7, 4097, 0]),
    ("data", "crop_scale"): ([1e-9, 1.0], [0.0, 1 + 1e-9]),
    ("data", "random_erasing"): ([0.0, 1.0], [-1e-9, 1 + 1e-9]),
    ("data", "mixup"): ([0.0, 1e300], [-1e-9]),
    ("data", "cutmix"): ([0.0, 1e300], [-1e-9]),
    ("data", "mix_switch"): ([0.0, 1.0], [-1e-9, 1 + 1e-9]),
    ("data", "batch_size"): ([1, 65536, "auto"], [0, 65537, -1]),
    ("data", "folds"): ([None, 2, 20], [1, 21, 0]),
    ("data", "fold"): ([None, 1, 20], [0, 21]),
    ("data", "eval_batch_size"): ([1, 65536], [0, 65537, -1]),
    ("optim", "lr"): ([1e-12, 0.05, 1e300], [0.0, -1e-12, -1.0]),
    ("optim", "momentum"): ([0.0, 0.9, 1 - 1e-9], [-1e-9, 1.0]),
    ("optim", "weight_decay"): ([0.0, 5e-4, 1e300], [-1e-12]),
    ("optim", "warmup_epochs"): ([0.0, 0.5, 1e300], [-1e-9]),
    ("optim", "label_smoothing"): ([0.0, 1 - 1e-9], [-1e-9, 1.0]),
    ("optim", "epochs"): ([1, 100_000], [0, 100_001, -1]),
    ("optim", "patience"): ([None, 1, 100_000], [0, 100_001]),
    ("optim", "lr_base_batch"): ([None, 1, 65536], [0, 65537]),
    ("optim", "clip_grad"): ([None, 0.0, 1e-12, 1e300], [-1e-9, -1.0]),
    ("optim", "accumulate"): ([1, 65536], [0, 65537]),
    ("model", "freeze_epochs"): ([0, 100_000], [-1, 100_001]),
    ("model", "whiten_bias_epochs"): ([0, 3, 100_000], [-1, 100_001]),
    ("optim", "warmup_start"): ([0.0, 0.2, 1 - 1e-9], [-1e-9, 1.0]),
    ("optim", "lr_end"): ([0.0, 0.07, 1 - 1e-9], [-1e-9, 1.0]),
    ("model", "backbone_lr_scale"): ([1e-9, 1.0], [0.0, 1 + 1e-9]),
    ("run", "seed"): ([0, MAX_SEED], [-1, MAX_SEED + 1, 10**400]),
    ("run", "log_every"): ([1, 10**30], [0, -1]),
    ("run", "stop_after"): ([None, 1, 100_000], [0, 100_001]),
    ("run", "val_every"): ([0, 1, 100_000], [-1, 100_001]),
    ("run", "ema_decay"): ([0.0, 0.999], [-1e-9, 1.0]),
    # the string fields with a fixed set of values (argparse refuses others on the command line; a config read
    # from a checkpoint or a recipe is checked here)
    ("data", "augment"): (["none", "flip-crop-cutout"], ["crop"]),
    ("data", "task"): (["auto", "multilabel"], ["multi-label"]),
    ("optim", "optimizer"): (["sgd", "adamw"], ["lbfgs"]),
    ("optim", "schedule"): (["constant", "onecycle"], ["step"]),
    ("run", "precision"): (["auto", "fp16"], ["fp8"]),
    ("data", "balance"): (["none", "loss"], ["oversample"]),
    ("data", "auto_augment"): (["none", "randaugment"], ["autoaugment-v9"]),
    ("optim", "monitor"): (["val_acc", "val_macro_f1", "val_map"], ["test_acc"]),
    ("data", "normalize"): (["auto", "weights"], ["imagenet"]),
    ("model", "head_init"): (["zero", "small"], ["xavier"]),
    ("model", "bn_stats"): (["update", "frozen"], ["reestimate"]),
}
FLAGS = {(section, f.name): flag for section, f, flag in config_fields()}
TYPES = {(section, f.name): f.type.split(" | ")[0] for section, f, _ in config_fields()}


def with_value(section: str, name: str, value) -> TrainConfig:
    cfg = TrainConfig()
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})


def cases(accepted: bool):
    for (section, name), (good, bad) in RULES.items():
        values = good if accepted else bad + ([NAN, INF, -INF] if TYPES[section, name] == "float" else [])
        for value in values:
            yield pytest.param(section, name, value, id=f"{section}.{name}={value}")


def test_every_numeric_and_fixed_choice_field_has_a_rule():
    checked = {key for key, kind in TYPES.items() if kind in ("int", "float")}
    checked |= {(section, f.name) for section, f, _ in config_fields() if f.metadata["choices"]}
    assert checked == set(RULES)


@pytest.mark.parametrize("section, name, value", list(cases(accepted=True)))
def test_value_just_inside_is_accepted(section, name, value):
    cfg = with_value(section, name, value)
    assert cfg.validated() is cfg


@pytest.mark.parametrize("section, name, value", list(cases(accepted=False)))
def test_value_just_outside_is_one_line_naming_the_flag(section, name, value):
    with pytest.raises(UserError) as caught:
        with_value(section, name, value).validated()
    message = str(caught.value)
    assert caught.value.code == EXIT_USAGE and "\n" not in message
    assert FLAGS[section, name] in message and str(value) in message


def test_the_defaults_and_every_recipe_are_valid():
    from imgclf.configfile import RECIPES

    assert TrainConfig().validated() == TrainConfig()
    for recipe in RECIPES.values():
        TrainConfig.from_dict(recipe)  # validated on the way


def test_from_dict_validates():
    with pytest.raises(UserError, match="--log-every must be at least 1, got 0"):
        TrainConfig.from_dict({"run": {"log_every": 0}})


def test_check_number_messages():
    check_number("--x", None, 1, 5)  # None: not given
    for value, words in [(0, "at least 1"), (6, "at most 5"), (NAN, "a finite number"), (-INF, "a finite number"),
                         (10**400, "at most 5")]:
        with pytest.raises(UserError, match=re.escape(f"--x must be {words}, got {value}")):
            check_number("--x", value, 1, 5)
    with pytest.raises(UserError, match="--y must be positive, got 0"):
        check_number("--y", 0, 0, low_open=True)
    with pytest.raises(UserError, match="--y must be above 2, got 2"):
        check_number("--y", 2, 2, low_open=True)
    with pytest.raises(UserError, match="--y must be below 1, got 1"):
        check_number("--y", 1, 0, 1, high_open=True)
    with pytest.raises(UserError, match=re.escape("--z must be 1..9, got 10")):
        check_number("--z", 10, 1, 9, words="1..9")
    check_number("--x", 10**400, 1)  # no upper bound: any int, however large


def test_input_size_is_bounded():
    assert parse_size("64x4096x4096") == (64, 4096, 4096)
    for text in ("65x32x32", "3x4097x32", "3x32x99999999999999999999999"):
        with pytest.raises(UserError, match="is too large: at most 64 channels and 4096 pixels a side"):
            parse_size(text)


def expected_default(f: dataclasses.Field) -> str:
    if f.default is None:
        return f.metadata["none"]
    if type(f.default) is bool:
        return "on" if f.default else "off"
    return str(f.default)


def test_train_help_shows_each_field_default():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # noqa: SLF001 - argparse has no public way
    actions = {a.option_strings[0]: a for a in train._actions if a.option_strings}  # noqa: SLF001
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = "".join(buffer.getvalue().split())  # argparse wraps lines, also after hyphens: compare without spaces
    for _, f, flag in config_fields():
        help_text = actions[flag].help
        assert help_text.endswith(f"(default: {expected_default(f)})"), (flag, help_text)
        assert "".join(help_text.split()) in text, flag
    # the switches that once showed the wrong default: 1.0 == True and 0 == False as dictionary keys
    assert actions["--warmup-epochs"].help.endswith("(default: 1.0)")
    assert actions["--seed"].help.endswith("(default: 0)")


def test_a_float_option_given_a_whole_number_beyond_floats_range_is_one_line():
    """fit(lr=10**400) or `lr: 999...9` in a configuration file: an OverflowError was a traceback."""
    from imgclf.config import check_option

    lr = next(f for f in dataclasses.fields(TrainConfig().optim) if f.name == "lr")
    with pytest.raises(UserError, match="--lr must be a finite number, got a number of 401 digits"):
        check_option(lr, 10**400)
