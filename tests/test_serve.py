"""imgclf serve: the service started as a user would, hit over loopback with good, bad, oversized and concurrent
requests, and its page driven in headless Chromium."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_class_folder

from imgclf.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process trainings: one intra-op thread (conftest)

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

CLASSES = ["circle", "square", "triangle"]
MAX_UPLOAD_MB = 0.2  # small, so that an oversized upload is cheap to send
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def predict_top(ckpt: Path, images: list[Path]) -> dict[str, list[dict]]:
    """`imgclf predict --json` (run in this process) as {path: top list}."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["predict", str(ckpt), *map(str, images), "--json", "--topk", "3", "--device", "cpu"]) == 0
    return {row["path"]: row["top"] for row in map(json.loads, out.getvalue().splitlines())}


@contextlib.contextmanager
def serving(ckpt: Path, log: Path, *extra: str):
    """Run `imgclf serve` in a subprocess on a free loopback port until the block ends; yields the base URL."""
    with serving_process(ckpt, log, *extra) as (url, _):
        yield url


@contextlib.contextmanager
def serving_process(ckpt: Path, log: Path, *extra: str):
    """As `serving`, yielding (base URL, the server's Popen)."""
    port = free_port()
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "imgclf", "serve", str(ckpt), "--port", str(port),
                                 "--device", "cpu", *extra], stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # a readiness wait on a busy machine, not a timing assertion
        while True:
            assert proc.poll() is None, f"imgclf serve exited with {proc.returncode}:\n{log.read_text()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"imgclf serve did not answer:\n{log.read_text()}"
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, list[Path], dict]:
    """tutorial_cnn trained briefly on three classes of 32x32 pictures, held-out pictures, and predict's answers."""
    root = tmp_path_factory.mktemp("serve")
    write_class_folder(root / "data" / "train", CLASSES, 16, size=32, seed=1)
    write_class_folder(root / "data" / "test", CLASSES, 3, size=32, seed=2)
    assert main(["train", "--data", str(root / "data"), "--model", "tutorial_cnn", "--epochs", "3",
                 "--out", str(root / "run"), "--device", "cpu"]) == 0
    ckpt = root / "run" / "checkpoints" / "best.pt"
    images = sorted((root / "data" / "test").glob("*/*.png"))
    return ckpt, images, predict_top(ckpt, images)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    ckpt, _, _ = model
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with serving(ckpt, log, "--max-upload-mb", str(MAX_UPLOAD_MB), "--topk", "3") as url:
        yield url
    text = log.read_text()
    assert "Traceback" not in text, text  # no request, good or bad, crashed a handler


@pytest.mark.slow
def test_health_describes_the_model(server):
    info = httpx.get(f"{server}/health").json()
    assert info["status"] == "ok" and info["model"] == "tutorial_cnn" and info["classes"] == CLASSES
    assert info["input"] == {"size": 32, "channels": 3}
    assert info["max_upload_bytes"] == int(MAX_UPLOAD_MB * 1e6)


@pytest.mark.slow
def test_raw_and_multipart_uploads_answer_like_predict(server, model):
    _, images, predicted = model
    for path in images[:4]:
        raw = httpx.post(f"{server}/predict", content=path.read_bytes(), headers={"content-type": "image/png"})
        form = httpx.post(f"{server}/predict", files={"file": (path.name, path.read_bytes(), "image/png")})
        assert raw.status_code == 200 and form.status_code == 200
        assert form.json()["filename"] == path.name
        for answer in (raw.json()["top"], form.json()["top"]):
            assert [t["label"] for t in answer] == [t["label"] for t in predicted[str(path)]]
            for got, want in zip(answer, predicted[str(path)], strict=True):
                assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)


@pytest.mark.slow
def test_topk_parameter(server, model):
    _, images, _ = model
    body = images[0].read_bytes()
    assert len(httpx.post(f"{server}/predict?topk=1", content=body).json()["top"]) == 1
    assert len(httpx.post(f"{server}/predict?topk=99", content=body).json()["top"]) == 3  # no more than classes
    bad = httpx.post(f"{server}/predict?topk=zero", content=body)
    assert bad.status_code == 400 and bad.json() == {"error": "topk must be a whole number, got 'zero'"}
    assert httpx.post(f"{server}/predict?topk=0", content=body).status_code == 400


