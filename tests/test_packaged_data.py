"""Issue 21, item 9: `fashion-mnist-mini`, the small real data set shipped inside the package, runs the README's
first command on a machine without a network: it resolves by its built-in name with no download, `samples`
writes from it, a short training on it learns, and the package data (pyproject) carries its files."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SHARED_DATA, run_cli

from imgclf.cli import main
from imgclf.config import DataConfig
from imgclf.sources import BUILTINS, FASHION_CLASSES, PACKAGED, load_data

MINI = PACKAGED["fashion-mnist-mini"]
NO_NETWORK = """import socket
def _refuse(*args, **kwargs):
    raise OSError("the network is switched off for this test")
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = _refuse
"""


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("the network is switched off for this test")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_the_built_in_name_resolves_offline_to_a_stratified_real_subset(no_network, tmp_path):
    assert "fashion-mnist-mini" in BUILTINS
    root = tmp_path / "no-such-root"
    data = load_data(DataConfig(data="fashion-mnist-mini", data_root=str(root)))
    assert not root.exists()  # nothing downloaded, nothing written
    assert data.classes == FASHION_CLASSES and data.val_name == "test"
    assert tuple(data.train.images.shape) == (6000, 1, 28, 28) and tuple(data.val.images.shape) == (1000, 1, 28, 28)
    assert torch.bincount(data.train.labels).tolist() == [600] * 10
    assert torch.bincount(data.val.labels).tolist() == [100] * 10
    assert data.mean == (0.2860,) and data.std == (0.3530,)  # Fashion-MNIST's own statistics
    assert data.train.images.float().std() > 50  # real pictures, not blanks


def test_samples_writes_one_picture_per_class_offline(no_network, tmp_path, capsys):
    assert main(["samples", "fashion-mnist-mini", "--out", str(tmp_path / "imgs")]) == 0
    assert "wrote 10 test pictures" in capsys.readouterr().out
    assert len(list((tmp_path / "imgs").glob("*.png"))) == 10


def test_the_package_data_carries_the_files_and_their_licence():
    table = re.search(r"^\[tool\.setuptools\.package-data\]\n(?:#.*\n)*imgclf = \[(.*)\]$",
                      (ROOT / "pyproject.toml").read_text(), re.M)  # tomllib is Python 3.11+
    globs = re.findall(r'"([^"]+)"', table.group(1))
    package = ROOT / "src" / "imgclf"
    files = sorted(p.relative_to(package).as_posix() for p in MINI.iterdir())
    assert len(files) == 6  # four IDX files, LICENSE, README.md
    for name in files:
        assert any(fnmatch.fnmatch(name, g) for g in globs), f"{name} is not in pyproject's package-data"
    assert sum(p.stat().st_size for p in MINI.iterdir()) < 4_000_000  # a few MB at most
    licence = (MINI / "LICENSE").read_text()
    assert "MIT" in licence and "Zalando" in licence


def readme_first_command() -> str:
    section = re.search(r"^## Two commands\n(.*?)(?=^## )", (ROOT / "README.md").read_text(), re.S | re.M)
    assert section, "README.md has no '## Two commands' section"
    return re.search(r"^```\n(.*?)^```", section.group(1), re.S | re.M).group(1).strip()


def test_the_readme_first_command_trains_on_the_packaged_data():
    imgclf_steps = [s.strip() for s in readme_first_command().split("&&") if "imgclf " in s]
    assert [shlex.split(s)[1] for s in imgclf_steps] == ["train", "samples", "predict"]
    assert all("fashion-mnist-mini" in s for s in imgclf_steps[:2])


@pytest.mark.slow
def test_the_readme_first_command_runs_to_the_end_without_a_network(tmp_path):
    """The README's imgclf steps as real processes with every socket refused, one epoch instead of its five."""
    (tmp_path / "offline").mkdir()
    (tmp_path / "offline" / "sitecustomize.py").write_text(NO_NETWORK)
    env = {"PYTHONPATH": f"{tmp_path / 'offline'}:{ROOT / 'src'}", "OMP_NUM_THREADS": "1"}
    outputs = []
    for step in [s.strip() for s in readme_first_command().split("&&") if "imgclf " in s]:
        args = shlex.split(step)[1:]
        if args[0] == "train":
            args[args.index("--epochs") + 1] = "1"
        r = run_cli(*args, env=env, cwd=tmp_path)
        assert r.returncode == 0, f"{step}\n{r.stderr}"
        outputs.append(r.stdout)
    run = next(tmp_path.glob("runs/*"))
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val_acc"] > 0.6  # one epoch of the notes' network already learns (73.7% when measured)
    assert len(outputs[-1].splitlines()) == 10  # one answer per sample picture


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "fashion-mnist").is_dir(), reason="../shared/data is absent")
def test_the_subset_is_what_its_script_makes(tmp_path):
    """tools/make_fashion_mini.py writes the shipped files byte for byte from the full Fashion-MNIST."""
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_fashion_mini.py"), str(SHARED_DATA / "fashion-mnist"),
                    str(tmp_path)], check=True, capture_output=True)
    for made in sorted(tmp_path.glob("*.gz")):
        assert made.read_bytes() == (MINI / made.name).read_bytes(), made.name


def test_int8_calibration_finds_the_packaged_pictures_wherever_it_runs(tmp_path, monkeypatch):
    """A checkpoint trained on fashion-mnist-mini calibrates --int8 on the pictures inside imgclf, with no data
    root in the working folder; another built-in data set still needs its data root."""
    from imgclf.quantize import _reachable

    monkeypatch.chdir(tmp_path)  # no ./data here
    assert _reachable(DataConfig(data="fashion-mnist-mini"))
    assert not _reachable(DataConfig(data="cifar10"))
    (tmp_path / "data").mkdir()
    assert _reachable(DataConfig(data="cifar10"))
