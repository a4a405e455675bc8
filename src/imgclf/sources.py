"""Data sources (notes 05, 06, 13): built-in data sets, IDX files and folders of pictures, and their splits.

Every data set, built-in or folder, becomes two `Split`s of uint8 tensors (N, C, H, W) plus integer labels;
folders go through the decode-once cache (`imgclf.cache`).
"""

from __future__ import annotations

import csv
import gzip
import os
import stat
import struct
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgclf.augment import choose
from imgclf.bands import depth_of, detect, probe
from imgclf.cache import Split, cached_split, cached_stats, check_all, default_cache_dir
from imgclf.checkpoint import MAX_CLASSES, MAX_NAME
from imgclf.config import DataConfig
from imgclf.errors import UserError, shown
from imgclf.files import not_regular, special_kind
from imgclf.folds import fold_data, fold_lists, fold_name
from imgclf.labelsets import MULTI, labels_task, random_split, read_multilabel_csv
from imgclf.transforms import IMAGE_EXTENSIONS, NORMALIZATION, PLAIN, Decoding, compute_mean_std, resize_batch

BUILTINS = ("fashion-mnist-mini", "cifar10", "cifar100", "mnist", "fashion-mnist")
PEEKED = 8  # pictures whose headers say whether a folder holds photos (`_are_photos`)
# shipped inside the package (6,000 + 1,000 Fashion-MNIST pictures, MIT): the one data set that needs no download
PACKAGED = {"fashion-mnist-mini": Path(__file__).parent / "datasets" / "fashion-mnist-mini"}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


VAL_NAMES = ("val", "valid", "validation")  # folder names of a validation split, in order of preference


@dataclass
class ImageData:
    """A data set as the pipeline uses it. `val` is evaluated after every epoch and chooses best.pt and early
    stopping; `test`, when the data set has one beside a validation split, is evaluated once at the end and
    never chooses anything. With no validation split of its own, a data set's test split serves as `val`
    (`val_name` then says "test"), as CIFAR-10's does."""

    train: Split
    val: Split
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_name: str = "test"  # what the validation split is called in this data set: test, val, valid, ...
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) of undecodable files
    test: Split | None = None
    photos: bool = False  # the pictures are photos (not small squares such as CIFAR's): the photo recipe suits them
    task: str = "single-label"  # imgclf.tasks' name; multilabel: every split's labels are (N, classes) 0/1 targets
    task_note: str = ""  # why the task was chosen, for the run's first line ("" when single-label by default)

    def splits(self) -> dict[str, Split]:
        """Every split by its role: train, val (named after its folder when that is not "val"), test."""
        out = {"train": self.train, "val": self.val}
        if self.test is not None:
            out["test"] = self.test
        return out

    def describe(self) -> str:
        """'245 train / 153 val pictures' or '... / 100 test (validation) ...', for a run's first line."""
        val = f"{len(self.val)} {self.val_name}" + ("" if self.val_name in VAL_NAMES else " (as validation)")
        test = f" / {len(self.test)} test" if self.test is not None else ""
        task = f", multi-label ({self.task_note})" if self.task == MULTI else ""
        return f"{len(self.train)} train / {val}{test} pictures{task}"

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def depth(self) -> int:
        """Bits a sample of the stored pictures: 8 (uint8), or 16 (uint16: imgclf.bands)."""
        return depth_of(self.train.images)

    @property
    def img_size(self) -> int:
        """The side the model sees (training pictures may be stored larger, for random-resized crops)."""
        return int(self.val.images.shape[2])


def load_data(cfg: DataConfig, *, img_size: int | None = None, channels: int | None = None,
              progress: bool = True, whole: bool = False, classes: list[str] | None = None,
              decoding: Decoding = PLAIN, crop_train: bool = False) -> ImageData:
    """Load the data set `cfg.data` names. `img_size`/`channels` (from a checkpoint) override detection.
    `whole`: a single folder of class folders is not split; all of it is the `val` split (see _load_folder).
    `classes` (a checkpoint's): the classes a multi-label --labels CSV is read against. `decoding`: how the
    held-out splits are resized and cropped (a pretrained network's input contract: transforms.Decoding); the
    training split takes its interpolation alone, or with `crop_train` (evaluating a checkpoint) all of it."""
    size = img_size or cfg.img_size
    channels = channels or cfg.channels
    roles = _role_decodings(decoding, crop_train)
    if cfg.task == MULTI and not cfg.labels:
        raise UserError("multi-label pictures (--task multilabel, or a multi-label model) need --labels FILE.csv "
                        "naming the labels of each picture (filename,labels with the labels separated by spaces, "
                        "or one 0/1 column per class)")
    if cfg.data in BUILTINS:
        return _folded(_load_builtin(cfg, size=size, channels=channels, roles=roles), cfg, whole)
    root = Path(cfg.data).expanduser()
    try:
        mode = root.stat().st_mode
    except FileNotFoundError:
        names = ", ".join(BUILTINS)
        raise UserError(f"--data {cfg.data!r} is neither a built-in data set ({names}) nor an existing folder") from None
    except OSError as err:
        raise UserError(f"cannot read --data {shown(root)}: {_reason(err)}; check its permissions") from None
    if not stat.S_ISDIR(mode):
        kind = special_kind(mode) or "a file"
        raise UserError(f"--data {cfg.data!r} is {kind}; give a folder of class folders or a built-in name")
    _read_folder(root)  # "cannot read ROOT: permission denied" before anything else looks inside
    if _idx_files(root):
        data = _load_idx(root)
        height, width = data.train.images.shape[2:]
        return _folded(_finish(data, size=size or native_side(root, height, width), channels=channels,
                               name=root.name.lower(), roles=roles), cfg, whole)
    return _load_folder(root, cfg, size=size, channels=channels, progress=progress, whole=whole,
                        classes=classes, roles=roles)


