"""The command line: the only reader of argv and the only user of argparse. Every subcommand's flags are
declared here (the training and data flags generated from their declarations in imgclf.config); its cmd_*
function turns them into plain arguments, calls the library and prints what the library formatted (each
command's output is formatted beside its code: runs.runs_output, tune.tune_output...). Numeric flags are
checked before a command runs: the training ones by their option's rule (config.check_option, through
resolve.resolve), the others by the bounds given where they are declared (`_number`, `add_data_flags`).
Library modules are imported inside the cmd_* functions, so building the parser imports no torch and no
matplotlib, and `imgclf predict` starts lean."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from imgclf import __version__
from imgclf.config import (
    MAX_BATCH,
    MAX_SEED,
    PRECISIONS,
    DataConfig,
    TrainConfig,
    check_number,
    config_fields,
    flag_of,
    parse_size,
)
from imgclf.errors import (
    EXIT_DISTRIBUTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_SIGINT,
    EXIT_USAGE,
    Stopped,
    UserError,
    shown,
)
from imgclf.resolve import AUTO_RECIPE, recipe_choices, refuse_existing_run, resolve, resume, user_values


def entry() -> None:
    """The `imgclf` program (console script and `python -m imgclf`): `main`, then exit with its status.

    After a distributed job's peer died, the process group's C++ threads can abort the interpreter while it
    shuts down ("terminate called without an active exception", status -6) although imgclf already said
    what happened: that status is left unsaid by ending the process at once, output flushed."""
    code = main()
    if code == EXIT_DISTRIBUTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    """Run the command of `argv` (default: sys.argv[1:]); return its exit status.

    Ctrl-C is one line and status 130 wherever it lands, also during start-up: a KeyboardInterrupt inside an
    import (torch's of numpy) can leave a half-imported module that then fails with another exception, which
    is reported as the interruption it comes from (unless --debug)."""
    interrupted = []

    def on_sigint(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: Python's own handling stays
        previous = None
    try:
        return _run(argv)
    except BrokenPipeError:  # whoever read stdout stopped (`imgclf predict ... | head`): a normal end
        _stdout_to_devnull()
        return EXIT_OK
    except Exception:
        if not interrupted or "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        print("imgclf: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_OK
    try:
        for dest, (flag, bounds) in args.limits.items():
            check_number(flag, getattr(args, dest), **bounds)
        if getattr(args, "model_code", None) or getattr(args, "trust_changed_code", False):  # checked at every load
            from imgclf.usercode import model_code_scope

            with model_code_scope(args.model_code, args.trust_changed_code):
                return args.func(args) or EXIT_OK
        return args.func(args) or EXIT_OK
    except UserError as err:
        if args.debug:
            raise
        print(f"imgclf: error: {shown(str(err))}", file=sys.stderr)
        return err.code
    except BrokenPipeError:  # not an error to report: main ends quietly
        raise
    except OSError as err:  # a folder that cannot be written, a full disk: the system's own one line
        if args.debug:
            raise
        print(f"imgclf: error: {shown(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("imgclf: interrupted", file=sys.stderr)
        return EXIT_SIGINT


def _stdout_to_devnull() -> None:
    """Point file descriptor 1 at /dev/null, so that flushing what is left in sys.stdout's buffer at exit
    does not fail again (the Python documentation's "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # sys.stdout is no file (a test's capture): no flush at exit
        pass


def _say(out: str, err: str) -> None:
    """Print a command's output as its module formatted it: `out` to standard output, `err` to standard error."""
    if out:
        sys.stdout.write(out)
        sys.stdout.flush()
    if err:
        sys.stderr.write(err)
        sys.stderr.flush()


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error (--help shows the usage)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="imgclf", description="Train, evaluate, inspect and use image classifiers.")
    parser.add_argument("--version", action="version", version=f"imgclf {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in (_add_train, _add_eval, _add_predict, _add_samples, _add_models, _add_inspect, _add_export,
                _add_serve, _add_show, _add_features, _add_cam, _add_lr_find, _add_env, _add_cache, _add_runs,
                _add_tune, _add_embed, _add_similar, _add_duplicates, _add_review):
        add(sub, common)
    parser.set_defaults(debug=False)
    return parser


def _command(sub, common, name: str, func, **kwargs) -> argparse.ArgumentParser:
    """A subcommand running `func(args)`; `limits` collects the bounds of its numeric flags (`_number`)."""
    p = sub.add_parser(name, parents=[common], **kwargs)
    p.set_defaults(func=func, limits={})
    return p


def _number(p: argparse.ArgumentParser, flag: str, kind: type, low=None, high=None, *, group=None,
            low_open: bool = False, high_open: bool = False, words: str | None = None, **kwargs) -> None:
    """Add the numeric flag `flag` to `p` (or to its `group`); `main` checks, before the command runs, that
    its value is finite and within [low, high] (config.check_number: one line naming the flag if not)."""
    action = (group or p).add_argument(flag, type=kind, **kwargs)
    p.get_default("limits")[action.dest] = (flag, {"low": low, "high": high, "low_open": low_open,
                                                   "high_open": high_open, "words": words})


# ---------------------------------------------------------------- train (flags from imgclf.config)

