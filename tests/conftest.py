"""Shared fixtures: real data sets from ../shared/data (skipped when absent), synthetic folders, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_sessionstart(session) -> None:
    # Decoded-folder caches of this test session live in one temporary folder, shared by its subprocesses.
    if "IMGCLF_TEST_KEEP_CACHE" not in os.environ:
        cache = Path(session.config._tmp_path_factory.mktemp("xdg-cache"))  # noqa: SLF001
        os.environ["XDG_CACHE_HOME"] = str(cache)


def shared_dataset(name: str) -> Path:
    """Path of a real data set from ../shared/data (CIFAR-10 is unpacked once by its `get` script)."""
    getter = SHARED_DATA / "get"
    if not getter.exists():
        pytest.skip("../shared/data is absent")
    out = subprocess.run([str(getter), name], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for in-process training: on a shared, busy machine several spinning threads are
    many times slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    return shared_dataset("cifar10")


@pytest.fixture(scope="session")
def hymenoptera_dir() -> Path:
    return shared_dataset("hymenoptera")


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    return shared_dataset("fashion-mnist")


def write_class_folder(root: Path, classes: list[str], per_class: int, *, size: int = 16, seed: int = 0,
                       fmt: str = "png") -> Path:
    """Write `per_class` learnable pictures per class under root/<class>/: each class has its own colour
    and stripe direction, plus noise, so a small network separates them within an epoch or two."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(60 + 90 * c) % 256, (200 - 70 * c) % 256, (40 + 50 * c) % 256], dtype=np.float64)
        for i in range(per_class):
            yy, xx = np.mgrid[0:size, 0:size]
            stripes = ((xx if c % 2 else yy) // 2 % 2) * 60.0
            img = base[None, None, :] + stripes[..., None] + rng.normal(0, 20, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.{fmt}")
    return root


@pytest.fixture
def tiny_split_folder(tmp_path: Path) -> Path:
    """train/<class>/ and test/<class>/ with three classes of 16x16 PNGs (48 train, 24 test)."""
    classes = ["circle", "square", "triangle"]
    write_class_folder(tmp_path / "tiny" / "train", classes, 16, seed=1)
    write_class_folder(tmp_path / "tiny" / "test", classes, 8, seed=2)
    return tmp_path / "tiny"


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd: Path | None = None):
    """Run `python -m imgclf ARGS...` as a user would; returns the CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "imgclf", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


def assert_same(a, b, where: str = "state") -> None:
    """Equal bit for bit and of the same types, recursively through dicts, lists and tuples of tensors and
    plain values (checkpoints, state dicts)."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, (where, a, b)
