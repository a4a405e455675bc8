"""TensorBoard for real: the `tensorboard` server, on loopback, serves a fresh run's scalars, images, graph and
hyper-parameters through its HTTP API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import write_class_folder

from imgclf.cli import main

CLASSES = ["circle", "square", "triangle"]
pytestmark = pytest.mark.slow  # a real TensorBoard server, started and asked over HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base: str, path: str, *, body: dict | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"X-XSRF-Protected": "1", "Content-Type": "application/json"} if body is not None else {}
    with urllib.request.urlopen(urllib.request.Request(base + path, data=data, headers=headers), timeout=10) as r:
        return r.read()


def get_json(base: str, path: str, **kwargs):
    return json.loads(get(base, path, **kwargs))


def wait_for(what, *, timeout: float = 90.0, every: float = 0.5):
    """Poll `what()` until it returns something truthy (TensorBoard reads event files in the background)."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = what()
            if value:
                return value
        except (urllib.error.URLError, ConnectionError, OSError, KeyError) as err:
            last_error = err
        time.sleep(every)
    raise AssertionError(f"TensorBoard did not serve it within {timeout}s (last error: {last_error})")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tb")
    write_class_folder(root / "data" / "train", CLASSES, 12, seed=1)
    write_class_folder(root / "data" / "test", CLASSES, 6, seed=2)
    run = root / "run"
    assert main(["train", "--data", str(root / "data"), "--epochs", "2", "--batch-size", "12", "--log-every", "1",
                 "--lr", "0.02", "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def server(run_dir):
    exe = Path(sys.executable).with_name("tensorboard")
    if not exe.exists():
        pytest.skip("the tensorboard script is not installed beside this Python")
    port = free_port()
    proc = subprocess.Popen([str(exe), "--logdir", str(run_dir), "--port", str(port), "--host", "127.0.0.1",
                             "--load_fast", "false", "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is None and get_json(base, "/data/plugins_listing"))
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_plugins_with_data_are_active(server):
    plugins = wait_for(lambda: (p := get_json(server, "/data/plugins_listing"))["hparams"]["enabled"] and p)
    for name in ("scalars", "images", "graphs", "hparams"):
        assert plugins[name]["enabled"], name


def test_scalars_of_the_run_are_served(server, run_dir):
    tags = wait_for(lambda: get_json(server, "/data/plugin/scalars/tags").get("."))
    assert {"train/loss", "train/lr", "val/acc", "val/loss", "train/acc", "epoch/val_acc"} <= set(tags)
    assert {f"test_class/{c}" for c in CLASSES} <= set(tags)
    points = get_json(server, "/data/plugin/scalars/scalars?" + urllib.parse.urlencode({"run": ".", "tag": "epoch/val_acc"}))
    assert [step for _, step, _ in points] == [1, 2]
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert points[-1][2] == pytest.approx(last["val_acc"], abs=1e-6)


def test_images_of_the_run_are_served_as_pngs(server):
    tags = wait_for(lambda: get_json(server, "/data/plugin/images/tags").get("."))
    assert {"train/batch", "report/curves", "report/confusion", "report/mistakes", "report/per_class"} <= set(tags)
    entries = get_json(server, "/data/plugin/images/images?" + urllib.parse.urlencode({"run": ".", "tag": "report/confusion"}))
    assert entries and entries[-1]["step"] == 2
    png = get(server, "/data/plugin/images/individualImage?" + entries[-1]["query"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_graph_of_the_model_is_served(server):
    info = wait_for(lambda: get_json(server, "/data/plugin/graphs/info").get("."))
    assert info["run_graph"]
    graph = get(server, "/data/plugin/graphs/graph?" + urllib.parse.urlencode({"run": ".", "conceptual": "false"}))
    text = graph.decode()
    assert "Conv2d" in text and "MaxPool2d" in text and "Linear" in text


def test_hparams_of_the_run_are_served(server):
    experiment = wait_for(lambda: get_json(server, "/data/plugin/hparams/experiment", body={"experimentName": ""}
                                           ).get("hparamInfos"), timeout=30)
    names = {h["name"] for h in experiment}
    assert {"optim.lr", "data.batch_size", "model.name", "optim.epochs"} <= names
    groups = get_json(server, "/data/plugin/hparams/session_groups",
                      body={"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
                            "colParams": [], "startIndex": 0, "sliceSize": 10})
    session = groups["sessionGroups"][0]
    assert session["hparams"]["optim.lr"] == 0.02 and session["hparams"]["model.name"] == "tutorial_cnn"
    metrics = {m["name"]["tag"]: m["value"] for m in session["sessions"][0]["metricValues"]}
    assert 0.0 <= metrics["val/acc"] <= 1.0