def _add_train(sub, common) -> None:
    p = _command(sub, common, "train", cmd_train, help="train a model (notes 26-30)",
                 description="Train a model; defaults come from --recipe, any flag given overrides them.")
    p.add_argument("--recipe", choices=recipe_choices(), default=AUTO_RECIPE,
                   help="auto: finetune with --pretrained, photos for a folder of photos, else default; default: a "
                        "recipe that trains well from scratch (SGD); photos: the default with AdamW at 1e-3, batch "
                        "64; finetune: AdamW, the head alone first, then the whole network at discriminative "
                        "rates (docs/usage.md: Fine-tuning pretrained weights); notes: exactly the notes' SGD 0.01, batch 64, no "
                        "augmentation; fast: the CIFAR speed records' recipe for fastnet")
    p.add_argument("--resume", metavar="RUN", help="continue RUN/checkpoints/last.pt exactly where it stopped")
    _add_config_file(p)
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as YAML (for --config) and train nothing")
    _add_model_code(p)
    add_config_flags(p)


def _add_config_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml",
                   help="options from a YAML file (keys: these flags without the dashes, e.g. `lr: 0.01`); "
                        "applied over --recipe, and flags given here win (docs/usage.md: Configuration files)")


SECTION_TITLES = {"data": "data", "model": "model", "optim": "optimisation", "run": "run"}


def shown_default(f: dataclasses.Field) -> str:
    """A field's default as its flag's help shows it: on/off for switches, the declared words for None."""
    if f.default is None:
        return f.metadata["none"]
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return str(f.default)


def add_config_flags(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = (),
                     required: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (but those in `skip`), from the field's declaration (config.option).
    Flags default to None, so that only what the user typed overrides the recipe or the resumed run."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section, f, flag in config_fields():
        if flag in skip:
            continue
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(SECTION_TITLES[section]))
        group.add_argument(flag, **_flag_kwargs(f), dest=f"{section}.{f.name}", default=None,
                           required=flag in required)


def add_data_flags(p: argparse.ArgumentParser, names: tuple[str, ...], *, flags: dict[str, str] | None = None,
                   helps: dict[str, str] | None = None, required: tuple[str, ...] = ()) -> None:
    """Flags of the DataConfig fields `names` for a command that reads data outside training (eval, show), from
    the declarations train's flags come from: kind, choices, metavar, help, the field's own default (no recipe
    here) and its bounds, checked before the command runs as `_number`'s are. `flags` renames a field's flag
    (eval's --batch-size), `helps` words a flag's help for this command; the dest is the flag's name."""
    fields = {f.name: f for f in dataclasses.fields(DataConfig)}
    for name in names:
        f = fields[name]
        flag = (flags or {}).get(name) or flag_of(f)
        kwargs = {**_flag_kwargs(f), "default": f.default, "required": name in required}
        if helps and name in helps:
            kwargs["help"] = helps[name]
        action = p.add_argument(flag, **kwargs)
        if kwargs.get("type") in (int, float):
            p.get_default("limits")[action.dest] = (flag, f.metadata["bounds"])


def _flag_kwargs(f: dataclasses.Field) -> dict:
    """argparse's keywords for the flag of the configuration field `f`: kind, choices, metavar, help."""
    meta, kind = f.metadata, f.type.split(" | ")[0]
    kwargs = {"help": f"{meta['help']} (default: {shown_default(f)})".replace("%", "%%")}
    if meta.get("const") is not None:  # the flag alone means this value
        kwargs.update(nargs="?", const=meta["const"])
    if kind == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        number = {"int": int, "float": float, "str": str}[kind]
        kwargs.update(type=_number_or(number, meta["also"]) if meta["also"] else number, choices=meta["choices"],
                      metavar=meta["metavar"] or (None if meta["choices"] else
                                                  {"int": "N", "float": "X"}.get(kind, f.name.upper())))
    return kwargs


def _number_or(number, words: tuple[str, ...]):
    """An argparse type: one of `words` as it is, else `number(text)` (argparse's message when neither)."""
    def convert(text: str):
        return text if text in words else number(text)

    convert.__name__ = number.__name__  # argparse names the type in its error: "invalid int value"
    convert.number = number
    return convert


