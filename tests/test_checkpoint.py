"""imgclf.checkpoint, unit by unit: what a checkpoint holds, the atomic save and checked load, the refusals of
`safe_load` (code in a pickle is never run), and the prefixes torch.compile and DDP leave on weight names."""

from __future__ import annotations

import io
import itertools
import os
import pickle
import random
import sys

import pytest
import torch
from conftest import assert_same

from imgclf import __version__
from imgclf.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    build_checkpoint,
    load_checkpoint,
    safe_load,
    save_checkpoint,
    strip_prefixes,
)
from imgclf.errors import UserError


def weights() -> dict:
    torch.manual_seed(0)
    return {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4), "bn.num_batches_tracked":
            torch.tensor(7)}


def checkpoint(**state) -> dict:
    return build_checkpoint(model_name="tutorial_cnn", classes=["cat", "dog"], channels=3, size=32,
                            mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), config={"optim": {"lr": 0.1}},
                            state={"state_dict": weights(), "epoch": 2, **state})


# ---------------------------------------------------------------- contents


def test_build_checkpoint_describes_the_network_its_input_and_classes():
    classes = ["cat", "dog"]
    ckpt = build_checkpoint(model_name="resnet18", classes=classes, channels=1, size=64, mean=(0.5,), std=(0.25,),
                            config={"data": {"batch_size": 8}}, state={"state_dict": weights(), "epoch": 3})
    assert {"format", "format_version", "imgclf_version", "model", "classes", "input", "config",
            "state_dict", "epoch"} <= ckpt.keys()
    assert (ckpt["format"], ckpt["format_version"], ckpt["imgclf_version"]) == (FORMAT, FORMAT_VERSION, __version__)
    assert isinstance(ckpt["format_version"], int) and isinstance(ckpt["imgclf_version"], str)
    assert ckpt["model"] == {"name": "resnet18", "num_classes": 2, "in_channels": 1, "img_size": 64}
    assert ckpt["input"] == {"channels": 1, "size": 64, "depth": 8, "mean": [0.5], "std": [0.25]}
    assert type(ckpt["input"]["mean"]) is list and type(ckpt["input"]["std"]) is list  # plain, loadable values
    assert ckpt["classes"] == classes and ckpt["classes"] is not classes  # a copy, not the caller's list
    assert ckpt["config"] == {"data": {"batch_size": 8}} and ckpt["epoch"] == 3  # the state, at the top level
    assert all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values())


def test_what_is_built_loads_with_weights_only(tmp_path):
    ckpt = checkpoint(rng={"torch": torch.get_rng_state(), "cuda": None}, metrics={"val_acc": 0.5}, partial=None)
    torch.save(ckpt, tmp_path / "c.pt")
    assert_same(torch.load(tmp_path / "c.pt", weights_only=True), ckpt)


# ---------------------------------------------------------------- save and load


