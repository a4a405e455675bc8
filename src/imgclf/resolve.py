"""From what a user set to a TrainConfig: the one way, for `imgclf train`, `lr-find` and `tune` (imgclf.cli),
`imgclf.fit` (imgclf.api), tune's trials and a resumed run.

What a user set comes in layers, each (section, field) -> value with None meaning "not set", a later layer
winning: a recipe's values (or, resuming, the run's own configuration), then a --config file's, then the
flags or fit's keywords. `config.TrainConfig.from_sources` stacks them and checks every value with the one
rule of its option (`config.check_option`); this module reads the files those layers come from (recipes and
configuration files through imgclf.configfile, a run's checkpoint through imgclf.train) and guards a run
folder that already holds a run. No torch here (a resumed run's checkpoint is read by a function that
imports it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from imgclf.config import TrainConfig
from imgclf.configfile import RECIPES, read_config_pinned
from imgclf.errors import UserError
from imgclf.files import refuse_if_in_use
from imgclf.folds import FOLDS_FILE


def user_values(config: str | os.PathLike | None, given: dict[tuple[str, str], object], *,
                trust_changed_code: bool = False) -> dict:
    """The layer of a configuration file (`config`, None for none) with the values of `given` that are set
    (not None) over it: `--config FILE` under the flags, `fit(config=FILE)` under fit's keywords.

    A run's config.yaml records the SHA-256 of its FILE.py network: when that network is the one to train
    (no model given over it), a file whose code changed since is one UserError line unless
    `trust_changed_code` (--trust-changed-code), as a resumed run's is."""
    values, pinned = read_config_pinned(config) if config is not None else ({}, None)
    if pinned is not None and given.get(("model", "name")) is None:
        from imgclf.usercode import check_pinned_code  # torch: a FILE.py network is about to be built anyway

        check_pinned_code(str(values["model", "name"]), pinned, source=str(config), trust=trust_changed_code)
    return {**values, **{key: value for key, value in given.items() if value is not None}}


AUTO_RECIPE = "auto"  # finetune with --pretrained weights, photos for a folder of photos, else default


def recipe_choices() -> list[str]:
    """What --recipe takes: auto, then the recipes shipped in imgclf/recipes/."""
    return [AUTO_RECIPE, *sorted(RECIPES)]


def chosen_recipe(recipe: str, *layers: dict[tuple[str, str], object]) -> str:
    """The recipe `recipe` names; auto: finetune when a layer sets --pretrained (training from pretrained
    weights wants other defaults than training from scratch: docs/usage.md, Fine-tuning pretrained weights),
    photos when the --data the layers give is a folder of photos (trained from scratch, photos wanted other
    defaults than CIFAR-sized pictures: docs/usage.md, Your own photos), else default."""
    if recipe != AUTO_RECIPE:
        return recipe
    if any(layer.get(("model", "pretrained")) for layer in layers):
        return "finetune"
    key = ("data", "data")
    data = next((layer[key] for layer in reversed(layers) if key in layer), None)  # the last layer's --data
    if isinstance(data, str | os.PathLike):
        from imgclf.sources import holds_photos  # torch: only to read a folder's first pictures

        if holds_photos(data):
            return "photos"
    return "default"


def resolve(*layers: dict[tuple[str, str], object], recipe: str = AUTO_RECIPE,
            base: TrainConfig | None = None, typed: frozenset | None = None) -> TrainConfig:
    """The TrainConfig of `layers` (a later one winning) over the values of `recipe` (`chosen_recipe`), or
    over `base` (a resumed run's configuration, where only resumable options may change). An unknown recipe,
    a bad value, an option that would do nothing (`typed`: the options typed as flags, see config.settled)
    or a contradiction of the resumed run is one UserError line."""
    if recipe != AUTO_RECIPE and recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r}; choose one of {', '.join(recipe_choices())}")
    if base is not None:
        return TrainConfig.from_sources({}, *layers, base=base)
    return TrainConfig.from_sources(RECIPES[chosen_recipe(recipe, *layers)], *layers, typed=typed)


def resume(folder, *layers: dict[tuple[str, str], object], recipe: str = AUTO_RECIPE, check_code: bool = True,
           model_code: str | None = None, trust_changed_code: bool = False) -> TrainConfig:
    """The configuration to continue the run in `folder` with: its own (read from its last checkpoint and
    checked as the flags are: a damaged one is one UserError line), with `layers` over it; for the parent
    folder of a cross-validation's folds (imgclf.crossval), the configuration in its folds.json. `check_code`,
    `model_code`, `trust_changed_code`: a network from the user's .py file, as train.resumed_config checks it;
    `recipe` is only checked to exist (the run's configuration replaces it)."""
    if (Path(folder) / FOLDS_FILE).is_file():
        return resolve(*layers, recipe=recipe, base=folds_config(folder))
    from imgclf.train import resumed_config  # torch: a checkpoint is read

    base = resumed_config(folder, check_code=check_code, model_code=model_code,
                          trust_changed_code=trust_changed_code)
    return resolve(*layers, recipe=recipe, base=base)


def folds_config(folder) -> TrainConfig:
    """The configuration of the cross-validation whose folds are under `folder` (its folds.json, written by
    imgclf.crossval), `out` set to `folder` and `stop_after` cleared as a resumed run's; a damaged file is
    one UserError line."""
    path = Path(folder) / FOLDS_FILE
    try:
        cfg = TrainConfig.from_dict(json.loads(path.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, UserError) as err:
        raise UserError(f"cannot resume from {path}: it is damaged ({str(err)[:120]}); start a new run with "
                        f"--out") from None
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=str(folder), stop_after=None))


def refuse_existing_run(out: str, how_to_resume: str, elsewhere: str) -> None:
    """Raise one UserError line when the run folder `out` is in use or already holds a run (a new run
    would overwrite it); the line says how to resume it (`how_to_resume`) or where else to go (`elsewhere`)."""
    refuse_if_in_use(out)  # a run that is training says so, rather than "already holds a run"
    if (Path(out) / "checkpoints" / "last.pt").exists():
        raise UserError(f"{out} already holds a run; {how_to_resume}, or choose another {elsewhere}")
    if (Path(out) / FOLDS_FILE).exists():
        raise UserError(f"{out} already holds the folds of a cross-validation; {how_to_resume}, or choose "
                        f"another {elsewhere}")
