"""Data sources (notes 05, 06, 13): built-in data sets, IDX files and folders of pictures, and their splits.

Every data set, built-in or folder, becomes two `Split`s of uint8 tensors (N, C, H, W) plus integer labels;
folders go through the decode-once cache (`imgclf.cache`).
"""

from __future__ import annotations

import csv
import gzip
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgclf.cache import Split, cached_split, cached_stats, check_all, default_cache_dir
from imgclf.config import DataConfig
from imgclf.errors import UserError
from imgclf.transforms import IMAGE_EXTENSIONS, NORMALIZATION, compute_mean_std, resize_batch

BUILTINS = ("cifar10", "cifar100", "mnist", "fashion-mnist")
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
        return f"{len(self.train)} train / {val}{test} pictures"

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def img_size(self) -> int:
        """The side the model sees (training pictures may be stored larger, for random-resized crops)."""
        return int(self.val.images.shape[2])


def load_data(cfg: DataConfig, *, img_size: int | None = None, channels: int | None = None,
              progress: bool = True, whole: bool = False) -> ImageData:
    """Load the data set `cfg.data` names. `img_size`/`channels` (from a checkpoint) override detection.
    `whole`: a single folder of class folders is not split; all of it is the `val` split (see _load_folder)."""
    size = img_size or cfg.img_size
    if cfg.data in BUILTINS:
        return _load_builtin(cfg, size=size, channels=channels)
    root = Path(cfg.data).expanduser()
    if not root.exists():
        names = ", ".join(BUILTINS)
        raise UserError(f"--data {cfg.data!r} is neither a built-in data set ({names}) nor an existing folder")
    if not root.is_dir():
        raise UserError(f"--data {cfg.data!r} is a file; give a folder of class folders or a built-in name")
    if _idx_files(root):
        return _finish(_load_idx(root), size=size, channels=channels, name=root.name.lower())
    return _load_folder(root, cfg, size=size, channels=channels, progress=progress, whole=whole)


def imbalance_warning(labels: torch.Tensor, classes: list[str]) -> str | None:
    """One line when the smallest class has under a fifth of the largest's pictures, else None."""
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    small, large = min(range(len(counts)), key=counts.__getitem__), max(range(len(counts)), key=counts.__getitem__)
    if counts[small] * 5 >= counts[large]:
        return None
    return (f"warning: class {classes[small]} has {counts[small]} training pictures, under a fifth of "
            f"{classes[large]}'s {counts[large]}; consider --balance sampler or --balance loss")


# ---------------------------------------------------------------- built-in data sets (torchvision)

def _load_builtin(cfg: DataConfig, *, size: int | None, channels: int | None) -> ImageData:
    if cfg.data == "fashion-mnist" and _idx_files(DEBIAN_FASHION_MNIST):
        return _finish(_load_idx(DEBIAN_FASHION_MNIST), size=size, channels=channels, name="fashion-mnist")
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
    return _finish(data, size=size, channels=channels, name=cfg.data)


def _finish(data: ImageData, *, size: int | None, channels: int | None, name: str) -> ImageData:
    """Resize / convert channels when a model asks for other than the native, and fill in statistics."""
    for split in data.splits().values():
        if channels is not None and split.images.shape[1] != channels:
            split.images = _convert_channels(torch.as_tensor(split.images), channels)
        if size is not None:
            split.images = resize_batch(torch.as_tensor(split.images), size)
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


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (the MNIST format: magic, dims, big-endian sizes, then unsigned bytes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 4:
            raise ValueError("not an unsigned-byte IDX file")
        dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, EOFError, ValueError, struct.error) as err:
        raise UserError(f"cannot read IDX file {path}: {err}") from None