def flag_values(args: argparse.Namespace) -> dict[tuple[str, str], object]:
    """(section, field) -> value of every training flag of `args` (None: not given)."""
    return {(section, f.name): getattr(args, f"{section}.{f.name}", None) for section, f, _ in config_fields()}


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a command's training flags (resolve.resolve): --recipe's values, --config's over
    them, the flags given over those; with --resume RUN, the run's own configuration instead of the recipe's
    (a network from the user's .py file rebuilt only from --model-code, checked against its recorded hash)."""
    flags = flag_values(args)
    layer = user_values(getattr(args, "config", None), flags)
    if getattr(args, "resume", None):
        return resume(args.resume, layer, recipe=args.recipe, model_code=args.model_code,
                      trust_changed_code=args.trust_changed_code)
    return resolve(layer, recipe=args.recipe, typed=frozenset(key for key, value in flags.items() if value is not None))


def cmd_train(args: argparse.Namespace) -> int:
    cfg = train_config(args)
    if args.print_config:
        from imgclf.configfile import config_yaml

        print(config_yaml(cfg), end="")
        if cfg.model.pretrained:  # what the weights' input contract makes of the pictures (not a flag of its own)
            from imgclf.pipeline import describe_input, normalization

            print(f"# {describe_input(normalization(cfg, 3), cfg.data.img_size)}")
        return EXIT_OK
    if not args.resume:
        refuse_existing_run(cfg.run.out, f"resume it with --resume {cfg.run.out}", "--out")
    if cfg.data.folds and cfg.data.fold is None:
        return _train_folds(cfg, resume=bool(args.resume))
    from imgclf.train import train  # torch and the rest, once the flags are known to be good

    try:
        record = train(cfg, resume=bool(args.resume))
    except Stopped as stop:
        print(f"imgclf: {shown(str(stop))}", file=sys.stderr)
        return stop.code
    if record and os.environ.get("RANK", "0") == "0":  # under torchrun, once for the job
        from imgclf.runs import format_finished

        print(format_finished(record, cfg.run.out), file=sys.stderr)
    return EXIT_OK


def _train_folds(cfg: TrainConfig, *, resume: bool) -> int:
    """`imgclf train --folds K`: K runs, one per fold (imgclf.crossval), then their figures' table."""
    from imgclf.crossval import cross_validate, folds_output

    try:
        summary = cross_validate(cfg, resume=resume)
    except Stopped as stop:
        print(f"imgclf: {shown(str(stop))}", file=sys.stderr)
        return stop.code
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once for the job
        _say(*folds_output(summary, cfg.run.out))
    return EXIT_OK


# ---------------------------------------------------------------- eval, predict, samples, models

# Help of a flag several commands share; argparse fills in %(default)s, so the help shows the default in the code.
DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (%(default)s)"

def _add_cache(sub, common) -> None:
    p = _command(sub, common, "cache", cmd_cache, help="list or prune the decoded-folder caches",
                 description="Folders of pictures are decoded once into a cache (default ~/.cache/imgclf); "
                             "list shows them, prune deletes those not used for a while and unfinished builds.")
    p.add_argument("action", choices=("list", "prune"))
    _number(p, "--older-than", float, 0, None, default=30.0, metavar="DAYS",
            help="prune: caches not used for this many days (%(default)s; 0: every cache)")
    add_data_flags(p, ("cache_dir",))
    p.add_argument("--json", action="store_true", help="list: one JSON object per cache")


def cmd_cache(args: argparse.Namespace) -> int:
    from imgclf.cache import caches_output, default_cache_dir, list_caches, prune_caches

    root = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    if args.cache_dir and not root.is_dir():
        raise UserError(f"--cache-dir {root} is not a folder")
    caches = list_caches(root) if args.action == "list" else prune_caches(root, older_than_days=args.older_than)
    _say(*caches_output(caches, root, args.action, as_json=args.json))
    return EXIT_OK


def _add_eval(sub, common) -> None:
    p = _command(sub, common, "eval", cmd_eval, help="loss, accuracy, per-class accuracy, confusion matrix")
    p.add_argument("checkpoint", help="an imgclf checkpoint, or a model it exported (.onnx, OpenVINO .xml, "
                                       "TorchScript)")
    _add_model_code(p)
    p.add_argument("--split", choices=("train", "val", "test"),
                   help="evaluate this split instead (val: the validation split, or the share held out in training)")
    add_data_flags(p, ("data", "labels", "data_root", "val_fraction", "eval_batch_size", "cache_dir"),
                   flags={"eval_batch_size": "--batch-size"}, required=("data",), helps={
                       "data": "data set or folder: by default its test split where it has one beside val/, else "
                               "its held-out split, and all of a plain folder of class folders",
                       "labels": "as `imgclf train --labels`"})
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--reliability", metavar="FILE.png",
                   help="single-label: draw the reliability diagram, before and after the stored temperature")
    _number(p, "--reject-precision", float, 0, 1, low_open=True, metavar="X",
            help="single-label: print the --reject-below cut at which the pictures kept are right at precision X "
                 "on this split (choose it on --split val)")


def cmd_eval(args: argparse.Namespace) -> int:
    from imgclf.evaluate import evaluate_checkpoint, evaluation_summary, evaluation_table, extra_outputs

    cfg = DataConfig(data=args.data, data_root=args.data_root, val_fraction=args.val_fraction,
                     eval_batch_size=args.batch_size, cache_dir=args.cache_dir, labels=args.labels)
    result = evaluate_checkpoint(args.checkpoint, cfg, split=args.split, device=args.device)
    print(json.dumps(evaluation_summary(result)) if args.json else evaluation_table(result))
    _say("", extra_outputs(result, reliability=args.reliability, reject_precision=args.reject_precision))
    return EXIT_OK


REJECT_HELP = ("answer unknown for a picture whose top (calibrated) probability is under P (default: the model's "
               "stored cut, if any; `imgclf eval --reject-precision` suggests one)")


def _add_predict(sub, common) -> None:
    p = _command(sub, common, "predict", cmd_predict, help="label pictures with a trained model (note 31)")
    p.add_argument("checkpoint", help="an imgclf checkpoint, or a model it exported (.onnx, OpenVINO .xml, "
                                       "TorchScript)")
    _add_model_code(p)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="picture files and folders, http(s):// URLs, or - for a picture on standard input; or "
                        "videos (.mp4, ...), stream URLs (rtsp://) or a camera (0): a label per second "
                        "(docs/usage.md: Videos and cameras)")
    frames = p.add_mutually_exclusive_group()
    _number(p, "--every", int, 1, group=frames, metavar="N", help="videos: label every Nth frame (default: all)")
    _number(p, "--fps", float, 0, low_open=True, group=frames, metavar="F",
            help="videos: label about F frames per second of video")
    p.add_argument("--frames-csv", metavar="FILE",
                   help="videos: each labelled frame's scores into FILE (default: NAME.frames.csv beside a video file)")
    _number(p, "--topk", int, 1, default=3, help="how many labels per picture (%(default)s)")
    _number(p, "--batch-size", int, 1, MAX_BATCH, default=64, help="pictures per batch (%(default)s)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--precision", choices=PRECISIONS,
                   help="a checkpoint's arithmetic: auto (the default: bf16 where the CPU or GPU computes it "
                        "natively, else fp32; every picture whose top label bf16 could change is computed "
                        "again in fp32) or fp32 (exact probabilities, as exported models give; their default)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per line")
    fmt.add_argument("--csv", action="store_true", help="CSV with a header row")
    _number(p, "--reject-below", float, 0, 1, metavar="P", help=REJECT_HELP)


