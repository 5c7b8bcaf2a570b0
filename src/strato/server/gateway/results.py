"""Results of requests that outlived the HTTP limit (the target of their ``303``).

When a request is still unanswered after the endpoint's HTTP limit, the gateway answers
``303 See Other`` with ``Location: /__strato/results/<result id>`` and lets the request
run on; its response (the container's raw HTTP response, or the gateway's error) is kept
here, in memory, up to ``STRATO_WEB_RESULT_MAX`` bytes, for ``STRATO_WEB_RESULT_TTL``
seconds after it is complete. ``GET /__strato/results/<id>`` returns it once complete;
before that it waits up to the HTTP limit again and then answers another ``303`` to
itself, so a client that follows redirects simply gets the result.

The result id is 128 random bits (``secrets.token_urlsafe(16)``), not the request id
(which the app and the logs see): knowing it is what lets a caller fetch the result. A
result of an endpoint with ``requires_auth`` is also bound to the credential of the
request that made it: fetching it needs the same ``Strato-Token``; anyone else gets the
same 404 as for an id that does not exist.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .proxy import Exchange


class DeferredResult:
    __slots__ = (
        "rid",
        "result_id",
        "credential",
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
        "status",
    )

    def __init__(self, ex: Exchange, max_bytes: int) -> None:
        self.rid = ex.rid
        self.result_id = secrets.token_urlsafe(16)  # 128 random bits
        self.credential = credential_of(ex.headers) if ex.route is not None else None
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
        self.status = 0  # of the response kept (the container's, or the gateway's error)

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

    def finish(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        self.status = status
        self.done_at = time.monotonic()
        self.exchange = None
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            w()

    def body(self) -> bytes:
        return b"".join(self.chunks)

    def allows(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether a fetch with these request headers may have this result: the same
        credential as the request's where it had to have one (``requires_auth``)."""
        if not self.requires_auth:
            return True
        got = credential_of(headers)
        return (
            got is not None
            and self.credential is not None
            and hmac.compare_digest(got, self.credential)
        )


def credential_of(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """A digest of the request's ``Strato-Token``, if it has one."""
    for name, value in headers:
        if name == b"strato-token":
            return hashlib.sha256(value.strip()).digest()
    return None


class ResultStore:
    def __init__(self, ttl_s: float, max_bytes: int) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._results: dict[str, DeferredResult] = {}

    def create(self, ex: Exchange) -> DeferredResult:
        entry = DeferredResult(ex, self.max_bytes)
        self._results[entry.result_id] = entry
        return entry

    def get(self, result_id: str) -> DeferredResult | None:
        return self._results.get(result_id)

    def sweep(self, now: float) -> None:
        for rid, entry in list(self._results.items()):
            if entry.done_at is not None and now - entry.done_at > self.ttl_s:
                del self._results[rid]

    def __len__(self) -> int:
        return len(self._results)