def _load_idx(root: Path) -> ImageData:
    files = _idx_files(root)
    assert files is not None
    splits = []
    for split in ("train", "t10k"):
        images = torch.from_numpy(read_idx(files[f"{split}-images-idx3"]).copy()).unsqueeze(1)
        labels = torch.from_numpy(read_idx(files[f"{split}-labels-idx1"]).astype(np.int64))
        if images.shape[0] != labels.shape[0]:
            raise UserError(f"{root}: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
        splits.append(Split(images, labels))
    n_classes = int(max(splits[0].labels.max(), splits[1].labels.max())) + 1
    fashion = "fashion" in str(root).lower() and n_classes == 10
    classes = FASHION_CLASSES if fashion else [str(i) for i in range(n_classes)]
    return ImageData(splits[0], splits[1], classes, (), (), "test")


# ---------------------------------------------------------------- folders of pictures (note 06)

def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def find_classes(folder: Path) -> list[str]:
    """Class names: the sub-folders of `folder`, sorted, hidden ones (.ipynb_checkpoints ...) ignored."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def list_images(folder: Path) -> list[Path]:
    """Picture files under `folder`, recursively and in a stable order, skipping hidden entries."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_file(Path(f)))
    return found


def _scan(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[Path], list[int]]:
    names = find_classes(folder)
    if not names:
        raise UserError(f"{folder} has no class folders; expected {folder}/<class>/<picture> (see README)")
    if classes is not None and names != classes:
        raise UserError(f"the classes in {folder} ({', '.join(names)}) differ from train's ({', '.join(classes)})")
    files, labels = [], []
    for label, name in enumerate(names):
        found = list_images(folder / name)
        if not found:
            raise UserError(f"class folder {folder / name} holds no pictures; add some or remove the folder")
        files += found
        labels += [label] * len(found)
    return names, files, labels


@dataclass(frozen=True)
class FolderLayout:
    """Where the splits of a folder of pictures are: `train` holds the class folders; `val` and `test` are
    folders beside it (None when absent)."""

    train: Path
    val: Path | None = None
    test: Path | None = None


def folder_layout(root: Path) -> FolderLayout:
    """Read the layout of `root`: `train/` with `val/` (or `valid/`, `validation/`) and/or `test/` beside it,
    or a single folder of class folders. Split folders beside class folders without `train/` are ambiguous."""
    subdirs = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith((".", "__"))}
    val = next((subdirs[n] for n in VAL_NAMES if n in subdirs), None)
    test = subdirs.get("test")
    if "train" in subdirs:
        return FolderLayout(subdirs["train"], val, test)
    held_out = [p.name for p in (val, test) if p is not None]
    if held_out:
        raise UserError(f"{root} has {held_out[0]}/ but no train/ folder beside it; put the training class folders "
                        f"in {root / 'train'}/, or point --data at a folder of class folders alone")
    return FolderLayout(root)


def _load_folder(root: Path, cfg: DataConfig, *, size: int | None, channels: int | None, progress: bool,
                 whole: bool = False) -> ImageData:
    """Decode (once, cached) the splits of a folder data set; see `folder_layout`. Without a validation or
    test folder, `cfg.val_fraction` of each class is held out, or with `whole` nothing: every picture is then
    the `val` split, named "all" (what `imgclf eval` measures on a plain folder of class folders)."""
    layout = folder_layout(root)
    classes, *train = _labelled_files(root, layout.train, cfg)
    lists, val_name = {"train": train}, "val"
    held_out = layout.val or layout.test
    if held_out is not None:
        lists["val"], val_name = _scan(held_out, classes)[1:], held_out.name
        if layout.val is not None and layout.test is not None:
            lists["test"] = _scan(layout.test, classes)[1:]
    elif whole:
        lists["val"], val_name = train, "all"
    else:
        files, labels, val_files, val_labels = stratified_split(*train, fraction=cfg.val_fraction, seed=0)
        lists["train"], lists["val"] = [files, labels], [val_files, val_labels]
    photos = _are_photos(lists["train"][0])
    size = size or (224 if photos else _native_side(lists["train"][0]))
    channels = channels or _default_channels(lists["train"][0])
    store = store_size(cfg, size, photos)
    if cfg.strict:
        check_all([f for files, _ in lists.values() for f in files], size=size, channels=channels)
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    splits, skipped = {}, []
    for role, (files, labels) in lists.items():
        side = store if role == "train" else size
        splits[role], bad = cached_split(files, labels, size=side, channels=channels, cache_root=cache_root,
                                         progress=progress)
        skipped += bad
        if len(splits[role]) == 0:
            raise UserError(f"no readable pictures in the {val_name if role == 'val' else role} split of {root}")
    unreadable = [c for i, c in enumerate(classes) if not bool((splits["train"].labels == i).any())]
    if unreadable and not whole:  # every picture of the class was skipped: as good as an empty class folder
        raise UserError(f"class folder {layout.train / unreadable[0]} holds no readable pictures; fix or remove them")
    mean, std = cached_stats(splits["train"], cache_root, lists["train"][0], store, channels)
    return ImageData(splits["train"], splits["val"], classes, mean, std, val_name, skipped, splits.get("test"),
                     photos)


