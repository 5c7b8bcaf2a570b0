"""A WSGI app behind ASGI (``@wsgi_app``), streaming both ways.

Each request runs the WSGI app in a worker thread. ``wsgi.input`` pulls the request body
from the ASGI ``receive`` on demand (so an upload streams, with uvicorn's backpressure),
and each chunk of the response iterable is sent as it is produced (so a streamed or
chunked response is not buffered whole). ``SCRIPT_NAME`` is the gateway's path prefix
(``x-forwarded-prefix``), so ``url_for`` and friends build links that work behind it.
"""

from __future__ import annotations

import asyncio
import io
import sys
from concurrent.futures import ThreadPoolExecutor

MAX_THREADS = 64


class _Input(io.RawIOBase):
    """``wsgi.input``: reads the body from the event loop's ``receive`` when asked."""

    def __init__(self, receive, loop: asyncio.AbstractEventLoop) -> None:
        self._receive = receive
        self._loop = loop
        self._buf = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def _more(self) -> bool:
        if self._eof:
            return False
        msg = asyncio.run_coroutine_threadsafe(self._receive(), self._loop).result()
        if msg["type"] != "http.request":
            self._eof = True
            return False
        self._buf += msg.get("body", b"")
        if not msg.get("more_body", False):
            self._eof = True
        return True

    def read(self, size: int = -1) -> bytes:
        while (size < 0 or len(self._buf) < size) and self._more():
            pass
        if size < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:size], self._buf[size:]
        return out

    def readline(self, size: int | None = -1) -> bytes:
        if size is None:
            size = -1
        while b"\n" not in self._buf and (size < 0 or len(self._buf) < size) and self._more():
            pass
        end = self._buf.find(b"\n") + 1 or len(self._buf)
        if size >= 0:
            end = min(end, size)
        out, self._buf = self._buf[:end], self._buf[end:]
        return out

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self):
        return iter(self.readline, b"")


def _environ(scope: dict, body: _Input) -> dict:
    headers = scope["headers"]
    prefix = ""
    env = {
        "REQUEST_METHOD": scope["method"],
        "PATH_INFO": scope["path"].encode("utf-8").decode("latin-1"),
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
    for name, value in headers:
        key = name.decode("latin-1").upper().replace("-", "_")
        val = value.decode("latin-1")
        if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
            env[key] = val
            continue
        if key == "HOST":
            host, _, port = val.rpartition(":") if ":" in val else (val, "", "")
            env["SERVER_NAME"] = host or val
            env["SERVER_PORT"] = port or "80"
        elif key == "X_FORWARDED_PREFIX":
            prefix = val
        key = "HTTP_" + key
        env[key] = env[key] + "," + val if key in env else val
    env["SCRIPT_NAME"] = prefix
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