def cmd_predict(args: argparse.Namespace) -> int:
    from imgclf import video
    from imgclf.predict import Predictor, print_predictions

    videos = [video.is_video(path) for path in args.paths]
    if any(videos) and not all(videos):
        raise UserError("give `imgclf predict` pictures or videos, not both at once")
    if not any(videos) and (args.every or args.fps or args.frames_csv):
        raise UserError("--every, --fps and --frames-csv are for videos (.mp4, ..., rtsp://, a camera number)")
    if any(videos):
        video.require_decoder()  # before the model is loaded: a missing decoder is said at once
    predictor = Predictor.from_path(args.checkpoint, device=args.device, precision=args.precision)
    predictor.reject(args.reject_below)
    style = "json" if args.json else "csv" if args.csv else "text"
    if any(videos):
        failed = video.print_videos(predictor, args.paths, sampling=video.Sampling(args.every or 1, args.fps),
                                    topk=args.topk, batch_size=args.batch_size, frames_csv=args.frames_csv, style=style)
    else:
        failed = print_predictions(predictor.iter_predict(args.paths, topk=args.topk, batch_size=args.batch_size),
                                   style)
    return EXIT_PARTIAL if failed else EXIT_OK


def _add_samples(sub, common) -> None:
    p = _command(sub, common, "samples", cmd_samples, help="save test pictures of a data set as PNG files")
    p.add_argument("data", help="a built-in data set or a folder")
    add_data_flags(p, ("data_root",))
    _number(p, "--per-class", int, 1, default=1, help="pictures per class (%(default)s)")
    p.add_argument("--out", default="imgs", help="folder to write into (%(default)s)")


def cmd_samples(args: argparse.Namespace) -> int:
    from imgclf.sources import load_data, write_samples

    data = load_data(DataConfig(data=args.data, data_root=args.data_root))
    written = write_samples(data.val, data.classes, Path(args.out), per_class=args.per_class)
    print(f"wrote {len(written)} {data.val_name} pictures to {args.out}/")
    return EXIT_OK


def _add_models(sub, common) -> None:
    p = _command(sub, common, "models", cmd_models, help="list the model names --model takes")
    p.add_argument("--search", metavar="TEXT", help="only names containing TEXT (any case), e.g. convnext")


def cmd_models(args: argparse.Namespace) -> int:
    from imgclf.models import available_models

    names = available_models(search=args.search)
    if not names:
        raise UserError(f"no model name contains {args.search!r}; `imgclf models` lists them all")
    print("\n".join(names))
    return EXIT_OK


def _add_model_code(p: argparse.ArgumentParser) -> None:
    """--model-code / --trust-changed-code: the code of a checkpoint's network from the user's own .py file."""
    p.add_argument("--model-code", metavar="FILE.py", help="the .py file of a network trained with --model "
                   "FILE.py:Class (a checkpoint records its SHA-256, never the code; a changed file is refused)")
    p.add_argument("--trust-changed-code", action="store_true",
                   help="accept --model-code although its SHA-256 differs from the one recorded")


# ---------------------------------------------------------------- inspect, export, serve

def _add_inspect(sub, common) -> None:
    p = _command(sub, common, "inspect", cmd_inspect, help="layer table: output shape, params, MACs (notes 16-21)",
                 description="Print every layer of a model with its output shape, parameters and "
                             "multiply-accumulates for one input, with totals and size.")
    p.add_argument("target", metavar="MODEL|CKPT", help="a model name (`imgclf models`) or a checkpoint file")
    _add_model_code(p)
    p.add_argument("--input-size", metavar="CxHxW",
                   help="input shape, e.g. 3x32x32 (default: the checkpoint's, or 3x32x32 for a model name)")
    _number(p, "--num-classes", int, 1, 100_000, default=10,
            help="classes of the last layer for a model name (%(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_inspect(args: argparse.Namespace) -> int:
    shape = parse_size(args.input_size) if args.input_size else None
    from imgclf.inspect import format_table, inspect_target

    summary = inspect_target(args.target, input_shape=shape, num_classes=args.num_classes)
    print(json.dumps(summary.to_dict()) if args.json else format_table(summary))
    return EXIT_OK


def _add_export(sub, common) -> None:
    from imgclf.formats import FORMATS  # the table of formats; it imports neither torch nor a runtime

    p = _command(sub, common, "export", cmd_export,
                 help="write a checkpoint as ONNX, OpenVINO, TorchScript or safetensors (--int8: quantized)",
                 description="Write a checkpoint in a format usable without imgclf; class names and "
                             "preprocessing are stored inside the file (docs/usage.md: Export and serve).")
    p.add_argument("checkpoint")
    _add_model_code(p)
    p.add_argument("--format", required=True, choices=tuple(FORMATS), dest="export_format",
                   help=", ".join(f.help for f in FORMATS.values()))
    p.add_argument("--out", help="output file (default: beside the checkpoint, e.g. best.onnx, best.int8.xml)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output file (and, for openvino, the .bin beside it); never a checkpoint")
    p.add_argument("--int8", action="store_true",
                   help=f"{', '.join(n for n, f in FORMATS.items() if f.quantize)}: quantize to int8 after "
                        f"calibrating on training pictures; prints the int8 model's accuracy next to the float "
                        f"one's on the held-out split")
    p.add_argument("--calibration-data", metavar="DATA",
                   help="data set or folder whose training pictures calibrate --int8 (default: the checkpoint's)")
    _number(p, "--calibration-size", int, 1, 100_000, help="training pictures to calibrate on (default 300)")
    p.add_argument("--eval-data", metavar="DATA", help="data set or folder whose held-out split --int8 is checked on "
                                                       "(default: the checkpoint's, else --calibration-data)")
    _number(p, "--reject-below", float, 0, 1, metavar="P",
            help="single-label: store the cut P in the metadata, so that predict and serve answer unknown under it")


def cmd_export(args: argparse.Namespace) -> int:
    from imgclf.export import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.export_format, out=args.out, int8=args.int8,
                            calibration_data=args.calibration_data, eval_data=args.eval_data,
                            calibration_size=args.calibration_size, force=args.force,
                            reject_below=args.reject_below).describe())
    return EXIT_OK