@pytest.mark.slow
def test_bad_inputs_get_4xx_with_a_clear_message_and_the_service_goes_on(server, model):
    _, images, predicted = model
    png = images[0].read_bytes()
    cases = [
        (httpx.post(f"{server}/predict", content=b"hello, this is text"), 415, "not a readable picture"),
        (httpx.post(f"{server}/predict", content=png[: len(png) // 2]), 415, "not a readable picture"),
        (httpx.post(f"{server}/predict", files={"file": ("notes.txt", b"plain text", "text/plain")}), 415,
         "not a readable picture"),
        (httpx.post(f"{server}/predict", content=b""), 400, "empty upload"),
        (httpx.post(f"{server}/predict", files={"comment": (None, "no file here")}), 400, "holds no file"),
        (httpx.post(f"{server}/predict", content=b"--xyz\r\nbroken", headers={
            "content-type": "multipart/form-data; boundary=xyz"}), 400, "holds no file"),
        (httpx.post(f"{server}/predict", content=b"--xyz\r\nbroken", headers={
            "content-type": "multipart/form-data"}), 400, "malformed multipart upload"),
        (httpx.post(f"{server}/predict", content=b"\0" * 300_000), 413, "over the 0.2 MB limit"),
        (httpx.post(f"{server}/predict", files={"file": ("big.png", b"\0" * 300_000, "image/png")}), 413,
         "over the 0.2 MB limit"),
        # no Content-Length (chunked): the limit is enforced while reading
        (httpx.post(f"{server}/predict", content=iter([b"\0" * 100_000] * 3)), 413, "over the 0.2 MB limit"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert message in error and "\n" not in error and "BytesIO" not in error
    assert httpx.get(f"{server}/predict").status_code == 405
    good = httpx.post(f"{server}/predict", content=png)
    assert good.status_code == 200 and good.json()["top"][0]["label"] == predicted[str(images[0])][0]["label"]


@pytest.mark.slow
def test_fifty_concurrent_requests_are_batched_without_errors(server, model):
    _, images, predicted = model
    before = httpx.get(f"{server}/health").json()
    picks = [images[i % len(images)] for i in range(50)]

    def ask(path: Path) -> tuple[Path, httpx.Response]:
        return path, httpx.post(f"{server}/predict", content=path.read_bytes(), timeout=120)

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, picks))
    for path, response in answers:
        assert response.status_code == 200, response.text
        assert response.json()["top"][0]["label"] == predicted[str(path)][0]["label"]
    after = httpx.get(f"{server}/health").json()
    assert after["images"] - before["images"] == 50
    # that they share forward passes is shown, independently of timing, by the next test


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_an_int8_export_is_served_with_the_same_json_as_the_checkpoint(server, model, tmp_path, fmt):
    """`imgclf serve best.int8.onnx` (or .xml): the same endpoints, keys, classes and top-1 as the checkpoint."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino" if fmt == "openvino" else "onnx")
    ckpt, images, _ = model
    exported = tmp_path / f"m.int8.{'xml' if fmt == 'openvino' else 'onnx'}"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(ckpt), "--format", fmt, "--int8", "--out", str(exported)]) == 0
    with serving(exported, tmp_path / "serve.log", "--max-upload-mb", str(MAX_UPLOAD_MB), "--topk", "3") as url:
        want, got = httpx.get(f"{server}/health").json(), httpx.get(f"{url}/health").json()
        assert got.keys() == want.keys()
        assert {k: got[k] for k in ("model", "classes", "input", "topk")} == \
               {k: want[k] for k in ("model", "classes", "input", "topk")}
        for path in images:
            for kwargs in ({"content": path.read_bytes()}, {"files": {"file": (path.name, path.read_bytes())}}):
                a, b = httpx.post(f"{server}/predict", **kwargs), httpx.post(f"{url}/predict", **kwargs)
                assert a.status_code == b.status_code == 200
                a, b = a.json(), b.json()
                assert a.keys() == b.keys() and [t.keys() for t in a["top"]] == [t.keys() for t in b["top"]]
                assert {t["label"] for t in b["top"]} == set(CLASSES)
                if a["top"][0]["probability"] - a["top"][1]["probability"] > 0.1:  # not a near tie
                    assert b["top"][0]["label"] == a["top"][0]["label"]
        bad = httpx.post(f"{url}/predict", content=b"hello, this is text")
        assert bad.status_code == 415 and "not a readable picture" in bad.json()["error"]
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


@contextlib.contextmanager
def serving_in_this_process(app):
    """`app` behind uvicorn in a thread of this process, on a free loopback port; yields the base URL."""
    import threading

    import uvicorn

    from imgclf.serve import listening_socket

    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60  # a readiness wait, not a timing assertion
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_requests_queued_during_a_forward_pass_share_the_next_one(model, monkeypatch):
    """Deterministic batching: the first forward pass is held until all 20 requests are in the queue, so the
    other pictures (those not in the first batch) all go through the model together in the second pass."""
    import threading

    from imgclf import serve
    from imgclf.predict import Predictor

    ckpt, images, predicted = model
    count = 20
    queued, changed = [0], threading.Condition()
    real_probabilities = serve.BatchQueue.probabilities

    async def counted(self, image):
        with changed:
            queued[0] += 1
            changed.notify_all()
        # no await before the picture is put in the queue: when the count reaches 20, all 20 are queued
        # before the event loop can run the batching worker again
        return await real_probabilities(self, image)

    class HeldPredictor:
        """The real predictor, but its first forward pass waits until every request has been queued."""

        def __init__(self, predictor):
            self.predictor, self.batches = predictor, []

        def __getattr__(self, name):
            return getattr(self.predictor, name)

        def probabilities(self, batch):
            if not self.batches:
                with changed:
                    assert changed.wait_for(lambda: queued[0] == count, timeout=120), queued
            self.batches.append(len(batch))
            return self.predictor.probabilities(batch)

    monkeypatch.setattr(serve.BatchQueue, "probabilities", counted)
    held = HeldPredictor(Predictor.from_checkpoint(ckpt, device="cpu"))
    app = serve.create_app(held, model_name="tutorial_cnn", max_batch=32)
    picks = [images[i % len(images)] for i in range(count)]
    with serving_in_this_process(app) as url:

        def ask(path: Path) -> tuple[Path, httpx.Response]:
            return path, httpx.post(f"{url}/predict", content=path.read_bytes(), timeout=120)

        with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
            answers = list(pool.map(ask, picks))
        health = httpx.get(f"{url}/health").json()
    for path, response in answers:
        assert response.status_code == 200, response.text
        assert response.json()["top"][0]["label"] == predicted[str(path)][0]["label"]
    assert len(held.batches) == 2 and sum(held.batches) == count, held.batches  # the held one, then the rest
    assert (health["batches"], health["images"], health["largest_batch"]) == (2, count, max(held.batches))
    assert health["batches"] < count  # some requests shared a forward pass
    assert health["largest_batch"] >= 2


@pytest.mark.slow
def test_page_served(server):
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and 'id="drop"' in page.text


def test_serve_refuses_a_taken_port_and_missing_packages(model, capsys, monkeypatch):
    ckpt, _, _ = model
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", str(ckpt), "--port", str(port)]) == 2
    assert capsys.readouterr().err.startswith(f"imgclf: error: cannot listen on 127.0.0.1:{port}: ")
    from imgclf import serve

    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: None)
    assert main(["serve", str(ckpt)]) == 2
    assert capsys.readouterr().err == ("imgclf: error: imgclf serve needs the package(s) starlette, uvicorn, "
                                       "python-multipart: pip install 'imgclf[serve]'\n")


# ---------------------------------------------------------------- hostile uploads (issue 14.4, 14.5)

def png_of(mode: str, side: int) -> bytes:
    """A PNG of side x side pixels of one colour: a few hundred KB at most that decode into gigabytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (side, side), 7 if mode in ("L", "P") else (10, 20, 30, 40)[: len(mode)]).save(buffer, "PNG")
    return buffer.getvalue()


def status_kb(pid: int, field: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


@pytest.mark.slow
def test_concurrent_large_pixel_uploads_keep_the_server_under_a_memory_bound(model, tmp_path):
    """12 concurrent 88-Mpixel PNGs of ~280 KB (6 GB of decoding before) are refused from their header; 12
    concurrent pictures just under the pixel limit are decoded a few at a time: the server's peak resident
    memory (VmHWM) rises by at most what two of the largest decodes take, not by twelve."""
    ckpt, _, _ = model
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc")
    bomb, large = png_of("RGB", 9400), png_of("P", 4400)  # 88.4 and 19.4 million pixels
    assert len(bomb) < 300_000
    with serving_process(ckpt, tmp_path / "serve.log", "--max-upload-mb", "1", "--max-megapixels", "20") \
            as (url, proc):
        httpx.post(f"{url}/predict", content=png_of("RGB", 64), timeout=60)  # warm: the model has run once
        idle = status_kb(proc.pid, "VmRSS")

        def send(body: bytes) -> httpx.Response:
            return httpx.post(f"{url}/predict", content=body, timeout=300)

        with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
            refused = list(pool.map(send, [bomb] * 12))
            after_bombs = status_kb(proc.pid, "VmHWM")
            answered = list(pool.map(send, [large] * 12))
        peak = status_kb(proc.pid, "VmHWM")
        health = httpx.get(f"{url}/health").json()
    for response in refused:
        assert response.status_code == 413, response.text
        assert response.json()["error"] == ("the picture is 9400x9400 pixels (88.4 million to decode), over the 20 "
                                            "million limit (imgclf serve --max-megapixels)")
    assert all(r.status_code == 200 and r.json()["top"] for r in answered)
    assert (after_bombs - idle) / 1024 < 100, (idle, after_bombs)  # refused unread: nothing decoded
    per_pixel = 17  # bytes a palette PNG's decode takes at its peak (RGBA, composite, RGB), measured ~16
    bound_mb = 2 * health["max_pixels"] * per_pixel / 2**20 + 150
    print(f"peak rose by {(peak - idle) / 1024:.0f} MB (bound {bound_mb:.0f} MB)")
    assert (peak - idle) / 1024 < bound_mb, f"peak rose by {(peak - idle) / 1024:.0f} MB, bound {bound_mb:.0f} MB"
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


@pytest.mark.slow
def test_many_concurrent_large_uploads_keep_the_server_under_a_memory_bound(model, tmp_path):
    """Issue 24.6: 64 concurrent uploads of 3.9 MB (a picture and padding Pillow ignores) are read a few at
    a time (serve.UPLOADS_IN_FLIGHT of the largest size), the others waiting unread: the server's peak
    resident memory rises by a few of them, not by all (before: every upload was read whole at once)."""
    from imgclf import serve

    ckpt, images, _ = model
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc")
    mb, count = 4, 64
    body = images[0].read_bytes()
    body += bytes(int((mb - 0.1) * 1e6) - len(body))
    with serving_process(ckpt, tmp_path / "serve.log", "--max-upload-mb", str(mb)) as (url, proc):
        assert httpx.post(f"{url}/predict", content=body, timeout=60).status_code == 200  # warm
        idle = status_kb(proc.pid, "VmHWM")
        with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
            answers = list(pool.map(lambda _: httpx.post(f"{url}/predict", content=body, timeout=300),
                                    range(count)))
        peak = status_kb(proc.pid, "VmHWM")
    assert all(r.status_code == 200 and r.json()["top"] for r in answers)
    rise = (peak - idle) / 1024
    bound = 3 * serve.UPLOADS_IN_FLIGHT * mb * 1e6 / 2**20 + 40  # held, joined, in Pillow's buffer; + slack
    print(f"{count} concurrent {len(body) / 1e6:.1f} MB uploads: peak resident memory rose by {rise:.0f} MB "
          f"(all of them: {count * len(body) / 2**20:.0f} MB; bound {bound:.0f} MB)")
    assert rise < bound, f"peak rose by {rise:.0f} MB, bound {bound:.0f} MB"


@pytest.mark.slow
def _whole_answer(client: socket.socket) -> str:
    """One HTTP answer read from `client` until its body is whole (the server may send the head and the body
    in separate writes, so a single recv can hold the head alone)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _content_length(data):
        chunk = client.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode()


def _content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_an_upload_trickled_for_ever_gives_up_its_share(model, monkeypatch):
    """A client sending its body a byte now and then would hold its share of the uploads in flight for ever:
    after serve.UPLOAD_SECONDS it is answered 408, and the budget is whole again."""
    from imgclf import serve
    from imgclf.predict import Predictor

    ckpt, images, _ = model
    monkeypatch.setattr(serve, "UPLOAD_SECONDS", 0.5)
    app = serve.create_app(Predictor.from_checkpoint(ckpt, device="cpu"), model_name="tutorial_cnn")
    with serving_in_this_process(app) as url, socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) \
            as client:
        client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab")
        client.settimeout(30)
        answer = _whole_answer(client)
        assert httpx.post(f"{url}/predict", content=images[0].read_bytes()).status_code == 200
    assert answer.startswith("HTTP/1.1 408 ") and answer.endswith('{"error":"the upload did not all come within 0.5 s"}')


@pytest.mark.slow
def test_a_client_gone_mid_upload_is_one_line_in_the_log(model, tmp_path):
    ckpt, images, _ = model
    log = tmp_path / "serve.log"
    with serving(ckpt, log) as url:
        port = int(url.rsplit(":", 1)[1])
        for body in (b"", b"--xyz\r\n"):  # a raw upload, and a multipart one, cut short
            kind = b"multipart/form-data; boundary=xyz" if body else b"image/png"
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: " + kind +
                               b"\r\nContent-Length: 100000\r\n\r\n" + body + images[0].read_bytes()[:500])
                time.sleep(0.5)
        deadline = time.monotonic() + 30  # the server notices the closed connections: a readiness wait
        while log.read_text().count("disconnected during its upload") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.post(f"{url}/predict", content=images[0].read_bytes()).status_code == 200  # it goes on
    text = log.read_text()
    lines = [line for line in text.splitlines() if "disconnected" in line]
    assert len(lines) == 2 and all(line.startswith("imgclf: 127.0.0.1:") and
                                   line.endswith(" disconnected during its upload; nothing answered") for line in lines)
    assert "Traceback" not in text and "Exception" not in text, text


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def classify_in_page(page, url: str, picture: Path, screenshot: Path) -> tuple[str, int]:
    """Open the page, pick `picture` with the file chooser, wait for the answer; -> (shown label, bars shown)."""
    page.goto(url)
    page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
    page.set_input_files("#file", str(picture))
    page.wait_for_function("document.getElementById('top-label').textContent.length > 0", timeout=60_000)
    page.screenshot(path=str(screenshot), full_page=True)
    return page.inner_text("#top-label"), page.locator("#results .row").count()


@pytest.mark.slow
def test_page_in_chromium_shows_the_label_for_a_picked_and_a_dropped_picture(server, model, browser, tmp_path):
    _, images, predicted = model
    page = browser.new_page()
    picture = images[-1]
    label, bars = classify_in_page(page, server, picture, tmp_path / "page.png")
    assert label == predicted[str(picture)][0]["label"]
    assert bars == 3
    assert (tmp_path / "page.png").stat().st_size > 5000
    widths = page.eval_on_selector_all("#results .bar span", "spans => spans.map(s => parseFloat(s.style.width))")
    assert widths == sorted(widths, reverse=True) and 0 < widths[0] <= 100

    dropped = images[0]
    data = page.evaluate_handle(
        """([b64, name]) => { const dt = new DataTransfer();
             const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
             dt.items.add(new File([bytes], name, { type: "image/png" })); return dt; }""",
        [base64.b64encode(dropped.read_bytes()).decode(), dropped.name])
    page.dispatch_event("#drop", "drop", {"dataTransfer": data})
    page.wait_for_function(f"document.getElementById('status').textContent === {json.dumps(dropped.name)}")
    assert page.inner_text("#top-label") == predicted[str(dropped)][0]["label"]

    page.set_input_files("#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not a picture"}])
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "not a readable picture" in page.inner_text("#error")
    assert page.inner_text("#top-label") == ""
    page.close()


@pytest.mark.slow
def test_page_in_chromium_labels_an_ants_photo(hymenoptera_dir, browser, tmp_path):
    """A real photo: tutorial_cnn trained briefly on ants/bees at 64 px; a val photo that `imgclf predict` labels
    correctly is uploaded through the page, which must show that same, true, label."""
    assert main(["train", "--data", str(hymenoptera_dir), "--model", "tutorial_cnn", "--img-size", "64",
                 "--epochs", "2", "--out", str(tmp_path / "run"), "--device", "cpu"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    photos = sorted((hymenoptera_dir / "val" / "ants").glob("*.jpg"))[:8]
    photos += sorted((hymenoptera_dir / "val" / "bees").glob("*.jpg"))[:8]
    predicted = predict_top(ckpt, photos)
    right = [p for p in photos if predicted[str(p)][0]["label"] == p.parent.name]
    assert right, "the briefly trained model labels none of 16 photos correctly"
    photo = max(right, key=lambda p: predicted[str(p)][0]["probability"])
    with serving(ckpt, tmp_path / "serve.log") as url:
        page = browser.new_page()
        label, _ = classify_in_page(page, url, photo, tmp_path / "ants-bees.png")
        page.close()
    assert label == photo.parent.name


def test_answers_are_decoded_by_the_predictors_task():
    """serve labels a picture as its predictor's task decodes the probabilities (not by a top-k of its own)."""
    import torch

    from imgclf.serve import create_app

    class EveryLabelOverAHalf:  # a task whose decoding is no top-k: another kind of labelling
        def decode(self, probs, k):
            return [(i, p) for i, p in enumerate(probs.tolist()) if p > 0.5][:k]

    class Fixed:
        classes, size, channels, task = ["a", "b", "c"], 8, 3, EveryLabelOverAHalf()

        def probabilities(self, batch):
            return torch.tensor([[0.9, 0.2, 0.7]]).expand(len(batch), 3)

    with serving_in_this_process(create_app(Fixed(), model_name="fixed")) as url:
        answer = httpx.post(f"{url}/predict?topk=3", content=png_of("RGB", 8), timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"top": [{"label": "a", "probability": 0.9}, {"label": "c", "probability": 0.7}]}