def test_save_then_load_round_trip(tmp_path):
    ckpt = checkpoint(optimizer={"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]})
    path = tmp_path / "run" / "checkpoints" / "last.pt"  # folders made as needed
    save_checkpoint(path, ckpt)
    assert_same(load_checkpoint(path), ckpt)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left behind
    ckpt["epoch"] = 3
    save_checkpoint(path, ckpt)  # over an older one
    assert load_checkpoint(path)["epoch"] == 3


def test_load_checkpoint_strips_prefixes_and_refuses_newer_formats(tmp_path):
    ckpt = checkpoint()
    ckpt["state_dict"] = {f"module._orig_mod.{k}": v for k, v in ckpt["state_dict"].items()}
    save_checkpoint(tmp_path / "ddp.pt", ckpt)
    assert set(load_checkpoint(tmp_path / "ddp.pt")["state_dict"]) == set(weights())
    newer = checkpoint()
    newer["format_version"] = FORMAT_VERSION + 1
    save_checkpoint(tmp_path / "newer.pt", newer)
    with pytest.raises(UserError, match="written by a newer imgclf"):
        load_checkpoint(tmp_path / "newer.pt")


def test_a_weights_file_that_is_not_an_imgclf_checkpoint(tmp_path):
    torch.save(weights(), tmp_path / "weights.pt")
    assert_same(safe_load(tmp_path / "weights.pt"), weights())  # safe_load takes any safe file
    with pytest.raises(UserError, match="is not an imgclf checkpoint .plain weights go to --pretrained."):
        load_checkpoint(tmp_path / "weights.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(UserError, match="is not an imgclf checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"format": "someone-else", "state_dict": weights()}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="is not an imgclf checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


# ---------------------------------------------------------------- refusals


class RunsShell:
    """Unpickling this calls os.system(command): code that a loader must never run."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("writer", ["torch-zip", "torch-legacy", "plain-pickle", "pickle-protocol-0",
                                    "pickle-protocol-5"])
def test_a_pickle_calling_os_system_is_refused_and_nothing_runs(tmp_path, writer):
    marker = tmp_path / "PWNED"
    payload = {**checkpoint(), "note": RunsShell(f"touch {marker}")}
    path = tmp_path / "hostile.pt"
    if writer.startswith(("plain", "pickle")):
        protocol = int(writer[-1]) if writer[-1].isdigit() else pickle.DEFAULT_PROTOCOL
        path.write_bytes(pickle.dumps(payload if protocol else RunsShell(f"touch {marker}"), protocol=protocol))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch-zip")
    assert not marker.exists()
    with pytest.raises(UserError) as refused:
        safe_load(path)
    assert not marker.exists()
    message = str(refused.value)
    assert message == (f"refused to load {path}: unpickling it would call {os.system.__module__}.system, and a "
                       f"checkpoint holds only tensors and plain values (a hostile file, or one saved from Python "
                       f"objects: save model.state_dict() instead); nothing in it was run")
    with pytest.raises(UserError):
        load_checkpoint(path)
    assert not marker.exists()


def test_the_refusal_names_the_function_it_would_have_called(tmp_path):
    path = tmp_path / "hostile.pt"
    torch.save({**checkpoint(), "note": RunsShell("true")}, path)
    with pytest.raises(UserError, match=f"refused to load .*would call {os.system.__module__}.system"):
        safe_load(path)


@pytest.mark.skipif(sys.platform == "win32", reason="the payload is a POSIX shell command")
def test_the_payload_would_run_if_unpickled_unsafely(tmp_path):
    """The control: the same object, unpickled the unsafe way, does run its command."""
    marker = tmp_path / "PWNED"
    assert pickle.loads(pickle.dumps(RunsShell(f"touch {marker}"))) == 0
    assert marker.exists()


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.0])
def test_a_truncated_file_is_one_clear_error(tmp_path, keep):
    path = tmp_path / "last.pt"
    save_checkpoint(path, checkpoint())
    whole = path.read_bytes()
    path.write_bytes(whole[: int(len(whole) * keep)])
    with pytest.raises(UserError, match=r"cannot read .*last\.pt: not a PyTorch weights file, or (truncated|damaged)"):
        safe_load(path)


def test_not_a_file_at_all(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        safe_load(tmp_path / "missing.pt")
    with pytest.raises(UserError, match=f"^{tmp_path} is a folder, not a checkpoint file; give the path of a .pt"):
        safe_load(tmp_path)
    os.mkfifo(tmp_path / "pipe.pt")  # opened for reading, a FIFO would wait for a writer forever
    with pytest.raises(UserError, match=r"pipe\.pt is a named pipe \(FIFO\), not a checkpoint file"):
        safe_load(tmp_path / "pipe.pt")
    with pytest.raises(UserError, match="^/dev/null is a device, not a checkpoint file"):
        safe_load("/dev/null")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        safe_load(tmp_path / "notes.pt")


def damaged_files() -> list[bytes]:
    """Text; a checkpoint in the legacy format with each of its bytes zeroed in turn (which hits the storage
    keys it holds twice); and 300 checkpoints of both formats with a few bytes changed and cut short."""
    rng = random.Random(0)
    saved = []
    for zipped in (True, False):
        buffer = io.BytesIO()
        torch.save({"a": torch.zeros(3), "b": [1, 2]}, buffer, _use_new_zipfile_serialization=zipped)
        saved.append(buffer.getvalue())
    out = [b"these are my notes", b"(t", b"\x80\x02"]
    out += [saved[1][:i] + b"\0" + saved[1][i + 1 :] for i in range(len(saved[1]))]
    for _ in range(300):
        data = bytearray(rng.choice(saved))
        for _ in range(rng.randrange(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        out.append(bytes(data[: rng.randrange(1, len(data) + 1)]))
    return out


@pytest.mark.slow
def test_any_damaged_bytes_are_one_clear_error(tmp_path):
    path = tmp_path / "damaged.pt"
    escaped = {}
    for data in damaged_files():
        path.write_bytes(data)
        try:
            safe_load(path)
        except UserError as err:
            assert str(path) in str(err) and "\n" not in str(err)
        except Exception as err:  # noqa: BLE001 - what escapes is the finding
            escaped.setdefault(type(err).__name__, data[:20])
    assert escaped == {}


# ---------------------------------------------------------------- prefixes


PREFIXES = ["module.", "_orig_mod."]


@pytest.mark.parametrize("prefix", ["".join(p) for n in range(4) for p in itertools.product(PREFIXES, repeat=n)])
def test_strip_prefixes_in_any_order_and_number(prefix):
    state = {f"{prefix}features.0.weight": 1, f"{prefix}fc.bias": 2}
    assert strip_prefixes(state) == {"features.0.weight": 1, "fc.bias": 2}


def test_strip_prefixes_leaves_other_names_alone():
    state = {"features.module.weight": 1, "module_list.0.bias": 2, "_orig_mod": 3, "my_module.weight": 4}
    assert strip_prefixes(state) == state
    values = [torch.zeros(1), torch.ones(1)]
    stripped = strip_prefixes({"module.a": values[0], "_orig_mod.b": values[1]})
    assert stripped["a"] is values[0] and stripped["b"] is values[1]  # the tensors themselves, not copies