def _add_serve(sub, common) -> None:
    p = _command(sub, common, "serve", cmd_serve, help="serve a checkpoint over HTTP, with a web page",
                 description="Serve predictions over HTTP: POST /predict, GET /health, and a page "
                             "at / to try pictures in a browser.")
    p.add_argument("checkpoint", help="an imgclf checkpoint, or a model it exported (.onnx, OpenVINO .xml, "
                                       "TorchScript)")
    _add_model_code(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s: this machine only)")
    _number(p, "--port", int, 1, 65535, words="between 1 and 65535", default=8000, help="TCP port (%(default)s)")
    _number(p, "--topk", int, 1, default=5, help="labels per answer unless the request asks ?topk=N (%(default)s)")
    _number(p, "--max-upload-mb", float, 0, low_open=True, default=10.0,
            help="largest accepted upload, in MB (%(default)g)")
    _number(p, "--max-batch", int, 1, MAX_BATCH, default=32, help="most pictures per forward pass (%(default)s)")
    _number(p, "--max-megapixels", float, 0, 1000, low_open=True, default=40.0,
            help="largest picture decoded, in million pixels (a JPEG counts at its reduced decoding scale); "
                 "larger ones are refused from their header with 413 (%(default)g)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    _number(p, "--reject-below", float, 0, 1, metavar="P", help=REJECT_HELP)


def cmd_serve(args: argparse.Namespace) -> int:
    from imgclf.serve import serve_checkpoint

    serve_checkpoint(args.checkpoint, host=args.host, port=args.port, topk=args.topk,
                     max_upload_mb=args.max_upload_mb, max_batch=args.max_batch, device=args.device,
                     max_megapixels=args.max_megapixels, reject_below=args.reject_below)
    return EXIT_OK


# ---------------------------------------------------------------- show, features, lr-find, env

def _add_show(sub, common) -> None:
    p = _command(sub, common, "show", cmd_show, help="a labelled grid of sample pictures (notes 06, 13-14)",
                 description="Write a PNG grid of sample pictures labelled with their class names, "
                             "and print how many pictures each class has in each split.")
    p.add_argument("data", metavar="DATA", help="cifar10, mnist, ... or a folder (as `train --data`)")
    how = p.add_mutually_exclusive_group()
    _number(p, "--per-class", int, 1, 1000, words="1..1000", group=how, metavar="N",
            help="N pictures of each class, one row per class (default 8 when there are at most 20 classes)")
    _number(p, "--random", int, 1, 1000, words="1..1000", group=how, metavar="N",
            help="N pictures drawn at random (default 64 with many classes)")
    p.add_argument("--split", choices=("train", "val", "test"), default="train",
                   help="which split to draw from (%(default)s; val: the held-out split, named test when the data "
                        "set's test split serves as validation)")
    p.add_argument("--out", default="samples.png", help="PNG to write (%(default)s)")
    _number(p, "--seed", int, 0, MAX_SEED, default=0, help="which pictures are drawn (%(default)s)")
    add_data_flags(p, ("labels", "img_size", "data_root", "val_fraction", "cache_dir"),
                   helps={"img_size": "side of the square pictures (default: as `train` uses)",
                          "labels": "as `imgclf train --labels` (several labels per picture: each drawn once, "
                                    "captioned with all of them)"})


def cmd_show(args: argparse.Namespace) -> int:
    from imgclf.visualize import show

    cfg = DataConfig(data=args.data, data_root=args.data_root, img_size=args.img_size,
                     val_fraction=args.val_fraction, cache_dir=args.cache_dir, labels=args.labels)
    table, out = show(cfg, per_class=args.per_class, random=args.random, split=args.split, out=args.out,
                      seed=args.seed)
    print(table)
    print(f"wrote {out}")
    return EXIT_OK


def _add_features(sub, common) -> None:
    p = _command(sub, common, "features", cmd_features, help="feature maps of one picture (notes 17-19)",
                 description="Run one picture through a trained model (or an untrained one, as note 17 "
                             "does) and draw what each convolution, activation and pooling layer "
                             "outputs, to PNGs and to TensorBoard.")
    p.add_argument("checkpoint", metavar="CKPT|MODEL", help="a checkpoint, or a model name for random weights")
    _add_model_code(p)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--input-size", metavar="CxHxW", default="3x32x32",
                   help="input of a model given by name (%(default)s); a checkpoint knows its own")
    _number(p, "--seed", int, 0, MAX_SEED, default=0, help="random weights of a model given by name (%(default)s)")
    p.add_argument("--out", help="folder for the PNGs and TensorBoard events (features/<picture name>)")
    _number(p, "--max-channels", int, 1, default=64, help="channels drawn per layer (%(default)s)")