def _role_decodings(decoding: Decoding, crop_train: bool) -> dict[str, Decoding]:
    """Each split's decoding (see `load_data`)."""
    return {"train": decoding if crop_train else decoding.for_training(), "val": decoding, "test": decoding}


def _folder_roles(roles: dict | None, channels: int, normalize: str) -> dict[str, Decoding]:
    """`roles` (PLAIN's when None), except for bands beyond RGB under --normalize auto: their own statistics
    normalise them (pipeline.normalization), so no RGB network's input contract applies to them either; they
    are decoded as imgclf's own (PLAIN), which is what their checkpoint records."""
    if roles is None or (channels not in (1, 3) and normalize == "auto"):
        return _role_decodings(PLAIN, False)
    return roles


def _folded(data: ImageData, cfg: DataConfig, whole: bool) -> ImageData:
    """`data` (read whole: built-in, IDX) as fold --fold of --folds says (imgclf.folds), or as it is."""
    return fold_data(data, folds=cfg.folds, fold=cfg.fold) if cfg.folds and cfg.fold and not whole else data


MIN_SIDE = 8  # the smallest --img-size: below it a network's poolings leave nothing


def native_side(root: Path, height: int, width: int) -> int:
    """The side a model sees when --img-size is not given, for pictures of `height` x `width` stored in
    `root`: their side, or the longer one when they are not square (resized and centre-cropped as any picture
    is). UserError when it is under MIN_SIDE: --img-size enlarges them."""
    side = max(height, width)
    if side < MIN_SIDE:
        raise UserError(f"the pictures of {shown(root)} are {height}x{width} pixels, under the smallest side a "
                        f"network takes ({MIN_SIDE}); give --img-size {MIN_SIDE} or more to enlarge them")
    return side


def imbalance_warning(labels: torch.Tensor, classes: list[str]) -> str | None:
    """One line when the smallest class has under a fifth of the largest's pictures, else None."""
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    small, large = min(range(len(counts)), key=counts.__getitem__), max(range(len(counts)), key=counts.__getitem__)
    if counts[small] * 5 >= counts[large]:
        return None
    return (f"warning: class {classes[small]} has {counts[small]} training pictures, under a fifth of "
            f"{classes[large]}'s {counts[large]}; consider --balance sampler or --balance loss")


# ---------------------------------------------------------------- built-in data sets (torchvision)

def _load_builtin(cfg: DataConfig, *, size: int | None, channels: int | None, roles: dict | None = None) -> ImageData:
    if channels not in (None, 1, 3):
        raise UserError(f"{cfg.data} has grey pictures that imgclf gives 1 or 3 channels, not {channels}")
    if cfg.data in PACKAGED:
        return _finish(_load_idx(PACKAGED[cfg.data]), size=size, channels=channels, name=cfg.data, roles=roles)
    if cfg.data == "fashion-mnist" and _idx_files(DEBIAN_FASHION_MNIST):
        return _finish(_load_idx(DEBIAN_FASHION_MNIST), size=size, channels=channels, name="fashion-mnist",
                       roles=roles)
    from torchvision import datasets

    klass = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "mnist": datasets.MNIST,
             "fashion-mnist": datasets.FashionMNIST}[cfg.data]
    root = Path(cfg.data_root).expanduser()
    splits = []
    for train in (True, False):
        try:
            ds = klass(str(root), train=train, download=False)
        except RuntimeError:  # not there yet: download, which needs a network
            try:
                ds = klass(str(root), train=train, download=True)
            except Exception as err:  # noqa: BLE001 - any failure of the download is reported the same way
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise UserError(
                    f"could not download {cfg.data} into {root} ({reason}); copy its files there, or point "
                    f"--data at a local folder (train/<class>/ and test/<class>/ pictures, or IDX .gz files)") from None
        images = torch.as_tensor(np.asarray(ds.data))
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # -> N, C, H, W
        splits.append(Split(images.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)))
    data = ImageData(splits[0], splits[1], list(ds.classes), *NORMALIZATION[cfg.data], "test")
    return _finish(data, size=size, channels=channels, name=cfg.data, roles=roles)


def _finish(data: ImageData, *, size: int | None, channels: int | None, name: str,
            roles: dict | None = None) -> ImageData:
    """Resize / convert channels when a model asks for other than the native, and fill in statistics.
    `roles`: each split's Decoding (`_role_decodings`; none: PLAIN), which resizes even at the native side."""
    roles = roles or {}
    for role, split in data.splits().items():
        if channels is not None and split.images.shape[1] != channels:
            split.images = _convert_channels(torch.as_tensor(split.images), channels)
        decoding = roles.get(role, PLAIN)
        if size is not None or decoding != PLAIN:
            side = size or int(split.images.shape[2])
            split.images = resize_batch(torch.as_tensor(split.images), side, decoding)
    if len(data.mean) != data.channels:  # IDX folders, or channels converted for the model
        key = "fashion-mnist" if "fashion" in name else name
        known = NORMALIZATION.get(key)
        if known and len(known[0]) == data.channels:
            data.mean, data.std = known
        else:
            data.mean, data.std = compute_mean_std(data.train.images)
    return data


