"""Results of requests that outlived the HTTP limit (the target of their ``303``).

When a request is still unanswered after the endpoint's HTTP limit, the gateway answers
``303 See Other`` with ``Location: /__strato/results/<request id>`` and lets the request
run on; its response (the container's raw HTTP response, or the gateway's error) is kept
here, in memory, up to ``STRATO_WEB_RESULT_MAX`` bytes, for ``STRATO_WEB_RESULT_TTL``
seconds after it is complete. ``GET /__strato/results/<id>`` returns it once complete;
before that it waits up to the HTTP limit again and then answers another ``303`` to
itself, so a client that follows redirects simply gets the result. A result of an
endpoint with ``requires_auth`` asks for the same token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .proxy import Exchange


class DeferredResult:
    __slots__ = (
        "rid",
        "app_id",
        "requires_auth",
        "chunks",
        "size",
        "done",
        "done_at",
        "waiters",
        "max_bytes",
        "overflow",
        "exchange",
    )

    def __init__(self, ex: Exchange, max_bytes: int) -> None:
        self.rid = ex.rid
        self.app_id = ex.route.app_id if ex.route is not None else ""
        self.requires_auth = bool(ex.route is not None and ex.route.requires_auth)
        self.chunks: list[bytes] = []
        self.size = 0
        self.done = False
        self.done_at: float | None = None
        self.waiters: list[Callable[[], None]] = []
        self.max_bytes = max_bytes
        self.overflow = False
        self.exchange: Exchange | None = ex

    def append(self, data: bytes) -> None:
        if self.overflow:
            return
        self.size += len(data)
        if self.size > self.max_bytes:
            self.overflow = True
            self.chunks = []
            ex = self.exchange
            if ex is not None and ex.up is not None:
                ex.up.close()  # stop producing what nobody can fetch
            return
        self.chunks.append(data)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.done_at = time.monotonic()
        self.exchange = None
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            w()

    def body(self) -> bytes:
        return b"".join(self.chunks)


class ResultStore:
    def __init__(self, ttl_s: float, max_bytes: int) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._results: dict[str, DeferredResult] = {}

    def create(self, ex: Exchange) -> DeferredResult:
        entry = DeferredResult(ex, self.max_bytes)
        self._results[ex.rid] = entry
        return entry

    def get(self, rid: str) -> DeferredResult | None:
        return self._results.get(rid)

    def sweep(self, now: float) -> None:
        for rid, entry in list(self._results.items()):
            if entry.done_at is not None and now - entry.done_at > self.ttl_s:
                del self._results[rid]

    def __len__(self) -> int:
        return len(self._results)
