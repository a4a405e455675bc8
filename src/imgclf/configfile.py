"""Configuration files: `imgclf train --config run.yaml`, `--print-config`, RUN/config.yaml and the recipes.

A configuration file is a YAML mapping of `imgclf train`'s options, named as `imgclf.fit` names them: the
flag without its dashes, - written _ (`batch_size: 64`, `model: resnet18`, `lr: 0.01`); `batch-size` is
read too, and so is a run's config.json (sections data, model, optim, run of field names). A null value is
an option left out, as None is for `fit`. Files give values, not defaults of their own: the recipe's
defaults come first, then the file's values, then the flags given on the command line. The recipes
(`--recipe NAME`) are such files, shipped in imgclf/recipes/. Every bad key or value is one UserError line
naming the file and the key. No torch here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from imgclf.config import TrainConfig, check_option, config_fields
from imgclf.errors import UserError

HEADER = ("# imgclf train configuration: rerun it with `imgclf train --config FILE`; flags given with it win.\n"
          "# Keys are imgclf train's flags without the dashes (- written _); `imgclf train --help` says what "
          "each does.\n")
RUN_HEADER = ("# The configuration of this run (config.json's, as YAML): `imgclf train --config config.yaml --out NEW`\n"
              "# trains it again; `imgclf train --resume RUN` continues it.\n")
SECTION_TITLES = {"data": "data", "model": "model", "optim": "optimisation", "run": "run"}
# In a run's config.yaml, beside `model: FILE.py:Class`: the SHA-256 of the code the run imported. Its
# presence also says that FILE.py is relative to the configuration file's folder (the run's), not the current one.
CODE_KEY = "model_sha256"


def option_keys() -> dict[str, tuple[str, dataclasses.Field, str]]:
    """Key -> (section, field, flag) for every option: `--batch-size` is `batch_size`, `--model` is `model`."""
    return {key_of(flag): (section, f, flag) for section, f, flag in config_fields()}


MAX_YAML = 1 << 20  # bytes of a configuration file: a full one is a few kilobytes


def key_of(flag: str) -> str:
    return flag[2:].replace("-", "_")


def read_yaml(path, *, what: str = "configuration file"):
    """The YAML document in `path`; one UserError line when it cannot be read or parsed."""
    import yaml

    from imgclf.files import not_regular

    path = Path(path).expanduser()
    problem = not_regular(path)  # a FIFO would hang the read
    if problem is not None and problem != "no such file" and not path.is_dir():
        raise UserError(f"cannot read the {what} {path}: {problem}")
    if problem is None and path.stat().st_size > MAX_YAML:
        raise UserError(f"the {what} {path} holds {path.stat().st_size:,} bytes: over the {MAX_YAML:,} a "
                        f"configuration needs (is it the right file?)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read the {what} {path}: {getattr(err, 'strerror', None) or err}") from None
    try:
        return yaml.load(text, Loader=_loader_without_aliases(path, what))  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path} is not valid YAML{where}: {problem}") from None


MAX_YAML_DEPTH = 64  # lists and mappings within each other in a configuration file


def _loader_without_aliases(path: Path, what: str):
    """yaml.SafeLoader refusing, in one line, aliases (`*name`, `<<: *name`): nested ones expand exponentially
    (a 500-byte file can stand for billions of values), and a configuration has no need of them; and values
    nested over MAX_YAML_DEPTH deep."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                raise UserError(f"{path} line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are "
                                f"not accepted in a {what}; write the value out in full")
            if self.depth >= MAX_YAML_DEPTH:  # (Python's own recursion limit would end in a traceback)
                raise UserError(f"{path} line {event.start_mark.line + 1}: values nested over {MAX_YAML_DEPTH} "
                                f"deep are not accepted in a {what}")
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return NoAliases


def read_config(path) -> dict[tuple[str, str], object]:
    """The options a configuration file sets, as config.TrainConfig.from_sources takes them: (section, field) -> value."""
    return read_config_pinned(path)[0]


def read_config_pinned(path) -> tuple[dict[tuple[str, str], object], str | None]:
    """`read_config`'s values, and the SHA-256 the file records for its `model: FILE.py:Class` network (CODE_KEY,
    written into a run's config.yaml), or None. With that record, FILE.py is taken relative to the file's
    folder: the model value returned names it from the current folder."""
    doc = read_yaml(path)
    pinned = doc.pop(CODE_KEY, None) if isinstance(doc, dict) else None
    values = parse_options(doc, str(path))
    if pinned is None:
        return values, None
    name = str(values.get(("model", "name")))
    file, _, class_name = name.rpartition(":")
    if not (isinstance(pinned, str) and re.fullmatch(r"[0-9a-f]{64}", pinned)):
        raise UserError(f"{path}: {CODE_KEY}: {pinned!r} is not the SHA-256 of a file (64 hexadecimal digits)")
    if not file.endswith(".py"):
        raise UserError(f"{path}: {CODE_KEY} records the code of a FILE.py:Class network, but model is {name!r}")
    folder = os.path.dirname(os.fspath(Path(path).expanduser()))
    values["model", "name"] = f"{os.path.join(folder, file)}:{class_name}"  # joined, not resolved: links hold
    return values, pinned