def cmd_features(args: argparse.Namespace) -> int:
    shape = parse_size(args.input_size)
    from imgclf.visualize import features, features_output

    done = features(args.checkpoint, args.image, input_shape=shape, seed=args.seed, out=args.out,
                    max_channels=args.max_channels)
    _say(*features_output(done))
    return EXIT_OK


def _add_cam(sub, common) -> None:
    p = _command(sub, common, "cam", cmd_cam, help="class heatmaps (Grad-CAM): where the network looked",
                 description="Write, for each picture, its class heatmap over it (Grad-CAM or Grad-CAM++ of the "
                             "last layer with a spatial output, or --layer), and a grid of all of them "
                             "(docs/usage.md: Class heatmaps).")
    p.add_argument("checkpoint", metavar="CKPT")
    _add_model_code(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="picture files and folders, http(s):// URLs")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="the class to explain (default: each picture's most probable one)")
    p.add_argument("--method", choices=("gradcam", "gradcam++"), default="gradcam",
                   help="gradcam: each feature map weighed by its mean gradient; gradcam++: by its positive gradients, "
                        "position by position (better for several objects of the class) (%(default)s)")
    p.add_argument("--layer", metavar="NAME", help="the module whose feature maps are weighed, as `imgclf inspect` "
                                                   "names it (default: the last with a spatial output)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for NAME.cam.png and grid.png")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def cmd_cam(args: argparse.Namespace) -> int:
    from imgclf.cam import cam_output, cam_pictures

    result = cam_pictures(args.checkpoint, args.images, args.out, class_name=args.class_name, method=args.method,
                          layer=args.layer, device=args.device)
    _say(*cam_output(result))
    return EXIT_PARTIAL if result.failed else EXIT_OK


def _add_lr_find(sub, common) -> None:
    p = _command(sub, common, "lr-find", cmd_lr_find, help="learning-rate range test, plotted (notes 23, 26)",
                 description="Sweep the learning rate exponentially over a few training steps, plot the loss "
                             "against it and suggest a learning rate for `imgclf train --lr`. The training "
                             "flags mean what they mean to `imgclf train`.")
    p.add_argument("--recipe", choices=recipe_choices(), default=AUTO_RECIPE, help="as `imgclf train --recipe`")
    _number(p, "--start-lr", float, 0, low_open=True, default=1e-7, help="first learning rate (%(default)g)")
    _number(p, "--end-lr", float, 0, low_open=True, default=10.0, help="last learning rate (%(default)g)")
    _number(p, "--steps", int, 10, default=100, help="training steps of the sweep (%(default)s)")
    p.add_argument("--out", dest="plot", default="lr_find.png", help="PNG to write (%(default)s)")
    add_config_flags(p, skip=("--out", "--lr", "--epochs", "--patience", "--monitor", "--stop-after", "--log-every",
                              "--ema", "--ema-decay", "--tta", "--lr-base-batch", "--clip-grad", "--accumulate",
                              "--folds", "--fold", "--val-every"),
                     required=("--data",))


def cmd_lr_find(args: argparse.Namespace) -> int:
    cfg = train_config(args)
    if cfg.data.batch_size == "auto":
        raise UserError("lr-find takes a number for --batch-size (auto is imgclf train's); give the batch of "
                        "the runs to come")
    from imgclf.lrfind import lr_find, lr_find_output

    test, suggested, out = lr_find(cfg, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps,
                                   plot=args.plot)
    out, err = lr_find_output(test, suggested, out, start_lr=args.start_lr, end_lr=args.end_lr)
    _say("", err)  # how far the sweep went, then what it suggests
    _say(out, "")
    return EXIT_OK


def _add_env(sub, common) -> None:
    p = _command(sub, common, "env", cmd_env, help="versions and devices (notes 01, 29-30)",
                 description="Print Python and package versions, the devices PyTorch can use "
                             "(CUDA GPUs with name and memory, MPS, CPU threads) and bf16 support.")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_env(args: argparse.Namespace) -> int:
    from imgclf.envinfo import environment, environment_output

    _say(environment_output(environment(), as_json=args.json), "")
    return EXIT_OK


# ---------------------------------------------------------------- runs

RUN_COLUMNS = ("name", "model", "data", "epochs", "best", "time", "status")  # imgclf.runs.COLUMNS


def _add_runs(sub, common) -> None:
    p = _command(sub, common, "runs", cmd_runs, help="a table of the runs under a folder",
                 description="List the runs under a folder (each folder holding a config.json, at any depth): "
                             "model, data, epochs done/planned, best figure of --monitor, training time and "
                             "status (running, finished, stopped: resumable, crashed).")
    p.add_argument("folder", nargs="?", default="runs", help="where to look (%(default)s)")
    p.add_argument("--sort", choices=RUN_COLUMNS, default="name",
                   help="order of the rows (%(default)s; best: the best figure first; time: the longest first)")
    p.add_argument("--json", action="store_true", help="one JSON object per run")