def _convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- IDX files (MNIST, Fashion-MNIST)

def _idx_files(root: Path) -> dict[str, Path] | None:
    """The four standard IDX files in `root` (gzipped or not), or None."""
    found = {}
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            stem = f"{split}-{kind}-ubyte"
            path = next((p for p in (root / f"{stem}.gz", root / stem) if p.is_file()), None)
            if path is None:
                return None
            found[f"{split}-{kind}"] = path
    return found


MAX_IDX_BYTES = 1 << 33  # 8 GiB: an IDX header announcing more is damaged (or a decompression bomb)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (the MNIST format: magic, dims, big-endian sizes, then unsigned bytes). Only the
    bytes the header announces are read (a gzip bomb is not unpacked whole); UserError names the file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
            if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 4:
                raise ValueError("not an unsigned-byte IDX file (its first bytes are not an IDX header)")
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            expected = int(np.prod(dims, dtype=np.float64))
            if expected > MAX_IDX_BYTES:
                raise ValueError(f"its header announces {'x'.join(map(str, dims))} bytes, more than any data set")
            if opener is open and os.fstat(f.fileno()).st_size != 4 + 4 * ndim + expected:  # before reading it
                raise ValueError(f"it is {os.fstat(f.fileno()).st_size:,} bytes long where its header announces "
                                 f"{'x'.join(map(str, dims))} = {expected:,} bytes of data (truncated or damaged)")
            raw = f.read(expected + 1)
        if len(raw) != expected:
            raise ValueError(f"it holds {len(raw):,}{'+' if len(raw) > expected else ''} bytes of data where its "
                             f"header announces {'x'.join(map(str, dims))} = {expected:,} (truncated or damaged)")
        return np.frombuffer(raw, dtype=np.uint8).reshape(dims)
    except (OSError, EOFError, ValueError, struct.error, zlib.error) as err:
        raise UserError(f"cannot read IDX file {shown(path)}: {err}") from None


def _load_idx(root: Path) -> ImageData:
    files = _idx_files(root)
    assert files is not None
    splits = []
    for split in ("train", "t10k"):
        image_file, label_file = files[f"{split}-images-idx3"], files[f"{split}-labels-idx1"]
        raw_images, raw_labels = read_idx(image_file), read_idx(label_file)
        if raw_images.ndim != 3 or 0 in raw_images.shape:
            raise UserError(f"IDX file {image_file} holds an array of shape {raw_images.shape}, not pictures "
                            f"(count, height, width); replace it with the data set's own file")
        if raw_labels.ndim != 1:
            raise UserError(f"IDX file {label_file} holds an array of shape {raw_labels.shape}, not one label "
                            f"per picture; replace it with the data set's own file")
        if raw_images.shape[0] != raw_labels.shape[0]:
            raise UserError(f"{root}: {split} has {raw_images.shape[0]} images ({image_file.name}) but "
                            f"{raw_labels.shape[0]} labels ({label_file.name})")
        splits.append(Split(torch.from_numpy(raw_images.copy()).unsqueeze(1),
                            torch.from_numpy(raw_labels.astype(np.int64))))
    if splits[0].images.shape[2:] != splits[1].images.shape[2:]:
        raise UserError(f"{root}: the train pictures are {tuple(splits[0].images.shape[2:])} pixels but the "
                        f"t10k ones {tuple(splits[1].images.shape[2:])}; both IDX image files must match")
    n_classes = _idx_classes(splits, files)
    fashion = "fashion" in str(root).lower() and n_classes == 10
    classes = FASHION_CLASSES if fashion else [str(i) for i in range(n_classes)]
    return ImageData(splits[0], splits[1], classes, (), (), "test")


def _idx_classes(splits: list[Split], files: dict[str, Path]) -> int:
    """The number of classes of IDX labels, which must be 0..N-1 with N >= 2 and no value unused: a stray
    255 would otherwise make 256 classes, most of them empty. UserError naming the file and the values."""
    present = sorted(set(splits[0].labels.unique().tolist()) | set(splits[1].labels.unique().tolist()))
    if len(present) < 2:
        raise UserError(f"IDX file {files['train-labels-idx1']} has a single class ({present[0]}); a classifier "
                        f"needs at least two")
    gap = next((i for i, v in enumerate(present) if v != i), None)
    if gap is None:
        return len(present)
    odd = present[gap:]
    where = next(files[f"{s}-labels-idx1"] for s, split in zip(("train", "t10k"), splits, strict=True)
                 if bool(torch.isin(split.labels, torch.tensor(odd)).any()))
    shown_odd = ", ".join(map(str, odd[:5])) + (", ..." if len(odd) > 5 else "")
    raise UserError(f"IDX file {where} has label value(s) {shown_odd} beyond a gap: labels must be 0..N-1 with "
                    f"none unused (labels 0..{gap - 1} are, {gap} is not); fix or remove the stray labels")