def parse_options(doc, source: str) -> dict[tuple[str, str], object]:
    """(section, field) -> value for a mapping of option keys (or of config.json's sections) read from
    `source`; each value checked and converted as its flag would read it. One UserError line per problem."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UserError(f"{source} must be a mapping of option: value lines (e.g. `lr: 0.01`), "
                        f"not a {type(doc).__name__}")
    known, given = option_keys(), {}
    for key, value in doc.items():
        key = str(key).replace("-", "_")
        if key in TrainConfig.SECTIONS and isinstance(value, dict):  # config.json's layout
            given.update(_section(source, key, value))
            continue
        if key not in known:
            raise UserError(unknown_key(source, key, known))
        section, f, _ = known[key]
        given[section, f.name] = option_value(source, key, f, value)
    return given


def _section(source: str, section: str, values: dict) -> dict[tuple[str, str], object]:
    fields = {f.name: (f, flag) for s, f, flag in config_fields((section,))}
    given = {}
    for name, value in values.items():
        if name not in fields:
            raise UserError(unknown_key(source, f"{section}.{name}", {f"{section}.{n}": None for n in fields}))
        f, _ = fields[name]
        given[section, name] = option_value(source, f"{section}.{name}", f, value)
    return given


def unknown_key(source: str, key: str, known) -> str:
    """One line naming the unknown key and the closest valid one."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "the keys are imgclf train's flags without the dashes"
    return f"{source}: unknown key {key!r}; {hint}"


def option_value(source: str, key: str, f: dataclasses.Field, value, *, bounds: bool = True):
    """`value` of the option `f`, read from `source` under `key`, as config.check_option checks and converts
    it (`bounds`: as there); a number written as text is read as one first (YAML reads 1e-3 as a string)."""
    if f.type.split(" | ")[0] in ("int", "float") and isinstance(value, str):
        with contextlib.suppress(ValueError):  # not a number: check_option says so
            value = int(value) if f.type.startswith("int") else float(value)
    return check_option(f, value, what=f"{source}: {key}: {value!r}", bounds=bounds)


def config_yaml(cfg: TrainConfig, header: str = HEADER, *, folder: str | os.PathLike | None = None) -> str:
    """`cfg` as a configuration file: every option, in `imgclf train --help`'s order, under a comment per
    section. Reading it back (`read_config`) gives `cfg` again. `folder`: where the file is written (a run's
    folder): a FILE.py:Class network is then named relative to it, with the SHA-256 of its code (CODE_KEY),
    so that the file trains the same code again from any folder, and refuses a changed one."""
    import yaml

    lines, current = [header.rstrip("\n")] if header else [], None
    for section, f, flag in config_fields():
        if section != current:
            lines.append(f"\n# {SECTION_TITLES[section]}")
            current = section
        pairs = {key_of(flag): getattr(getattr(cfg, section), f.name)}
        if folder is not None and (section, f.name) == ("model", "name"):
            pairs = _pinned_code(pairs["model"], folder) or pairs
        lines += [yaml.safe_dump({key: value}, default_flow_style=False, width=10**9,
                                 allow_unicode=True).rstrip("\n") for key, value in pairs.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def _pinned_code(name: str, folder) -> dict | None:
    """{"model": FILE.py:Class relative to `folder`, CODE_KEY: its SHA-256} for a network from a .py file
    (the code imported in this process, see usercode.code_identity), else None."""
    from imgclf.usercode import code_identity, parse_code_name  # torch: only where a FILE.py network trains

    ref = parse_code_name(name)
    if ref is None:
        return None
    relative = os.path.relpath(ref.path.absolute(), Path(folder).absolute())
    return {"model": f"{relative}:{ref.class_name}", CODE_KEY: code_identity(name, None)["sha256"]}


# ---------------------------------------------------------------- recipes: configuration files shipped with imgclf

def recipe_folder():
    return resources.files("imgclf") / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in recipe_folder().iterdir() if p.name.endswith(".yaml"))


def read_recipe(name: str) -> dict[str, dict]:
    """The recipe `name` (imgclf/recipes/NAME.yaml) as section -> {field: value}, as TrainConfig.from_sources takes it."""
    if name not in recipe_names():
        raise KeyError(name)
    import yaml

    doc = yaml.safe_load((recipe_folder() / f"{name}.yaml").read_text())
    sections: dict[str, dict] = {}
    for (section, field), value in parse_options(doc, f"recipe {name}").items():
        sections.setdefault(section, {})[field] = value
    return sections


class _Recipes(Mapping):
    """Named recipes, name -> {section: {field: value}}: values that replace the defaults of imgclf.config
    unless a file or a flag sets them. Each is a configuration file a user can read, imgclf/recipes/NAME.yaml,
    read when asked for."""

    def __getitem__(self, name: str) -> dict[str, dict]:
        return read_recipe(name)

    def __iter__(self):
        return iter(recipe_names())

    def __len__(self) -> int:
        return len(recipe_names())

    def __contains__(self, name) -> bool:
        return name in recipe_names()


RECIPES: Mapping[str, dict[str, dict]] = _Recipes()
