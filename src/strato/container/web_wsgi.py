"""A WSGI app behind ASGI (``@wsgi_app``), streaming both ways.

Each request runs the WSGI app in a worker thread. ``wsgi.input`` pulls the request body
from the ASGI ``receive`` on demand (so an upload streams, with uvicorn's backpressure),
and each chunk of the response iterable is sent as it is produced (so a streamed or
chunked response is not buffered whole). ``SCRIPT_NAME`` is the ASGI ``root_path`` (the
gateway's path prefix), so ``url_for`` and friends build links that work behind it. An
exception of the app after the response's head went out propagates, so that the server
cuts the connection rather than end a truncated response as if it were whole.
"""

from __future__ import annotations

import asyncio
import io
import sys
from asyncio import AbstractEventLoop
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MAX_THREADS = 64


class _Input(io.RawIOBase):
    """``wsgi.input``: reads the body from the event loop's ``receive`` when asked. A raw
    stream with ``readinto`` (werkzeug's ``LimitedStream`` reads through it), ``read``,
    ``readline`` and iteration."""

    def __init__(
        self, receive: Callable[[], Coroutine[Any, Any, dict[str, Any]]], loop: AbstractEventLoop
    ) -> None:
        super().__init__()
        self._receive = receive
        self._loop = loop
        self._buf = bytearray()
        self._eof = False

    def readable(self) -> bool:
        return True

    def _more(self) -> bool:
        """Receive the next piece of the body into the buffer; False at its end."""
        if self._eof:
            return False
        msg = asyncio.run_coroutine_threadsafe(self._receive(), self._loop).result()
        if msg["type"] != "http.request":  # http.disconnect: the body ends here
            self._eof = True
            return False
        self._buf += msg.get("body", b"")
        if not msg.get("more_body", False):
            self._eof = True
        return True

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        while not self._buf and self._more():
            pass
        n = min(len(view), len(self._buf))
        view[:n] = self._buf[:n]
        del self._buf[:n]
        return n

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            while self._more():
                pass
            return self._take(len(self._buf))
        while len(self._buf) < size and self._more():
            pass
        return self._take(size)

    def readall(self) -> bytes:
        return self.read(-1)

    def readline(self, size: int | None = -1) -> bytes:
        if size is None:
            size = -1
        while b"\n" not in self._buf and (size < 0 or len(self._buf) < size) and self._more():
            pass
        end = self._buf.find(b"\n") + 1 or len(self._buf)
        if size >= 0:
            end = min(end, size)
        return self._take(end)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


def _environ(scope: dict[str, Any], body: _Input) -> dict[str, Any]:
    # behind a path-based URL the ASGI root_path is the gateway's /<app>/<label> prefix and
    # path starts with it (EdgeMiddleware); WSGI splits them as SCRIPT_NAME and PATH_INFO
    root = scope.get("root_path", "")
    path = scope["path"]
    if root and path.startswith(root):
        path = path[len(root) :]
    env: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": root.encode("utf-8").decode("latin-1"),
        "PATH_INFO": path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "REMOTE_ADDR": (scope.get("client") or ("", 0))[0],
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for name, value in scope["headers"]:
        key = name.decode("latin-1").upper().replace("-", "_")
        val = value.decode("latin-1")
        if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
            env[key] = val
            continue
        if key == "HOST":
            host, _, port = val.rpartition(":") if ":" in val else (val, "", "")
            env["SERVER_NAME"] = host or val
            env["SERVER_PORT"] = port or "80"
        key = "HTTP_" + key
        env[key] = env[key] + "," + val if key in env else val
    return env


class WsgiToAsgi:
    def __init__(self, wsgi_app) -> None:
        self.wsgi_app = wsgi_app
        self.pool = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="strato-wsgi")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                kind = msg["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return  # WSGI has no WebSockets: uvicorn closes the connection
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.pool, self._run, scope, receive, send, loop)

    def _run(self, scope, receive, send, loop) -> None:
        def emit(message) -> None:
            asyncio.run_coroutine_threadsafe(send(message), loop).result()

        started: list = []
        head: list = []

        def start_response(status, headers, exc_info=None):
            if exc_info is not None and started:
                raise exc_info[1].with_traceback(exc_info[2])
            head[:] = [status, headers]
            return lambda data: write(data)

        def write(data: bytes) -> None:
            if not started:
                status, headers = head
                emit(
                    {
                        "type": "http.response.start",
                        "status": int(status.split(" ", 1)[0]),
                        "headers": [
                            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers
                        ],
                    }
                )
                started.append(True)
            if data:
                emit({"type": "http.response.body", "body": data, "more_body": True})

        result = self.wsgi_app(_environ(scope, _Input(receive, loop)), start_response)
        try:
            for chunk in result:
                write(chunk)
            if not started:
                write(b"")
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        emit({"type": "http.response.body", "body": b"", "more_body": False})
