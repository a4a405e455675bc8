"""A prediction service (note 31 behind HTTP): `imgclf serve CKPT --port P`.

Endpoints:
- `POST /predict`: one picture, as the raw request body (any Content-Type but multipart) or as a multipart
  upload (the first file field); `?topk=N` optional. Answers `{"top": [{"label", "probability"}, ...]}`, most
  probable first, or a 4xx with `{"error": "<one line>"}`: 400 empty or malformed body or bad topk, 413 over
  the upload limit or over the pixel limit (read from the picture's header, before decoding), 415 not a
  readable picture, 408 an upload that has not all come within UPLOAD_SECONDS. Uploads are read a few at a
  time (`Budget`: UPLOADS_IN_FLIGHT of the largest size, more smaller ones; the others wait unread) and
  decoded a few at a time (`DecodeGate`), so concurrent uploads cannot take the memory.
- `GET /health`: `{"status": "ok", ...}` with the model, classes, input and limits, and batching counters.
- `GET /`: a page where a person picks or drops a picture and sees the top-k with bars.

Pictures are decoded in worker threads exactly as `imgclf predict` decodes files; the decoded pictures of
concurrent requests are queued and run through the model in batches by one worker (`BatchQueue`), so the model
is only ever used by one thread and simultaneous requests share forward passes.

Starlette, uvicorn and python-multipart are imported only when the service starts (`pip install 'imgclf[serve]'`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import io
import os
import socket
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from imgclf.calibration import is_unknown
from imgclf.errors import UserError
from imgclf.tasks import MULTILABEL

REQUIRES = {"starlette": "starlette", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}
MULTIPART_SLACK = 64 * 1024  # room for multipart boundaries and part headers around a file at the limit
MAX_PIXELS = 40_000_000  # largest picture decoded by default (pixels as decoded: a JPEG's reduced scale counts)
UPLOADS_IN_FLIGHT = 4  # uploads of the largest size held at once (smaller ones: more, as their bytes allow)
UPLOAD_SECONDS = 60.0  # for the whole of one upload: a client trickling its body gives up its share then


class UploadTooLarge(Exception):
    pass


class UploadTooSlow(Exception):
    pass


class Budget:
    """At most `total` units (bytes of uploads held) taken at once; a request for more than what is left
    waits its turn, one for more than all of it is admitted alone."""

    def __init__(self, total: int):
        self.total, self.taken = total, 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def take(self, amount: int):
        async with self._changed:
            await self._changed.wait_for(lambda: self.taken == 0 or self.taken + amount <= self.total)
            self.taken += amount
        try:
            yield
        finally:
            async with self._changed:
                self.taken -= amount
                self._changed.notify_all()


class TooManyPixels(ValueError):
    """A picture whose header announces more pixels than the service decodes; the message says how many."""


class DecodeGate:
    """Bounds the decodes running at once, so that concurrent uploads cannot take the memory: at most
    `slots` (the CPU count: more would only queue for the cores) and at most `budget` pixels together (a
    decode takes up to ~16 bytes per pixel: RGBA, composited on white, converted). A picture is admitted
    when both fit, or alone when nothing else is decoding."""

    def __init__(self, slots: int, budget: int):
        self.slots, self.budget = slots, budget
        self.running, self.pixels = 0, 0
        self._changed = asyncio.Condition()
        # decodes run on these threads alone: few threads, few malloc arenas holding freed memory
        self.threads = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="imgclf-decode")

    async def run(self, pixels: int, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` on a decode thread once `pixels` more fit (see the class)."""
        async with self.admit(pixels):
            call = functools.partial(fn, *args, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(self.threads, call)

    @contextlib.asynccontextmanager
    async def admit(self, pixels: int):
        async with self._changed:
            await self._changed.wait_for(lambda: self.running == 0 or (
                self.running < self.slots and self.pixels + pixels <= self.budget))
            self.running, self.pixels = self.running + 1, self.pixels + pixels
        try:
            yield
        finally:
            async with self._changed:
                self.running, self.pixels = self.running - 1, self.pixels - pixels
                self._changed.notify_all()


def decoded_pixels(data: bytes, *, size: int, channels: int, max_pixels: int) -> int:
    """Pixels that decoding `data` for a model input of `size` will produce, read from the header alone (a
    JPEG decodes at a reduced scale: its draft size counts). TooManyPixels above `max_pixels`; BadImage
    when there is no header Pillow knows."""
    from PIL import Image

    from imgclf.transforms import BadImage

    buffer = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own decompression-bomb warning: the limit is checked here
            with Image.open(buffer) as img:
                full = img.size
                img.draft("RGB" if channels == 3 else "L", (size, size))  # JPEG only; no pixels decoded here
                width, height = img.size
    except Image.DecompressionBombError as err:  # over twice Pillow's own limit: refused as too large
        raise TooManyPixels(f"the picture is over the {max_pixels / 1e6:g} million pixel limit (imgclf serve "
                            f"--max-megapixels): {str(err).splitlines()[0]}") from None
    except Exception as err:  # noqa: BLE001 - Pillow raises many kinds for bytes that are no picture
        reason = str(err).splitlines()[0].replace(" " + repr(buffer), "") if str(err) else type(err).__name__
        raise BadImage(reason) from None  # Pillow names the file object; the user knows it as the upload
    if width * height > max_pixels:
        raise TooManyPixels(f"the picture is {full[0]}x{full[1]} pixels ({width * height / 1e6:.1f} million to "
                            f"decode), over the {max_pixels / 1e6:g} million limit (imgclf serve --max-megapixels)")
    return width * height


def band_pixels(data: bytes, *, max_pixels: int) -> int:
    """`decoded_pixels` for a multi-band or 16-bit picture (imgclf.bands): its full size, from its header."""
    from imgclf.bands import header_size

    width, height = header_size(data)
    if width * height > max_pixels:
        raise TooManyPixels(f"the picture is {width}x{height} pixels, over the {max_pixels / 1e6:g} million limit "
                            f"(imgclf serve --max-megapixels)")
    return width * height


@dataclass
class BatchStats:
    batches: int = 0  # forward passes run
    images: int = 0  # pictures answered
    largest_batch: int = 0


class BatchQueue:
    """Collects decoded pictures from concurrent requests and runs them through `predictor` in batches.

    One worker task takes the first waiting picture, yields briefly so that pictures arriving together can join
    it, then runs up to `max_batch` of them in a thread. Each caller awaits its own row of probabilities.
    """

    def __init__(self, predictor, *, max_batch: int = 32, gather_s: float = 0.002):
        self.predictor = predictor
        self.max_batch = max_batch
        self.gather_s = gather_s
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def probabilities(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (C, S, S) -> probabilities (classes,)."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((image, future))
        return await future

    async def _run(self) -> None:
        while True:
            items = [await self._queue.get()]
            await asyncio.sleep(self.gather_s)  # let requests that arrive together share one forward pass
            while len(items) < self.max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            batch = torch.from_numpy(np.stack([image for image, _ in items]))  # (N, C, S, S) uint8
            try:
                probs = await asyncio.to_thread(self.predictor.probabilities, batch)
            except Exception as err:  # noqa: BLE001 - every waiting request gets the error, the worker lives on
                for _, future in items:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.stats.batches += 1
            self.stats.images += len(items)
            self.stats.largest_batch = max(self.stats.largest_batch, len(items))
            for (_, future), row in zip(items, probs, strict=True):
                if not future.done():  # the client may have gone away
                    future.set_result(row)


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with UploadTooLarge as soon as it is known to exceed `limit` bytes, and
    with UploadTooSlow when it has not all come within UPLOAD_SECONDS."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadTooLarge
    chunks, total = [], 0
    try:
        async with asyncio.timeout(UPLOAD_SECONDS):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise UploadTooLarge
                chunks.append(chunk)
    except TimeoutError:
        raise UploadTooSlow from None
    return b"".join(chunks)


def labelled(predictor, probs, k: int) -> dict:
    """One picture's answer, as `imgclf predict --json` prints it: {"top": its labels (the task's decoding: the
    `k` most probable classes, or a multi-label model's every class over its threshold)}, and for a
    multi-label model "scores": every class's probability; with a `reject_below` cut (single-label,
    imgclf.calibration) also "scores" and "unknown" (whether the top probability is under the cut)."""
    classes, task = predictor.classes, predictor.task
    answer = {"top": [{"label": classes[i], "probability": round(v, 6)} for i, v in task.decode(probs, k)]}
    below = getattr(predictor, "reject_below", None)
    if getattr(task, "name", None) == MULTILABEL or below is not None:  # (an API task may have no name)
        answer["scores"] = {c: round(v, 6) for c, v in zip(classes, probs.tolist(), strict=True)}
    if below is not None and getattr(task, "name", None) != MULTILABEL:
        answer["unknown"] = is_unknown(float(probs.max()), below)
    return answer


def held_bytes(request, max_upload_bytes: int) -> int:
    """The bytes an upload will hold: its Content-Length when declared (within the limit), else the most
    it may be (a chunked upload)."""
    most = max_upload_bytes + MULTIPART_SLACK
    declared = request.headers.get("content-length", "")
    return min(int(declared), most) if declared.isdigit() else most


def describe(predictor, queue) -> dict:
    """What /health says of the model and of the batching so far."""
    return {"classes": predictor.classes, "input": {"size": predictor.size, "channels": predictor.channels},
            "batches": queue.stats.batches, "images": queue.stats.images, "largest_batch": queue.stats.largest_batch}


def requested_topk(query, default: int) -> int:
    """The `?topk=N` of a request (else `default`); ValueError with the message when it is not a count."""
    try:
        k = int(query.get("topk", default))
    except ValueError:
        raise ValueError(f"topk must be a whole number, got {query['topk']!r}") from None
    if k < 1:
        raise ValueError(f"topk must be at least 1, got {k}")
    return k


async def upload_bytes(request, max_upload_bytes: int) -> tuple[bytes, str | None]:
    """The picture's bytes and file name (None for a raw body); raises ValueError with the message, or
    UploadTooLarge."""
    from starlette.requests import Request

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await read_body(request, max_upload_bytes), None
    body = await read_body(request, max_upload_bytes + MULTIPART_SLACK)

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except Exception as err:  # noqa: BLE001 - python-multipart and Starlette raise several kinds
        raise ValueError(f"malformed multipart upload ({getattr(err, 'detail', err)})") from None
    files = [v for v in form.values() if hasattr(v, "read") and hasattr(v, "filename")]
    if not files:
        raise ValueError("the multipart upload holds no file; send the picture in a file field named 'file'")
    data = await files[0].read()
    await form.close()
    if len(data) > max_upload_bytes:
        raise UploadTooLarge
    return data, files[0].filename


class Refused(Exception):
    """A request answered without a prediction: its HTTP status and one-line message (None: no body)."""

    def __init__(self, status: int, message: str | None = None):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Service:
    """What the endpoints of one application share: the predictor, its batch queue, the decode gate and the
    limits (create_app's arguments)."""
    predictor: object
    queue: BatchQueue
    gate: DecodeGate
    uploads: Budget  # bytes of uploads held at once, from the first byte read to the end of their decode
    model_name: str
    max_upload_bytes: int
    topk: int
    max_batch: int
    max_pixels: int

    async def predict(self, request):
        """POST /predict: the `topk` most probable classes of the uploaded picture, or a Refused answer."""
        from starlette.responses import JSONResponse, Response

        try:
            async with self.uploads.take(held_bytes(request, self.max_upload_bytes)):
                k, image, filename = await self.picture(request)
        except Refused as no:
            if no.message is None:
                return Response(status_code=no.status)
            return JSONResponse({"error": no.message}, status_code=no.status)
        probs = await self.queue.probabilities(image.transpose(2, 0, 1))
        answer = labelled(self.predictor, probs, k)
        return JSONResponse(answer if filename is None else {**answer, "filename": filename})

    async def picture(self, request):
        """(topk asked, the decoded picture, its file name or None) of a request; Refused when it has none.
        The upload's bytes are let go on return."""
        k, data, filename = await self.upload(request)
        return k, await self.decode(data), filename

    async def upload(self, request) -> tuple[int, bytes, str | None]:
        """(topk asked, the picture's bytes, its file name or None) of a request; Refused when it has none."""
        from starlette.requests import ClientDisconnect

        try:
            k = requested_topk(request.query_params, self.topk)
            data, filename = await upload_bytes(request, self.max_upload_bytes)
        except UploadTooLarge:
            raise Refused(413, f"upload is over the {self.max_upload_bytes / 1e6:g} MB limit "
                               f"(imgclf serve --max-upload-mb)") from None
        except UploadTooSlow:
            raise Refused(408, f"the upload did not all come within {UPLOAD_SECONDS:g} s") from None
        except ValueError as err:
            raise Refused(400, str(err)) from None
        except ClientDisconnect:  # nobody is left to answer: one line in the log, not a traceback
            client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
            print(f"imgclf: {client} disconnected during its upload; nothing answered", file=sys.stderr, flush=True)
            raise Refused(400) from None
        if not data:
            raise Refused(400, "empty upload: send a picture (JPEG, PNG, ...) as the body or as a file field")
        return k, data, filename

    async def decode(self, data: bytes):
        """The picture of `data` as the predictor takes it (HWC), decoded under the gate; Refused if it is too
        large or no picture."""
        from imgclf import bands
        from imgclf.transforms import PLAIN, BadImage, load_image

        buffer = io.BytesIO(data)
        shape = {"size": self.predictor.size, "channels": self.predictor.channels}
        depth = getattr(self.predictor, "depth", 8)
        decoding = getattr(self.predictor, "decoding", PLAIN)  # a pretrained network's resize and crop
        try:
            if not bands.is_plain(shape["channels"], depth):  # multi-band or 16-bit pictures (imgclf.bands)
                pixels = await asyncio.to_thread(band_pixels, data, max_pixels=self.max_pixels)
                return await self.gate.run(pixels, bands.load_bands, buffer, **shape, depth=depth,
                                           decoding=decoding)
            pixels = await asyncio.to_thread(decoded_pixels, data, **shape, max_pixels=self.max_pixels)
            return await self.gate.run(pixels, load_image, buffer, **shape, decoding=decoding)
        except TooManyPixels as err:
            raise Refused(413, str(err)) from None
        except BadImage as err:  # Pillow names the file object in its message; the user knows it as the upload
            raise Refused(415, f"not a readable picture: {str(err).replace(' ' + repr(buffer), '')}") from None

    async def health(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", "model": self.model_name, **describe(self.predictor, self.queue),
                             "topk": self.topk, "max_upload_bytes": self.max_upload_bytes,
                             "max_batch": self.max_batch, "max_pixels": self.max_pixels,
                             "decode_slots": self.gate.slots})

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        await self.queue.start()
        try:
            yield
        finally:
            await self.queue.stop()
            self.gate.threads.shutdown(wait=False, cancel_futures=True)


def create_app(predictor, *, model_name: str, max_upload_bytes: int = 10_000_000, topk: int = 5,
               max_batch: int = 32, max_pixels: int = MAX_PIXELS, decode_slots: int | None = None):
    """The Starlette application serving `predictor` (an imgclf.predict.Predictor). Pictures over
    `max_pixels` are refused from their header; decodes run `decode_slots` (the CPU count) at a time and
    at most two of the largest pictures' pixels together (see DecodeGate). Uploads are read, and held
    until decoded, UPLOADS_IN_FLIGHT of the largest size at a time (more of smaller ones: `Budget`); the
    others wait unread, in the connection's buffers."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    service = Service(predictor, BatchQueue(predictor, max_batch=max_batch),
                      DecodeGate(decode_slots or len(os.sched_getaffinity(0)), 2 * max_pixels),
                      Budget(UPLOADS_IN_FLIGHT * (max_upload_bytes + MULTIPART_SLACK)), model_name,
                      max_upload_bytes, topk, max_batch, max_pixels)
    page = (resources.files("imgclf") / "static" / "index.html").read_text(encoding="utf-8")

    async def index(request) -> HTMLResponse:
        return HTMLResponse(page)

    routes = [Route("/", index), Route("/health", service.health), Route("/predict", service.predict, methods=["POST"])]
    return Starlette(routes=routes, lifespan=service.lifespan)


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind host:port now, so that a taken port or an unknown host is one clear error before anything loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise UserError(f"cannot use --host {host}: {err.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror}; choose another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def check_requirements() -> None:
    missing = [pip for module, pip in REQUIRES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"imgclf serve needs the package(s) {', '.join(missing)}: pip install 'imgclf[serve]'")


def serve_checkpoint(checkpoint, *, host: str = "127.0.0.1", port: int = 8000, topk: int = 5,
                     max_upload_mb: float = 10.0, max_batch: int = 32, device: str = "auto",
                     max_megapixels: float = MAX_PIXELS / 1e6, reject_below: float | None = None) -> None:
    """Serve `checkpoint` (or a model it exported: .onnx, OpenVINO .xml, TorchScript) on host:port until stopped
    (Ctrl+C, SIGTERM): `imgclf serve`. The port is bound before the checkpoint loads, so that a taken port is
    one clear error at once. `reject_below`: answer "unknown" under that top probability (Predictor.reject)."""
    check_requirements()
    import uvicorn

    from imgclf.predict import Predictor

    sock = listening_socket(host, port)
    predictor = Predictor.from_path(checkpoint, device=device)  # a checkpoint or an exported .onnx / .xml
    predictor.reject(reject_below)
    app = create_app(predictor, model_name=predictor.model_name, max_upload_bytes=int(max_upload_mb * 1e6),
                     topk=topk, max_batch=max_batch, max_pixels=int(max_megapixels * 1e6))
    shown = f"[{host}]" if ":" in host else host
    print(f"imgclf: serving {predictor.model_name} ({len(predictor.classes)} classes) on "
          f"http://{shown}:{port}/ (Ctrl+C stops)", file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"imgclf: note: --host {host} lets other machines reach the service, which has no "
              f"authentication and no TLS", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])
