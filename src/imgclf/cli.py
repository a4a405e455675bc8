"""The command line: the only reader of argv. Each subcommand turns flags into config and calls a builder."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

from imgclf import __version__
from imgclf.config import AUGMENTS, OPTIMIZERS, PRECISIONS, RECIPES, SCHEDULES, DataConfig, TrainConfig
from imgclf.errors import EXIT_OK, EXIT_PARTIAL, EXIT_SIGINT, EXIT_USAGE, UserError

# Modules that add subcommands of their own: each has `register(subparsers)` setting `func`.
EXTENSIONS: tuple[str, ...] = ("imgclf.inspect", "imgclf.export", "imgclf.serve", "imgclf.visualize", "imgclf.lrfind",
                                 "imgclf.envinfo")

# flag -> (config section, field); flags default to None so that only what the user typed overrides.
TRAIN_FLAGS = {
    "data": ("data", "data"), "data_root": ("data", "data_root"), "img_size": ("data", "img_size"),
    "val_fraction": ("data", "val_fraction"), "augment": ("data", "augment"), "crop_pad": ("data", "crop_pad"),
    "batch_size": ("data", "batch_size"),
    "eval_batch_size": ("data", "eval_batch_size"), "strict_data": ("data", "strict"),
    "cache_dir": ("data", "cache_dir"),
    "model": ("model", "name"), "pretrained": ("model", "pretrained"), "freeze_backbone": ("model", "freeze_backbone"),
    "optimizer": ("optim", "optimizer"), "lr": ("optim", "lr"), "momentum": ("optim", "momentum"),
    "nesterov": ("optim", "nesterov"), "weight_decay": ("optim", "weight_decay"), "schedule": ("optim", "schedule"),
    "warmup_epochs": ("optim", "warmup_epochs"), "label_smoothing": ("optim", "label_smoothing"),
    "epochs": ("optim", "epochs"), "lookahead": ("optim", "lookahead"),
    "out": ("run", "out"), "device": ("run", "device"), "seed": ("run", "seed"), "precision": ("run", "precision"),
    "channels_last": ("run", "channels_last"), "compile": ("run", "compile"), "log_every": ("run", "log_every"),
    "stop_after": ("run", "stop_after"), "ema": ("run", "ema"), "tta": ("run", "tta"),
}
# What may change when resuming; anything else that differs from the checkpoint's config is refused.
RESUMABLE = {"epochs", "device", "stop_after", "log_every", "eval_batch_size", "cache_dir", "data", "data_root",
             "compile"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_OK
    try:
        return args.func(args) or EXIT_OK
    except UserError as err:
        if args.debug:
            raise
        print(f"imgclf: error: {err}", file=sys.stderr)
        return err.code
    except OSError as err:  # a folder that cannot be written, a full disk: the system's own one line
        if args.debug:
            raise
        print(f"imgclf: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("imgclf: interrupted", file=sys.stderr)
        return EXIT_SIGINT


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
    _add_train(sub, common)
    _add_eval(sub, common)
    _add_predict(sub, common)
    p = sub.add_parser("samples", parents=[common], help="save test pictures of a data set as PNG files")
    p.add_argument("data", help="a built-in data set or a folder")
    p.add_argument("--data-root", default="data")
    p.add_argument("--per-class", type=int, default=1, help="pictures per class (1)")
    p.add_argument("--out", default="imgs", help="folder to write into (imgs)")
    p.set_defaults(func=cmd_samples)
    p = sub.add_parser("models", parents=[common], help="list the model names --model takes")
    p.set_defaults(func=cmd_models)
    for name in EXTENSIONS:
        importlib.import_module(name).register(sub, common)
    parser.set_defaults(debug=False)
    return parser


def _add_train(sub, common) -> None:
    p = sub.add_parser("train", parents=[common], help="train a model (notes 26-30)",
                       description="Train a model; defaults come from --recipe, any flag given overrides them.")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="default",
                   help="default: a recipe that trains well; notes: exactly the notes' SGD 0.01, batch 64, no augmentation")
    p.add_argument("--resume", metavar="RUN", help="continue RUN/checkpoints/last.pt exactly where it stopped")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="cifar10, cifar100, mnist, fashion-mnist, or a folder (see README)")
    g.add_argument("--data-root", help="where built-in data sets are downloaded and found (default ./data)")
    g.add_argument("--img-size", type=int, help="side of the square input (default: native; photos 224)")
    g.add_argument("--val-fraction", type=float, help="held-out share of a single folder of classes (0.2)")
    g.add_argument("--augment", choices=AUGMENTS, help="training augmentation (flip-crop)")
    g.add_argument("--crop-pad", type=int, help="largest shift of flip-crop, in pixels (an eighth of the side)")
    g.add_argument("--batch-size", type=int, help="global batch size, split across processes (128)")
    g.add_argument("--eval-batch-size", type=int, help="batch size for evaluation (1024)")
    g.add_argument("--strict-data", action="store_true", default=None, help="fail before training on any bad file")
    g.add_argument("--cache-dir", help="where decoded folders are cached (~/.cache/imgclf)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="tutorial_cnn, fastnet, or any torchvision classifier (`imgclf models`)")
    g.add_argument("--pretrained", metavar="FILE|NAME", help="backbone weights: a local file, or e.g. IMAGENET1K_V1")
    g.add_argument("--freeze-backbone", action="store_true", default=None, help="train only the new last layer")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=OPTIMIZERS)
    g.add_argument("--lr", type=float, help="peak learning rate (0.05)")
    g.add_argument("--momentum", type=float, help="SGD momentum (0.9)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov momentum (on)")
    g.add_argument("--weight-decay", type=float, help="on weights, not biases or norms (5e-4)")
    g.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule after warm-up (onecycle)")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up length (1)")
    g.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing (0.1)")
    g.add_argument("--epochs", type=int, help="epochs in all (10)")
    g.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=None,
                   help="every 5 steps, average the weights and continue from the average (fast recipe: on)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run folder (runs/run)")
    g.add_argument("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    g.add_argument("--seed", type=int, help="seed of initialisation, order and augmentation (0)")
    g.add_argument("--precision", choices=PRECISIONS, help="autocast precision (auto: bf16 where supported, else fp32)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (on)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--log-every", type=int, help="TensorBoard train-loss interval in steps (50)")
    g.add_argument("--stop-after", type=int, help="stop resumably after this many epochs of this invocation")
    g.add_argument("--ema", action="store_true", default=None, help="evaluate and keep an average of the weights")
    g.add_argument("--tta", action="store_true", default=None,
                   help="the last epoch's evaluation averages flipped and 1-pixel-shifted views (6 passes)")
    p.set_defaults(func=cmd_train)


def train_config(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """Flags -> TrainConfig: `base` (a resumed run's) or the recipe's defaults, then every flag given."""
    given = {flag: getattr(args, flag) for flag in TRAIN_FLAGS if getattr(args, flag, None) is not None}
    if base is None:
        sections = {name: dict(values) for name, values in RECIPES[args.recipe].items()}
    else:
        sections = base.to_dict()
        refused = [f for f in given if f not in RESUMABLE and _value(base, f) != given[f]]
        if refused:
            flag = refused[0]
            raise UserError(f"--{flag.replace('_', '-')} {given[flag]} contradicts the run being resumed "
                            f"(it used {_value(base, flag)}); drop the flag, or start a new run with --out")
    for flag, value in given.items():
        section, name = TRAIN_FLAGS[flag]
        sections.setdefault(section, {})[name] = value
    return TrainConfig.from_dict(sections)


def _value(cfg: TrainConfig, flag: str):
    section, name = TRAIN_FLAGS[flag]
    return getattr(getattr(cfg, section), name)


def cmd_train(args: argparse.Namespace) -> int:
    from imgclf.checkpoint import load_checkpoint
    from imgclf.errors import Stopped
    from imgclf.train import train

    if args.resume:
        last = Path(args.resume) / "checkpoints" / "last.pt"
        if not last.is_file():
            raise UserError(f"nothing to resume: {last} does not exist")
        base = TrainConfig.from_dict(load_checkpoint(last)["config"])
        # --stop-after counts the epochs of one invocation: the resumed one runs to the end unless told again
        run = dataclasses.replace(base.run, out=str(args.resume), stop_after=None)
        cfg = train_config(args, dataclasses.replace(base, run=run))
    else:
        cfg = train_config(args)
        if (Path(cfg.run.out) / "checkpoints" / "last.pt").exists():
            raise UserError(f"{cfg.run.out} already holds a run; resume it with --resume {cfg.run.out}, "
                            f"or choose another --out")
    try:
        record = train(cfg, resume=bool(args.resume))
    except Stopped as stop:
        print(f"imgclf: {stop}", file=sys.stderr)
        return stop.code
    if record and os.environ.get("RANK", "0") == "0":  # under torchrun, once for the job
        print(f"done: test accuracy {record['test_acc']:.2%} after {record['epoch']} epochs; "
              f"checkpoints in {Path(cfg.run.out) / 'checkpoints'}", file=sys.stderr)
    return EXIT_OK


def _add_eval(sub, common) -> None:
    p = sub.add_parser("eval", parents=[common], help="loss, accuracy, per-class accuracy, confusion matrix")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="data set or folder; its test/ or val/ split is evaluated")
    p.add_argument("--data-root", default="data")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--cache-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from imgclf.evaluate import evaluate_checkpoint
    from imgclf.metrics import per_class_accuracy

    cfg = DataConfig(data=args.data, data_root=args.data_root, val_fraction=args.val_fraction,
                     eval_batch_size=args.batch_size, cache_dir=args.cache_dir)
    r = evaluate_checkpoint(args.checkpoint, cfg, device=args.device)
    classes, confusion = r["classes"], r["confusion"]
    per_class = per_class_accuracy(confusion)
    if args.json:
        print(json.dumps({"split": r["split"], "count": r["count"], "loss": r["loss"], "accuracy": r["acc"],
                          "classes": classes, "per_class_accuracy": dict(zip(classes, per_class, strict=True)),
                          "confusion": confusion.tolist()}))
        return EXIT_OK
    print(f"{r['split']}: {r['count']} pictures  loss {r['loss']:.4f}  accuracy {r['acc']:.2%}\n")
    width = max(8, *(len(c) for c in classes))
    print(f"{'class':<{width}}  {'accuracy':>8}  {'count':>6}")
    for name, acc, row in zip(classes, per_class, confusion.tolist(), strict=True):
        print(f"{name:<{width}}  {acc:>8.2%}  {sum(row):>6}")
    print("\nconfusion matrix (rows: true class, columns: predicted)")
    cell = max(5, len(str(int(confusion.max()))) + 1)
    labels = [f"{i} {name}" for i, name in enumerate(classes)]
    label_width = max(len(label) for label in labels)
    print(" " * label_width + "".join(f"{i:>{cell}}" for i in range(len(classes))))
    for label, row in zip(labels, confusion.tolist(), strict=True):
        print(f"{label:<{label_width}}" + "".join(f"{v:>{cell}}" for v in row))
    return EXIT_OK


def _add_predict(sub, common) -> None:
    p = sub.add_parser("predict", parents=[common], help="label pictures with a trained model (note 31)")
    p.add_argument("checkpoint")
    p.add_argument("paths", nargs="+", metavar="PATH", help="picture files and folders")
    p.add_argument("--topk", type=int, default=3, help="how many labels per picture (3)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (exact probabilities, as exported models give) or auto: bf16 where supported, faster")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per line")
    fmt.add_argument("--csv", action="store_true", help="CSV with a header row")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from imgclf.predict import Predictor

    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, precision=args.precision)
    writer = csv.writer(sys.stdout) if args.csv else None
    if writer:
        writer.writerow(["path", "rank", "label", "probability"])
    failed = False
    for r in predictor.iter_predict(args.paths, topk=args.topk, batch_size=args.batch_size):
        failed = failed or bool(r.error)
        if r.error:
            print(f"imgclf: {r.path}: {r.error}", file=sys.stderr)
        elif args.json:
            print(json.dumps({"path": r.path, "top": [{"label": lab, "probability": round(p, 6)}
                                                      for lab, p in zip(r.labels, r.probs, strict=True)]}))
        elif writer:
            for rank, (lab, p) in enumerate(zip(r.labels, r.probs, strict=True), start=1):
                writer.writerow([r.path, rank, lab, f"{p:.6f}"])
        else:
            tops = "  ".join(f"{lab} {p:.1%}" for lab, p in zip(r.labels, r.probs, strict=True))
            print(f"{r.path}  {tops}")
        sys.stdout.flush()  # each answer as soon as it is known, also into a pipe
    return EXIT_PARTIAL if failed else EXIT_OK


def cmd_samples(args: argparse.Namespace) -> int:
    from imgclf.sources import load_data, write_samples

    data = load_data(DataConfig(data=args.data, data_root=args.data_root))
    written = write_samples(data.test, data.classes, Path(args.out), per_class=args.per_class)
    print(f"wrote {len(written)} {data.test_name} pictures to {args.out}/")
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from imgclf.models import available_models

    print("\n".join(available_models()))
    return EXIT_OK
