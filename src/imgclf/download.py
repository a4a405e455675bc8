"""A picture fetched from an http(s) URL with bounds on the whole download: its bytes and its time.

A socket timeout bounds each read alone, so a server that sends a byte now and then (in its headers or its
body) would keep a download going for ever; here a timer ends every connection of the download when its
time is up, wherever it waits. No torch here.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class DownloadFailed(Exception):
    """A download that did not complete; the message says why in a few words."""


def download(url: str, *, max_bytes: int, seconds: float) -> bytes:
    """The body at `url` (http or https, redirects followed), at most `max_bytes` + 1 bytes of it (more
    means over the limit: the caller says so), within `seconds` in all, connection and redirects included.
    DownloadFailed when it cannot be fetched or takes longer."""
    import http.client
    import urllib.error
    import urllib.request

    deadline = _Deadline(seconds)
    opener = urllib.request.build_opener(*_watched_handlers(deadline))
    try:
        with deadline, opener.open(url, timeout=seconds) as response:
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:  # InvalidURL, BadStatusLine...
        if deadline.expired:
            raise DownloadFailed(f"not downloaded within {seconds:g} s") from None
        reason = getattr(err, "reason", None) or err
        raise DownloadFailed(str(reason).splitlines()[0][:160] if str(reason) else type(err).__name__) from None
    if deadline.expired:  # the connection was cut: what was read is only a part
        raise DownloadFailed(f"not downloaded within {seconds:g} s")
    return data


class _Deadline:
    """While in its `with` block, the sockets `watch`ed are shut down `seconds` after the block began (a
    shutdown wakes a thread blocked on the socket); `expired` tells whether that happened."""

    def __init__(self, seconds: float):
        self.seconds, self.expired = seconds, False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _cut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _cut(sock)


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


def _watched_handlers(deadline: _Deadline) -> list:
    """urllib handlers for http and https whose connections are `deadline.watch`ed once connected."""
    import http.client
    import urllib.request

    def watched(base):
        class Connection(base):
            def connect(self):
                super().connect()
                deadline.watch(self.sock)

        return Connection

    plain, secure = watched(http.client.HTTPConnection), watched(http.client.HTTPSConnection)

    class Plain(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(plain, req)

    class Secure(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(secure, req, context=self._context)

    return [Plain(), Secure()]