def store_size(cfg: DataConfig, size: int, photos: bool) -> int:
    """Side at which training pictures are cached: above `size` for the photo recipe's random-resized crops
    (8/7 of it, as ImageNet's 256 for 224, unless --store-size says), else `size` itself."""
    if cfg.augment != "photo" and not (cfg.augment == "auto" and photos):
        return size
    return max(size, cfg.store_size or round(size * 8 / 7))


def _labelled_files(root: Path, folder: Path, cfg: DataConfig) -> tuple[list[str], list[Path], list[int]]:
    """(classes, files, labels) of the training pictures: class folders, or `cfg.labels`' CSV."""
    return read_labels_csv(Path(cfg.labels).expanduser(), root) if cfg.labels else _scan(folder)


def read_labels_csv(path: Path, root: Path) -> tuple[list[str], list[Path], list[int]]:
    """A CSV of `filename,label` rows (a header row is recognised and skipped; Kaggle's layout): files are
    relative to `root` (or absolute). Classes are the sorted distinct labels."""
    if not path.is_file():
        raise UserError(f"--labels {path}: no such file; give a CSV of filename,label rows")
    try:
        rows = [r for r in csv.reader(path.read_text(encoding="utf-8-sig").splitlines()) if r and any(r)]
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"--labels {path}: not a readable CSV file ({err})") from None
    if rows and not (root / rows[0][0]).is_file() and len(rows[0]) >= 2 and not rows[0][1].strip().isdigit():
        rows = rows[1:]  # a header such as "filename,label" or "id,class"
    bad = next((i for i, r in enumerate(rows) if len(r) < 2 or not r[0].strip() or not r[1].strip()), None)
    if bad is not None:
        raise UserError(f"--labels {path}: row {bad + 1} is not filename,label: {','.join(rows[bad])[:80]!r}")
    if not rows:
        raise UserError(f"--labels {path} holds no filename,label rows")
    classes = sorted({r[1].strip() for r in rows})
    index = {name: i for i, name in enumerate(classes)}
    files = [root / r[0].strip() for r in rows]
    missing = next((f for f in files if not f.is_file()), None)
    if missing is not None:
        raise UserError(f"--labels {path} names {missing}, which does not exist (file names are relative to {root})")
    return classes, files, [index[r[1].strip()] for r in rows]


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on odd metadata
            with Image.open(path) as img:
                return img.size, img.mode
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None


def _are_photos(files: list[Path]) -> bool:
    """Photos, unless the first readable picture is a small square (64 pixels or less, CIFAR-like)."""
    for (w, h), _ in filter(None, map(_peek, files[:8])):
        return not (w == h and w <= 64)
    return True


def _native_side(files: list[Path]) -> int:
    """The side of the first readable picture (a small square: see `_are_photos`)."""
    for (w, _), _ in filter(None, map(_peek, files[:8])):
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

