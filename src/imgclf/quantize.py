"""int8 post-training quantization of an exported graph (`imgclf export --int8`), calibrated on training
pictures of the checkpoint's data set and checked against the float graph on its held-out split.

Both formats are quantized by NNCF's post-training quantization (its default preset: int8 weights per output
channel, int8 activations, fast bias correction): for ONNX its ONNX backend writes a QDQ graph (static
quantization that ONNX Runtime and OpenVINO run as int8), for OpenVINO its OpenVINO backend quantizes the IR;
each format's quantizer is its `quantize` in the table imgclf.formats.FORMATS. This module chooses the
pictures and measures the result.
Both calibrate on the same pictures: up to `CALIBRATION_SIZE` training pictures drawn with a fixed seed,
decoded exactly as predict decodes them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from imgclf.errors import UserError

CALIBRATION_SIZE = 300  # training pictures; ONNX Runtime's and NNCF's guidance is a few hundred
SEED = 0
WARN_POINTS = 1.0  # an int8 model losing more accuracy than this against its float graph gets a warning


@dataclass(frozen=True)
class Int8Data:
    """What quantization needs: calibration pictures, and the held-out split the result is checked on."""

    calibration: np.ndarray  # uint8 (n, C, S, S)
    calibration_from: str  # "300 training pictures of DATA"
    held_out: object  # sources.Split
    held_out_name: str  # "the val split of DATA"
    task: object  # tasks.Task of the checkpoint (a multi-label one with its thresholds)
    batch: int


@dataclass(frozen=True)
class Int8Check:
    """The float graph and its int8 version on the same held-out pictures, in the runtime predict uses. The
    figure compared is the task's headline: accuracy for a single-label model, mAP for a multi-label one;
    `agreement` is the share of pictures given the same answer (the same top-1; the same set of labels at
    the stored thresholds)."""

    where: str
    count: int
    float_acc: float
    int8_acc: float
    agreement: float
    runtime: str
    calibration_from: str
    figure: str = "accuracy"  # or "mAP"

    @property
    def drop_points(self) -> float:
        return 100 * (self.float_acc - self.int8_acc)

    def as_dict(self) -> dict:
        same = "same_top1" if self.figure == "accuracy" else "same_labels"
        return {"held_out": self.where, "pictures": self.count, f"float_{self.figure.lower()}": self.float_acc,
                f"int8_{self.figure.lower()}": self.int8_acc, same: self.agreement, "runtime": self.runtime,
                "calibration": self.calibration_from}

    def describe(self) -> str:
        same = "top-1" if self.figure == "accuracy" else "labels"
        line = (f"int8 {self.figure} {self.int8_acc:.2%} against float {self.float_acc:.2%} "
                f"({-self.drop_points:+.2f} points; same {same} on {self.agreement:.1%}) on {self.count} pictures "
                f"of {self.where}, run by {self.runtime}; calibrated on {self.calibration_from}")
        if self.drop_points > WARN_POINTS:
            line += (f"\nwarning: the int8 model loses {self.drop_points:.2f} points of {self.figure}; check it on "
                     f"your own pictures, calibrate on more (--calibration-size) or ship the float model")
        return line


def int8_data(ckpt: dict, calibration_data: str | None, eval_data: str | None,
              size: int = CALIBRATION_SIZE) -> Int8Data:
    """Calibration pictures from `calibration_data` (a data set or folder; default: the one recorded in the
    checkpoint), and the held-out split of `eval_data` (default: the checkpoint's data set, else
    `calibration_data`). UserError in one line when neither is given nor the recorded one reachable."""
    from imgclf.evaluate import _choose, preview
    from imgclf.pipeline import eval_batch_size
    from imgclf.tasks import checkpoint_task

    recorded = _recorded_config(ckpt)
    reachable = recorded is not None and _reachable(recorded)
    if calibration_data is None and not reachable:
        where = f"its data set {recorded.data!r} is not reachable here" if recorded else "it records no data set"
        raise UserError(f"--int8 calibrates on training pictures of the checkpoint's data set, but {where}: "
                        f"give --calibration-data FOLDER (a few hundred pictures like the ones the model will see)")
    calib_cfg = _config(calibration_data) if calibration_data is not None else recorded
    eval_cfg = _config(eval_data) if eval_data is not None else (recorded if reachable else calib_cfg)
    calib = _load(calib_cfg, ckpt)
    held = calib if eval_cfg == calib_cfg else _load(eval_cfg, ckpt)
    if held.classes != ckpt["classes"]:
        raise UserError(f"the checkpoint was trained for {len(ckpt['classes'])} classes ({preview(ckpt['classes'])}), "
                        f"but {eval_cfg.data} has {len(held.classes)} ({preview(held.classes)}): give --eval-data "
                        f"a data set of the checkpoint's classes")
    name, split = _choose(held, None, eval_cfg.data)
    train = calib.train
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(SEED))[:size].sort().values
    pictures = np.ascontiguousarray(np.asarray(train.images[pick.numpy()]))
    return Int8Data(pictures, f"{len(pictures)} training pictures of {calib_cfg.data}", split,
                    f"the {name} split of {eval_cfg.data}", checkpoint_task(ckpt), eval_batch_size(eval_cfg, split))


def _recorded_config(ckpt: dict):
    from imgclf.config import DataConfig

    recorded = (ckpt.get("config") or {}).get("data")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("data"), str):
        return None
    names = {f.name for f in dataclasses.fields(DataConfig)}
    try:
        return DataConfig(**{k: v for k, v in recorded.items() if k in names})
    except (TypeError, UserError):
        return None


def _reachable(cfg) -> bool:
    """Whether the data set can be read here without a download (one packaged inside imgclf always; another
    built-in one must be in its data root)."""
    from imgclf.sources import BUILTINS, PACKAGED

    if cfg.data in PACKAGED:
        return True
    if cfg.data in BUILTINS:
        return Path(cfg.data_root).expanduser().is_dir()
    return Path(cfg.data).expanduser().is_dir()


def _config(where: str):
    from imgclf.config import DataConfig

    return DataConfig(data=str(where))


def _load(cfg, ckpt: dict):
    """The data set at the checkpoint's size and channels, every split decoded as predict decodes pictures."""
    from imgclf.sources import load_data
    from imgclf.transforms import input_decoding

    inp = ckpt["input"]
    return load_data(replace(cfg, img_size=inp["size"], augment="none"), img_size=inp["size"],
                     channels=inp["channels"], decoding=input_decoding(inp), crop_train=True)


def compare(float_run, int8_run, data: Int8Data, runtime: str) -> Int8Check:
    """The task's headline figure (accuracy, or a multi-label model's mAP) of the float and the int8 graph
    (numpy uint8 -> probabilities callables) on the held-out split."""
    from imgclf.evaluate import score
    from imgclf.tasks import MULTILABEL

    task = data.task
    results = [score(lambda x, run=run: torch.from_numpy(run(x.numpy())), data.held_out, len(task.classes),
                     data.batch, task=task) for run in (float_run, int8_run)]
    if task.name == MULTILABEL:
        key, figure = "map", "mAP"
        chosen = [r["probs"].double() >= torch.tensor(r["thresholds"], dtype=torch.float64) for r in results]
        same = chosen[0].eq(chosen[1]).all(1)
    else:
        key, figure = "acc", "accuracy"
        same = results[0]["predicted"] == results[1]["predicted"]
    agreement = float(same.float().mean()) if results[0]["count"] else 1.0
    return Int8Check(data.held_out_name, results[0]["count"], results[0][key], results[1][key], agreement, runtime,
                     data.calibration_from, figure)