# ---------------------------------------------------------------- folders of pictures (note 06)

def check_class_names(classes: list[str], where: str) -> None:
    """UserError, at training time, for classes a checkpoint could not hold (see checkpoint.MAX_NAME and
    MAX_CLASSES): a run would train and then have its own checkpoint refused by every other command."""
    if len(classes) > MAX_CLASSES:
        raise UserError(f"{shown(where)} has {len(classes):,} classes, more than the {MAX_CLASSES:,} a checkpoint "
                        f"holds")
    long = next((c for c in classes if len(c) > MAX_NAME), None)
    if long is not None:
        raise UserError(f"{shown(where)} has a class name of {len(long):,} characters ({long[:40]}...), over the "
                        f"{MAX_NAME:,} a checkpoint holds; shorten it")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _reason(err: OSError) -> str:
    """An OSError's reason as a user reads it: "permission denied", "no such file or directory"."""
    return (err.strerror or str(err)).lower()


def _read_folder(folder: Path) -> list[os.DirEntry]:
    """The entries of `folder`, sorted by name; UserError "cannot read FOLDER: permission denied" (not
    "holds no pictures") when it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as err:
        raise UserError(f"cannot read {shown(folder)}: {_reason(err)}; check its permissions") from None


def _subfolders(folder: Path) -> list[Path]:
    """Sub-folders of `folder` (symlinks to folders included), sorted, hidden ones (.git, __MACOSX) left out."""
    return [Path(e.path) for e in _read_folder(folder) if not e.name.startswith((".", "__")) and _is_dir(e)]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def find_classes(folder: Path) -> list[str]:
    """Class names: the sub-folders of `folder`, sorted, hidden ones (.ipynb_checkpoints ...) ignored. A
    name that is not UTF-8 (or holds a newline) is shown escaped (caf\\xe9), so that it can be printed,
    written to JSON and stored in a checkpoint like any other."""
    return [shown(p.name) for p in _subfolders(folder)]


@dataclass
class PictureWalk:
    """Walks folders of pictures, following symbolic links but reading each folder and each file once,
    known by its identity (st_dev, st_ino). A link is not followed when it leads back up to a folder being
    walked (`ln -s . x`, `ln -s .. up`: a loop, not more pictures) or to one of the `fences` (the class
    folders of every split, as real paths) or a folder holding one, other than the one being walked: a picture of
    another class or split is not read twice under two labels, nor a validation picture in training.
    Links elsewhere (a pool of pictures beside the splits, another disk) are followed. Anything that is not
    a regular file (a FIFO named x.jpg, a device, a socket) is never opened: it goes to `skipped` with the
    reason, as do sub-folders that cannot be read."""

    fences: tuple[str, ...] = ()
    folders: set = field(default_factory=set)  # (st_dev, st_ino) of the folders read
    files: set = field(default_factory=set)  # (st_dev, st_ino) of the pictures found
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    not_followed: list[tuple[str, str]] = field(default_factory=list)  # (link, why)
    repeated_files: int = 0  # pictures met a second time (hard links, links inside one folder), used once
    notes: list[str] = field(default_factory=list)  # other lines for the user (repeated --labels rows)

    def pictures(self, folder: Path) -> list[Path]:
        """Picture files under `folder`, recursively, depth first in name order, hidden entries left out."""
        found, stack, start = [], [Path(folder)], os.path.realpath(folder)
        while stack:
            here = stack.pop()
            try:
                st = os.stat(here)
                if (st.st_dev, st.st_ino) in self.folders:  # met again (a bind mount, say): read once
                    continue
                with os.scandir(here) as listing:
                    entries = sorted(listing, key=lambda e: e.name)
            except OSError as err:
                if here == Path(folder):  # a class folder (or predict's folder) itself: nothing to use
                    raise UserError(f"cannot read {shown(here)}: {_reason(err)}; check its permissions") from None
                self.skipped.append((str(here), f"cannot read this folder: {_reason(err)}"))
                continue
            self.folders.add((st.st_dev, st.st_ino))
            stack.extend(reversed(self._visit(entries, st.st_dev, start, found)))
        return found

    def _visit(self, entries: list[os.DirEntry], dev: int, start: str, found: list[Path]) -> list[Path]:
        """Add the pictures among `entries` to `found`; return the sub-folders to walk."""
        subfolders = []
        for entry in entries:
            if entry.name.startswith(".") or not (_is_dir(entry) or is_image_file(Path(entry.name))):
                continue
            why = self._fenced(os.path.realpath(entry.path), start) if entry.is_symlink() else None
            if why is not None:
                self.not_followed.append((entry.path, why))
            elif _is_dir(entry):
                subfolders.append(Path(entry.path))
            else:
                self._add_file(entry, dev, found)
        return subfolders

    def _fenced(self, target: str, start: str) -> str | None:
        """Why a link to `target` met while walking `start` is not followed, or None."""
        def inside(path: str, folder: str) -> bool:
            return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)

        if inside(start, target):
            return f"it leads back up to {shown(target)} (a loop)"
        if inside(target, start):
            return None
        fence = next((f for f in self.fences if inside(target, f) or inside(f, target)), None)
        return None if fence is None else f"it leads to {shown(target)}, which is read as a class or split of its own"

    def _add_file(self, entry: os.DirEntry, dev: int, found: list[Path]) -> None:
        try:  # a plain entry's d_type and inode need no system call; a link's target needs a stat
            st = entry.stat() if entry.is_symlink() else None
            mode = st.st_mode if st else (stat.S_IFREG if entry.is_file(follow_symlinks=False) else
                                          entry.stat(follow_symlinks=False).st_mode)
            key = (st.st_dev, st.st_ino) if st else (dev, entry.inode())
        except OSError as err:  # a dangling link
            self.skipped.append((entry.path, f"cannot read it: {_reason(err)}"))
            return
        kind = special_kind(mode)
        if kind is not None:
            self.skipped.append((entry.path, f"not a regular file ({kind}); never opened"))
        elif key in self.files:
            self.repeated_files += 1
        else:
            self.files.add(key)
            found.append(Path(entry.path))

    def report(self) -> None:
        """One line per skipped entry and per link not followed, one for all pictures met twice."""
        for path, reason in self.skipped:
            print(f"imgclf: skipping {shown(path)}: {reason}", file=sys.stderr)
        for link, why in self.not_followed:
            print(f"imgclf: not following the link {shown(link)}: {why}", file=sys.stderr)
        if self.repeated_files:
            print(f"imgclf: {self.repeated_files} picture(s) met a second time (through links) were used once",
                  file=sys.stderr)
        for note in self.notes:
            print(f"imgclf: {note}", file=sys.stderr)


def list_images(folder: Path) -> list[Path]:
    """Picture files under `folder`, recursively and in a stable order, skipping hidden entries, each file
    once however many links lead to it, and anything not a regular file (see PictureWalk)."""
    return PictureWalk().pictures(folder)


def _scan(folder: Path, classes: list[str] | None = None,
          walk: PictureWalk | None = None) -> tuple[list[str], list[Path], list[int]]:
    names = find_classes(folder)
    if not names:
        raise UserError(f"{shown(folder)} has no class folders; expected {shown(folder)}/<class>/<picture> (docs/usage.md: Data layouts)")
    if classes is not None and names != classes:
        raise UserError(f"the classes in {shown(folder)} ({', '.join(names)}) differ from train's ({', '.join(classes)})")
    walk = walk or PictureWalk()
    files, labels = [], []
    for label, path in enumerate(_subfolders(folder)):
        found = walk.pictures(path)
        if not found:
            raise UserError(f"class folder {shown(path)} holds no pictures; add some or remove the folder")
        files += found
        labels += [label] * len(found)
    return names, files, labels


@dataclass(frozen=True)
class FolderLayout:
    """Where the splits of a folder of pictures are: `train` holds the class folders; `val` and `test` are
    folders beside it (None when absent); `ignored`: other folders beside train/, which are not read."""

    train: Path
    val: Path | None = None
    test: Path | None = None
    ignored: tuple[str, ...] = ()


def folder_layout(root: Path) -> FolderLayout:
    """Read the layout of `root`: `train/` with `val/` (or `valid/`, `validation/`) and/or `test/` beside it,
    or a single folder of class folders. Split folders are known whatever their case (Val/, TEST/). Split
    folders beside class folders without `train/` are ambiguous (is val/ a class or the held-out split?)."""
    subdirs = {p.name.lower(): p for p in reversed(_subfolders(root))}  # the first in name order wins a tie
    val = next((subdirs[n] for n in VAL_NAMES if n in subdirs), None)
    test = subdirs.get("test")
    if "train" in subdirs:
        splits = {subdirs["train"], val, test}
        return FolderLayout(subdirs["train"], val, test,
                            tuple(shown(p.name) for p in _subfolders(root) if p not in splits))
    held_out = [p.name for p in (val, test) if p is not None]
    if held_out:
        others = [shown(p.name) for p in _subfolders(root) if p.name not in held_out]
        beside = f" beside the class folders {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}" \
            if others else ""
        raise UserError(f"ambiguous layout: {shown(root)} has {held_out[0]}/{beside} but no train/ folder, so "
                        f"{held_out[0]}/ could be a class or the held-out split; move the training class folders "
                        f"into {shown(root / 'train')}/ (or rename {held_out[0]}/ if it is a class)")
    return FolderLayout(root)


def _load_folder(root: Path, cfg: DataConfig, *, size: int | None, channels: int | None, progress: bool,
                 whole: bool = False, classes: list[str] | None = None, roles: dict | None = None) -> ImageData:
    """Decode (once, cached) the splits of a folder data set; see `folder_layout`. Without a validation or
    test folder, `cfg.val_fraction` of each class is held out, or with `whole` nothing: every picture is then
    the `val` split, named "all" (what `imgclf eval` measures on a plain folder of class folders). A
    multi-label --labels CSV (imgclf.labelsets; `classes`: a checkpoint's, to read it against) gives splits
    whose labels are (N, classes) 0/1 targets."""
    layout = folder_layout(root)
    if layout.ignored and progress:
        print(f"imgclf: warning: not reading {', '.join(layout.ignored)} in {shown(root)}: only train/, "
              f"val/ and test/ are read beside train/", file=sys.stderr)
    task, why = labels_task(cfg.task, cfg.labels)
    targets = None
    if task == MULTI:
        lists, walk, targets = multilabel_lists(root, layout, cfg, whole=whole, classes=classes)
    else:
        lists, walk = _file_lists(root, layout, cfg, whole=whole)
    if progress:
        walk.report()
    classes, held_out = lists.pop("classes"), layout.val or layout.test
    val_name = held_out.name if held_out is not None else ("all" if whole else "val")
    if cfg.folds and cfg.fold and not whole:  # k-fold: train/ and val/ pooled, then cut (imgclf.folds)
        lists, note = fold_lists(lists, folds=cfg.folds, fold=cfg.fold, test_is_val=layout.val is None and
                                 layout.test is not None, classes=classes, targets=targets)
        val_name = fold_name(cfg.fold, cfg.folds)
        if note and progress:
            print(f"imgclf: {note}", file=sys.stderr)
    photos = _are_photos(lists["train"][0])
    size = size or (224 if photos else native_side(root, *[_native_side(lists["train"][0])] * 2))
    channels, depth = detect(lists["train"][0], channels, _default_channels(lists["train"][0]))
    store = store_size(cfg, size, photos)
    if cfg.strict:
        check_all([f for files, _ in lists.values() for f in files], size=size, channels=channels, depth=depth)
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    roles = _folder_roles(roles, channels, cfg.normalize)
    splits, skipped = _cached_splits(lists, root, val_name, size=size, store=store, channels=channels,
                                     depth=depth, cache_root=cache_root, progress=progress, roles=roles)
    skipped = list(walk.skipped) + skipped
    if targets is not None:  # the cache kept each picture's row of the CSV as its label
        splits = {role: Split(s.images, targets[s.labels], s.files) for role, s in splits.items()}
    unreadable = [c for i, c in enumerate(classes) if not bool((splits["train"].labels == i).any())]
    if unreadable and not whole and targets is None:  # every picture of the class was skipped: as good as none
        raise UserError(f"class folder {shown(layout.train)}/{unreadable[0]} holds no readable pictures; fix or "
                        f"remove them")
    mean, std = cached_stats(splits["train"], cache_root, lists["train"][0], store, channels, roles["train"],
                             depth)
    return ImageData(splits["train"], splits["val"], classes, mean, std, val_name, skipped, splits.get("test"),
                     photos, task=task, task_note=why)


def _cached_splits(lists: dict, root: Path, val_name: str, *, size: int, store: int, channels: int,
                   cache_root: Path, progress: bool, roles: dict, depth: int = 8) -> tuple[dict[str, Split], list]:
    """Each role's [files, labels] decoded through the cache (training's at the store side), each as `roles`
    says (role -> Decoding), at `depth`: the splits, and the (file, reason) of every picture skipped; an
    empty split is one UserError line."""
    splits, skipped = {}, []
    for role, (files, labels) in lists.items():
        side = store if role == "train" else size
        splits[role], bad = cached_split(files, labels, size=side, channels=channels, cache_root=cache_root,
                                         progress=progress, decoding=roles[role], depth=depth)
        skipped += bad
        if len(splits[role]) == 0:
            raise UserError(f"no readable pictures in the {val_name if role == 'val' else role} split of {shown(root)}")
    return splits, skipped


def multilabel_lists(root: Path, layout: FolderLayout, cfg: DataConfig, *, whole: bool,
                     classes: list[str] | None = None) -> tuple[dict, PictureWalk, torch.Tensor]:
    """As `_file_lists`, for a multi-label --labels CSV: each role's [files, CSV rows] (the row stands for
    the label in the cache; the caller maps it to its targets), the walk (nothing walked: the CSV names the
    pictures) and the (rows, classes) 0/1 targets. A row's picture under the layout's val/ or test/ folder
    is in that split; without val/, `cfg.val_fraction` of the others is held out at random (seed 0), or
    with `whole` none."""
    names, files, targets = read_multilabel_csv(Path(cfg.labels).expanduser(), root, classes)
    roles = {"train": [], "val": [], "test": []}
    for row, file in enumerate(files):
        role = next((r for r, folder in (("val", layout.val), ("test", layout.test))
                     if folder is not None and Path(os.path.realpath(file)).is_relative_to(os.path.realpath(folder))),
                    "train")
        roles[role].append(row)
    if whole and not roles["val"]:
        roles["val"] = roles["train"]
    elif not roles["val"]:
        keep, held = random_split(len(roles["train"]), fraction=cfg.val_fraction, seed=0)
        roles["train"], roles["val"] = [roles["train"][i] for i in keep], [roles["train"][i] for i in held]
    if not roles["train"]:
        raise UserError(f"--labels {shown(cfg.labels)} names no training pictures (all are under val/ or test/)")
    lists = {role: [[files[i] for i in rows], rows] for role, rows in roles.items() if rows}
    return {"classes": names, **lists}, PictureWalk(), targets


def _file_lists(root: Path, layout: FolderLayout, cfg: DataConfig, *, whole: bool) -> tuple[dict, PictureWalk]:
    """{"classes": names, role: [files, labels], ...} for the roles train, val (and test), and the walk
    that found them. Held-out folders are walked first: a picture that a link makes reachable from both a
    held-out folder and train/ is held out, never trained on."""
    csv_rows = read_labels_csv(Path(cfg.labels).expanduser(), root) if cfg.labels else None
    classes = csv_rows[0] if csv_rows else find_classes(layout.train)
    check_class_names(classes, f"--labels {cfg.labels}" if cfg.labels else str(layout.train))
    splits = [p for p in (layout.train, layout.val, layout.test) if p is not None]
    fences = {os.path.realpath(p) for split in splits for p in _subfolders(split)}  # (links to a split or the
    # data folder itself lead up to a class folder being walked, or down into the others: fenced either way)
    for outer in sorted(fences):  # a class folder that is a link to the data folder, say: no walk can sort it out
        inner = next((f for f in sorted(fences) if f.startswith(outer.rstrip(os.sep) + os.sep)), None)
        if inner is not None:
            raise UserError(f"the class folder {shown(outer)} holds another class folder, {shown(inner)} (a link "
                            f"to the data folder?); remove the link, or move the class folders apart")
    walk = PictureWalk(tuple(sorted(fences)))
    held_out, lists = layout.val or layout.test, {}
    if held_out is not None:
        lists["val"] = _scan(held_out, classes, walk)[1:]
        if layout.val is not None and layout.test is not None:
            lists["test"] = _scan(layout.test, classes, walk)[1:]
    train = list(csv_rows[1:3] if csv_rows else _scan(layout.train, None, walk)[1:])
    if csv_rows and held_out is not None:
        _refuse_held_out_rows(cfg.labels, csv_rows[1], walk)
    if csv_rows and csv_rows[3]:
        walk.notes.append(f"--labels {shown(cfg.labels)} names the same file with the same label more than once "
                          f"({csv_rows[3]} repeated row(s)); each file is used once")
    if len(classes) == 1 and not whole:
        where = f"--labels {cfg.labels}" if cfg.labels else str(layout.train)
        raise UserError(f"{shown(where)} has a single class ({shown(classes[0])}); a classifier needs at least "
                        f"two: add a folder of pictures for each other class")
    if held_out is None and whole:
        lists["val"] = train
    elif held_out is None:
        files, labels, val_files, val_labels = stratified_split(*train, fraction=cfg.val_fraction, seed=0)
        train, lists["val"] = [files, labels], [val_files, val_labels]
    return {"classes": classes, "train": train, **lists}, walk


def _refuse_held_out_rows(labels: str, files: list[Path], walk: PictureWalk) -> None:
    """UserError when a --labels row names a picture of the held-out folders (`walk` found them, known by
    their identity): it would be trained on and validated on at once."""
    for file in files:
        st = file.stat()
        if (st.st_dev, st.st_ino) in walk.files:
            raise UserError(f"--labels {shown(labels)} names {shown(file)}, a picture of the validation or test "
                            f"folder: it would be trained and validated on; list training pictures only")


def store_size(cfg: DataConfig, size: int, photos: bool) -> int:
    """Side at which training pictures are cached: above `size` for the photo recipe's random-resized crops
    (8/7 of it, as ImageNet's 256 for 224, unless --store-size says), else `size` itself. Photos under "auto"
    get it at any run length (a short run's flip-crop takes its windows from it), and so does a run whose
    options switch the photo recipe on (imgclf.augment.choose)."""
    switched = cfg.augment == "auto" and choose(cfg, photos=False, epochs=1) == "photo"  # by its options
    if cfg.augment != "photo" and not (cfg.augment == "auto" and photos) and not switched:
        return size
    return max(size, cfg.store_size or round(size * 8 / 7))


def read_labels_csv(path: Path, root: Path) -> tuple[list[str], list[Path], list[int], int]:
    """A CSV of `filename,label` rows (a header row is recognised and skipped; Kaggle's layout): files are
    relative to `root` (or absolute). Classes are the sorted distinct labels, escaped as folder names are
    (`shown`: a control character cannot reach the terminal). A file named twice (under one name or two, or
    a hard link) is used once, the count of such rows is the fourth value; named with two labels, it is
    refused (it would train on both, or sit in training and validation at once)."""
    problem = not_regular(path)
    if problem is not None:
        raise UserError(f"--labels {shown(path)}: {problem}; give a CSV file of filename,label rows")
    try:
        rows = [r for r in csv.reader(path.read_text(encoding="utf-8-sig").splitlines()) if r and any(r)]
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"--labels {shown(path)}: not a readable CSV file ({err})") from None
    if rows and not (root / rows[0][0]).is_file() and len(rows[0]) >= 2 and not rows[0][1].strip().isdigit():
        rows = rows[1:]  # a header such as "filename,label" or "id,class"
    bad = next((i for i, r in enumerate(rows) if len(r) < 2 or not r[0].strip() or not r[1].strip()), None)
    if bad is not None:
        raise UserError(f"--labels {shown(path)}: row {bad + 1} is not filename,label: "
                        f"{shown(','.join(rows[bad])[:80])!r}")
    if not rows:
        raise UserError(f"--labels {shown(path)} holds no filename,label rows")
    # one base for every row: relative names beside absolute ones under a relative root would mix relative
    # and absolute paths in one split (the cache names a split's source folder by their common path)
    base = root.absolute() if any(Path(r[0].strip()).is_absolute() for r in rows) else root
    pairs = _unique_rows(path, [(base / r[0].strip(), shown(r[1].strip())) for r in rows], root)
    classes = sorted({label for _, label in pairs})
    index = {name: i for i, name in enumerate(classes)}
    return classes, [f for f, _ in pairs], [index[label] for _, label in pairs], len(rows) - len(pairs)


def _unique_rows(path: Path, pairs: list[tuple[Path, str]], root: Path) -> list[tuple[Path, str]]:
    """`pairs` (file, label) less the rows naming a file an earlier row names (known by its identity, so
    `a.png` and `./a.png` are one file) with the same label; UserError for a file that does not exist, or
    for one given two labels."""
    seen: dict[tuple[int, int], tuple[int, str]] = {}  # (st_dev, st_ino) -> (row, label)
    unique = []
    for row, (file, label) in enumerate(pairs, start=1):
        try:
            st = file.stat()  # a FIFO, say, is skipped later with a reason
        except OSError:
            raise UserError(f"--labels {shown(path)} names {shown(file)}, which does not exist (file names are "
                            f"relative to {shown(root)})") from None
        first = seen.setdefault((st.st_dev, st.st_ino), (row, label))
        if first[0] == row:
            unique.append((file, label))
        elif first[1] != label:
            raise UserError(f"--labels {shown(path)}: row {row} labels {shown(file)} {label!r} but row {first[0]} "
                            f"labels it {first[1]!r}; keep one label per file")
    return unique


def stratified_split(files: list, labels: list[int], *, fraction: float, seed: int):
    """Split per class, seeded: `fraction` of each class (at least one if it has two) is held out."""
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for label in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        order = [idx[i] for i in torch.randperm(len(idx), generator=gen).tolist()]
        k = max(1, round(len(idx) * fraction)) if len(idx) >= 2 else 0
        test_idx += sorted(order[:k])
        train_idx += sorted(order[k:])
    pick = lambda ii, xs: [xs[i] for i in ii]  # noqa: E731
    return pick(train_idx, files), pick(train_idx, labels), pick(test_idx, files), pick(test_idx, labels)


def _peek(path: Path) -> tuple[tuple[int, int], str] | None:
    """(size, mode) from a picture's header; None when unreadable or over the pixel limit (reported later)."""
    if not_regular(path) is not None:  # a FIFO named in a --labels file, say: never opened
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on odd metadata
            with Image.open(path) as img:
                return img.size, img.mode
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        found = probe(path)  # a multi-band TIFF, which Pillow cannot open (imgclf.bands)
        return None if found is None else ((found.width, found.height), "bands")


def holds_photos(data: str | os.PathLike) -> bool:
    """Whether --data `data` is a folder of photos by the rule its loaded data's `photos` follows (`_are_photos`
    on the first pictures of its training folder in name order), read before anything is decoded (what
    --recipe auto chooses by); False for a built-in data set, IDX files and what cannot be read (loading it
    then says what is wrong)."""
    root = Path(data).expanduser()
    if str(data) in BUILTINS or not root.is_dir():
        return False
    try:
        first = [] if _idx_files(root) else _first_pictures(folder_layout(root).train, PEEKED)
    except (UserError, OSError):
        return False
    return bool(first) and _are_photos(first)


def _first_pictures(folder: Path, count: int) -> list[Path]:
    """Up to `count` picture files under `folder`, the first in name order (depth first, hidden entries
    left out), without listing more of a large folder than it takes to find them."""
    found: list[Path] = []
    for entry in _read_folder(folder):
        if len(found) >= count:
            break
        if entry.name.startswith((".", "__")):
            continue
        if _is_dir(entry):
            found += _first_pictures(Path(entry.path), count - len(found))
        elif is_image_file(Path(entry.path)):
            found.append(Path(entry.path))
    return found


def _are_photos(files: list[Path]) -> bool:
    """Photos, unless the first readable picture is a small square (64 pixels or less, CIFAR-like)."""
    for (w, h), _ in filter(None, map(_peek, files[:PEEKED])):
        return not (w == h and w <= 64)
    return True


def _native_side(files: list[Path]) -> int:
    """The side of the first readable picture (a small square: see `_are_photos`)."""
    for (w, _), _ in filter(None, map(_peek, files[:PEEKED])):
        return w
    return 224


def _default_channels(files: list[Path]) -> int:
    modes = {mode for _, mode in filter(None, map(_peek, files[:16]))}
    return 1 if modes and modes <= {"L", "1", "I;16", "I;16B", "I;16L", "I", "F"} else 3




def write_samples(split: Split, classes: list[str], out: Path, *, per_class: int) -> list[Path]:
    """Save the first `per_class` pictures of each class of `split` as PNG files named <class>_<n>.png,
    so there are pictures to try `imgclf predict` on even for data sets that come as arrays (note 31)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for label, name in enumerate(classes):
        rows = (split.labels == label).nonzero().flatten()[:per_class].tolist()
        for n, row in enumerate(rows):
            pixels = np.asarray(split.images[row]).transpose(1, 2, 0)  # C, H, W -> H, W, C
            path = out / f"{name.replace('/', '-')}_{n}.png"
            Image.fromarray(pixels.squeeze(2) if pixels.shape[2] == 1 else pixels).save(path)
            written.append(path)
    return written