def cmd_runs(args: argparse.Namespace) -> int:
    from imgclf.runs import list_runs, runs_output

    if not Path(args.folder).is_dir():
        raise UserError(f"no such folder: {args.folder}")
    _say(*runs_output(list_runs(Path(args.folder), sort=args.sort), args.folder, as_json=args.json))
    return EXIT_OK


# ---------------------------------------------------------------- tune

def _add_tune(sub, common) -> None:
    p = _command(sub, common, "tune", cmd_tune, help="hyper-parameter search with Optuna (pip install 'imgclf[tune]')",
                 description="Search over any options of `imgclf train` with Optuna: ranges and choices from "
                             "--space, the other options from --recipe, --config and the flags. Each trial trains "
                             "OUT/trial-N; poor trials are pruned after an epoch; the study lives in --storage, "
                             "which several `imgclf tune` processes (on several machines) may share; rerunning "
                             "the command continues the study. At the end: a table of the trials, OUT/best.yaml "
                             "for `imgclf train --config`, OUT/history.png and OUT/importances.png.")
    p.add_argument("--space", required=True, metavar="FILE.yaml",
                   help="the search space: option: {low: X, high: Y[, log: true][, step: S]} or option: [a, b] "
                        "(docs/usage.md: Hyper-parameter search with Optuna)")
    p.add_argument("--recipe", choices=recipe_choices(), default=AUTO_RECIPE, help="as `imgclf train --recipe`")
    _add_config_file(p)
    p.add_argument("--out", dest="tune_out", default="runs/tune", metavar="FOLDER",
                   help="folder of the trials' runs, best.yaml and the plots (%(default)s)")
    _number(p, "--trials", int, 1, default=20, metavar="N",
            help="the study's budget: trials complete, pruned or failed, over every process (%(default)s)")
    _number(p, "--timeout", float, 0, low_open=True, metavar="SECONDS",
            help="start no trial after this many seconds of this process (default: no limit)")
    p.add_argument("--storage", default="sqlite:///tune.db", metavar="URL",
                   help="the study's database, any SQLAlchemy URL: sqlite:///FILE, postgresql://..., mysql://... "
                        "(%(default)s)")
    p.add_argument("--study", metavar="NAME", help="the study's name in --storage (default: --out's folder name)")
    p.add_argument("--pruner", choices=("median", "none"), default="median",
                   help="median: end a trial whose epoch figure is below the median of earlier trials' at that "
                        "epoch (%(default)s)")
    _number(p, "--startup-trials", int, 0, default=5, metavar="N",
            help="trials that finish before the pruner prunes anything (%(default)s)")
    _number(p, "--heartbeat", int, 1, 3600, default=60, metavar="SECONDS",
            help="a running trial's heartbeat; one silent for twice this is marked failed (%(default)s)")
    _number(p, "--nproc-per-node", int, 1, 1024, default=1, metavar="N",
            help="each trial a torchrun job of N processes on this machine, e.g. one per GPU (%(default)s)")
    add_config_flags(p, skip=("--out", "--stop-after", "--folds", "--fold"))  # a trial is one run


def cmd_tune(args: argparse.Namespace) -> int:
    from imgclf.tune import Search, read_space, run_search, tune_output

    given = user_values(args.config, flag_values(args))
    resolve(given, recipe=args.recipe)  # the flags and --config checked first, each in one line
    space, fixed = read_space(args.space)
    out = Path(args.tune_out)
    search = Search(given=given, recipe=args.recipe, space=space,
                    fixed=fixed, out=out, storage=args.storage, study=args.study or out.resolve().name,
                    trials=args.trials, timeout=args.timeout, pruner=args.pruner,
                    startup_trials=args.startup_trials, heartbeat=args.heartbeat, nproc=args.nproc_per_node)
    try:
        summary = run_search(search)
    except Stopped as stop:
        print(f"imgclf: tune {stop}; rerun the same command to continue the study", file=sys.stderr)
        return stop.code
    _say(*tune_output(summary, search.study))
    return EXIT_OK


# ---------------------------------------------------------------- embed, similar, duplicates, review

DATA_READ = ("data_root", "labels", "val_fraction", "eval_batch_size", "cache_dir")  # as eval reads a data set


def _add_embedding_input(p: argparse.ArgumentParser, *, data_help: str) -> None:
    """The checkpoint, DATA and the data and device flags embed, similar, duplicates and review share."""
    p.add_argument("checkpoint", help="an imgclf checkpoint (.pt) or a run folder; exported models have no head to read")
    _add_model_code(p)
    p.add_argument("data", metavar="DATA", help=data_help)
    _add_data_read(p)


def _add_data_read(p: argparse.ArgumentParser) -> None:
    """DATA_READ's flags; those that decide the held-out split default to the run's (embed.data_config)."""
    add_data_flags(p, DATA_READ, flags={"eval_batch_size": "--batch-size"}, helps={
        "labels": "as `imgclf train --labels` (default: the run's, when DATA is the run's data)",
        "val_fraction": "held-out share of a single folder of classes (default: the run's, when DATA is the "
                        "run's data, else 0.2)",
        "data_root": "where built-in data sets are found (default: the run's)"})
    p.set_defaults(labels=None, val_fraction=None, data_root=None)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def _data_config(args: argparse.Namespace, net) -> DataConfig:
    from imgclf.embed import data_config

    return data_config(net, args.data, data_root=args.data_root, val_fraction=args.val_fraction,
                       eval_batch_size=args.batch_size, cache_dir=args.cache_dir, labels=args.labels)


