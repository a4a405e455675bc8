"""Data sources (notes 05, 06, 13): built-in data sets, IDX files and folders of pictures, and their splits.

Every data set, built-in or folder, becomes two `Split`s of uint8 tensors (N, C, H, W) plus integer labels;
folders go through the decode-once cache (`imgclf.cache`).
"""

from __future__ import annotations

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


@dataclass
class ImageData:
    train: Split
    test: Split
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    test_name: str = "test"  # "test" or "val": what the held-out split is called in this data set
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) of undecodable files

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def img_size(self) -> int:
        return int(self.train.images.shape[2])


def load_data(cfg: DataConfig, *, img_size: int | None = None, channels: int | None = None,
              progress: bool = True) -> ImageData:
    """Load the data set `cfg.data` names. `img_size`/`channels` (from a checkpoint) override detection."""
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
    return _load_folder(root, cfg, size=size, channels=channels, progress=progress)


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
    data = ImageData(splits[0], splits[1], list(ds.classes), *NORMALIZATION[cfg.data])
    return _finish(data, size=size, channels=channels, name=cfg.data)


def _finish(data: ImageData, *, size: int | None, channels: int | None, name: str) -> ImageData:
    """Resize / convert channels when a model asks for other than the native, and fill in statistics."""
    for split in (data.train, data.test):
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
    return ImageData(splits[0], splits[1], classes, (), ())


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


def _load_folder(root: Path, cfg: DataConfig, *, size: int | None, channels: int | None,
                 progress: bool) -> ImageData:
    held_out = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    train_dir = root / "train" if (root / "train").is_dir() else root
    classes, train_files, train_labels = _scan(train_dir)
    if held_out is not None and train_dir != root:
        _, test_files, test_labels = _scan(held_out, classes)
        test_name = held_out.name
    else:
        train_files, train_labels, test_files, test_labels = stratified_split(
            train_files, train_labels, fraction=cfg.val_fraction, seed=0)
        test_name = "val"
    size = size or _default_size(train_files)
    channels = channels or _default_channels(train_files)
    if cfg.strict:
        check_all(train_files + test_files, size=size, channels=channels)
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    train, bad_train = cached_split(train_files, train_labels, size=size, channels=channels,
                                    cache_root=cache_root, progress=progress)
    test, bad_test = cached_split(test_files, test_labels, size=size, channels=channels,
                                  cache_root=cache_root, progress=progress)
    for split, name in ((train, "train"), (test, test_name)):
        if len(split) == 0:
            raise UserError(f"no readable pictures in the {name} split of {root}")
    unreadable = [c for i, c in enumerate(classes) if not bool((train.labels == i).any())]
    if unreadable:  # every picture of the class was skipped: as good as an empty class folder
        raise UserError(f"class folder {train_dir / unreadable[0]} holds no readable pictures; fix or remove them")
    mean, std = cached_stats(train, cache_root, train_files, size, channels)
    return ImageData(train, test, classes, mean, std, test_name, bad_train + bad_test)


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


def _default_size(files: list[Path]) -> int:
    """Small square pictures (CIFAR-like) keep their size; photos are brought to 224, as ImageNet models expect."""
    for (w, h), _ in filter(None, map(_peek, files[:8])):
        return w if w == h and w <= 64 else 224
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

