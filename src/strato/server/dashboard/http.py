"""The little HTTP the dashboard needs on top of raw ASGI: a parsed request, whole
responses with headers (cookies, redirects), and server-sent event streams.

The API's router (``server/api/router.py``) stays lean: msgpack replies without headers.
The dashboard's few extra needs live here instead of in the hot path of every call."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl

from ..workspaces import ANONYMOUS, Caller

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MAX_FORM = 64 << 10
STOP_CHECK_S = 0.5
HTML = "text/html; charset=utf-8"
# the pages load scripts and styles from /ui/static only; nothing may frame them
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        b"img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
        b"form-action 'self'; base-uri 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


class BodyTooLarge(Exception):
    pass


@dataclass
class Request:
    scope: Scope
    receive: Receive
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    cookies: dict[str, str]
    path_params: dict[str, str] = field(default_factory=dict)
    _form: dict[str, str] | None = None
    caller: Caller = ANONYMOUS  # who is logged in (``auth.py``), once checked

    @classmethod
    def of(cls, scope: Scope, receive: Receive) -> Request:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(headers.get("cookie", ""))
        except Exception:  # a malformed cookie header: no cookies
            pass
        qs = (scope.get("query_string") or b"").decode("latin-1")
        return cls(
            scope,
            receive,
            scope["method"],
            scope["path"],
            dict(parse_qsl(qs)),
            headers,
            {k: v.value for k, v in jar.items()},
        )

    @property
    def secure(self) -> bool:
        return self.scope.get("scheme") == "https"

    @property
    def client_host(self) -> str:
        client = self.scope.get("client")
        return str(client[0]) if client else ""

    async def body(self, limit: int = MAX_FORM) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"a form over {limit} bytes")
            chunks.append(chunk)
            if not msg.get("more_body"):
                break
        return b"".join(chunks)

    async def form(self) -> dict[str, str]:
        if self._form is None:
            ctype = self.headers.get("content-type", "")
            raw = await self.body()
            self._form = (
                dict(parse_qsl(raw.decode("utf-8", "replace")))
                if "application/x-www-form-urlencoded" in ctype
                else {}
            )
        return self._form


@dataclass
class Response:
    body: bytes = b""
    status: int = 200
    content_type: str = HTML
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def send(self, send: Send) -> None:
        headers = [
            (b"content-type", self.content_type.encode()),
            (b"content-length", str(len(self.body)).encode()),
            (b"cache-control", b"no-store"),
            *SECURITY_HEADERS,
            *self.headers,
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def redirect(location: str, status: int = 303, headers: list | None = None) -> Response:
    return Response(b"", status, headers=[(b"location", location.encode()), *(headers or [])])


def text(body: str, status: int = 200, content_type: str = "text/plain; charset=utf-8"):
    return Response(body.encode(), status, content_type)


def sse_event(event: str, data: str) -> bytes:
    """One server-sent event; ``data`` may span lines."""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {event}\n{lines}\n".encode()


async def stream_events(
    req: Request,
    send: Send,
    events: AsyncIterator[bytes],
    stopping: Callable[[], bool] = lambda: False,
    max_s: float = 55.0,
) -> None:
    """Send ``events`` (encoded by ``sse_event``) until the client goes, the generator
    ends, ``max_s`` passes (the browser's EventSource reconnects) or ``stopping()`` says
    the server is shutting down (checked every ``STOP_CHECK_S``: an open dashboard never
    holds a shutdown)."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no"),
                *SECURITY_HEADERS,
            ],
        }
    )

    async def pump() -> None:
        await send({"type": "http.response.body", "body": b"retry: 1000\n\n", "more_body": True})
        async for chunk in events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def gone() -> None:
        while (await req.receive())["type"] != "http.disconnect":
            pass

    tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(gone())]
    deadline = time.monotonic() + max_s
    try:
        while not stopping() and (left := deadline - time.monotonic()) > 0:
            done, _ = await asyncio.wait(
                tasks, timeout=min(STOP_CHECK_S, left), return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                break
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": b"", "more_body": False})