def _add_embed(sub, common) -> None:
    p = _command(sub, common, "embed", cmd_embed, help="write every picture's embedding (.npy + .csv)",
                 description="Write the vector each picture of a data set gives at the input of the network's "
                             "classifier head (its penultimate layer) as FILE.npy, and FILE.csv naming each row's "
                             "picture, split and label (docs/usage.md: Embeddings, duplicates and label review).")
    _add_embedding_input(p, data_help="data set or folder (as `train --data`): every split is embedded")
    p.add_argument("--out", required=True, metavar="FILE", help="writes FILE.npy and FILE.csv")


def cmd_embed(args: argparse.Namespace) -> int:
    from imgclf.embed import embed_data, embed_output, open_network, write_embeddings

    net = open_network(args.checkpoint, device=args.device)
    emb = embed_data(net, _data_config(args, net))
    _say(*embed_output(emb, write_embeddings(emb, args.out)))
    return EXIT_OK


def _add_similar(sub, common) -> None:
    p = _command(sub, common, "similar", cmd_similar, help="the pictures of a data set nearest to a picture",
                 description="Print the pictures of a data set whose embeddings are nearest (cosine) to a "
                             "query picture's.")
    p.add_argument("checkpoint", help="an imgclf checkpoint (.pt) or a run folder")
    p.add_argument("query", metavar="QUERY", help="the picture to look for (a file, an http(s) URL, - for stdin)")
    _add_model_code(p)
    p.add_argument("data", metavar="DATA", help="data set or folder to search (every split)")
    _add_data_read(p)
    _number(p, "-k", int, 1, 10_000, default=5, dest="k", help="how many pictures (%(default)s)")


def cmd_similar(args: argparse.Namespace) -> int:
    from imgclf.embed import open_network, similar, similar_output

    net = open_network(args.checkpoint, device=args.device)
    _say(*similar_output(*similar(net, args.query, _data_config(args, net), k=args.k)))
    return EXIT_OK


def _add_duplicates(sub, common) -> None:
    p = _command(sub, common, "duplicates", cmd_duplicates, help="exact and near duplicates, and split leaks",
                 description="Find pairs of pictures that are the same file (exact) or nearly the same picture "
                             "(near: cosine of their embeddings at least --threshold), within the training split "
                             "and across splits (leaks); print a table, write OUT/duplicates.csv and "
                             "OUT/duplicates.png (pairs side by side, worst first).")
    _add_embedding_input(p, data_help="data set or folder (as `train --data`)")
    _number(p, "--threshold", float, -1, 1, default=0.95,
            help="cosine similarity from which two pictures count as near duplicates (%(default)s)")
    p.add_argument("--out", default="duplicates", metavar="DIR", help="folder for the CSV and PNG (%(default)s)")


def cmd_duplicates(args: argparse.Namespace) -> int:
    from imgclf.duplicates import duplicates, duplicates_output, write_report
    from imgclf.embed import embed_data, open_network

    net = open_network(args.checkpoint, device=args.device)
    emb = embed_data(net, _data_config(args, net))
    pairs = duplicates(emb, threshold=args.threshold)
    _say(*duplicates_output(emb, pairs, write_report(emb, pairs, args.out), threshold=args.threshold))
    return EXIT_OK


def _add_review(sub, common) -> None:
    p = _command(sub, common, "review", cmd_review, help="likely mislabelled pictures (confident learning)",
                 description="Rank the pictures by how likely their label is wrong (confident learning, "
                             "Northcutt et al. 2021) from out-of-sample probabilities: with --folds K, K models "
                             "trained as the run was on the other folds score every training picture; "
                             "without, the run's checkpoint scores its held-out split (out of sample) and its "
                             "training split (in sample: it saw them). Writes OUT/mislabels.csv and "
                             "OUT/mislabels.png, worst first "
                             "(docs/usage.md: Embeddings, duplicates and label review).")
    p.add_argument("checkpoint", metavar="CKPT|RUN", help="a checkpoint or a run folder (its best.pt)")
    _add_model_code(p)
    p.add_argument("data", metavar="DATA", help="data set or folder the run was trained on")
    _add_data_read(p)
    _number(p, "--folds", int, 2, 20, metavar="K", help="cross-fit: train K models on K-1 folds each (default: the checkpoint's "
                                           "own probabilities)")
    _number(p, "--epochs", int, 1, 10_000, metavar="N", help="--folds: epochs of each fold's model (default: the run's)")
    p.add_argument("--out", default="review", metavar="DIR",
                   help="folder for the CSV, the PNG and --folds' runs (%(default)s)")


def cmd_review(args: argparse.Namespace) -> int:
    from imgclf.api import load
    from imgclf.embed import open_network
    from imgclf.review import review_checkpoint, review_folds, review_output, write_review

    run = load(args.checkpoint, model_code=args.model_code, trust_changed_code=args.trust_changed_code)
    net = open_network(run.best, device=args.device)
    if args.folds:
        try:
            review = review_folds(net, run.config, _data_config(args, net), folds=args.folds,
                                  work=Path(args.out) / "folds", epochs=args.epochs)
        except Stopped as stop:  # a fold's training interrupted: its run folder says how far it got
            print(f"imgclf: review {shown(str(stop))}", file=sys.stderr)
            return stop.code
    else:
        review = review_checkpoint(net, _data_config(args, net))
    _say(*review_output(review, write_review(review, args.out)))
    return EXIT_OK
