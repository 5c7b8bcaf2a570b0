"""The API client of code running inside a container: requests over the container's channel.

A nested ``.remote()`` (or ``Dict``/``Queue`` access, ``Function.from_name``...) in a
container sends an ``ApiRequest`` frame over the channel the container already has to the
control plane and waits for the ``ApiResponse`` with the same id, which the container's
reader thread hands to :meth:`ChannelApiClient.deliver`. No TCP port of the control plane
is needed (it works under ``block_network=True`` and on every runtime), and the
container holds no API token: the control plane knows the connection's container, scopes
each request to that container's app and records the input it came from (the call graph).

Stdlib, msgspec and ``strato.protocol`` only: it is imported on the container's start path.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections.abc import Callable

from strato import exceptions as exc
from strato.protocol import messages as m

from .api_base import MSGPACK, ApiBase

# the longest a request may wait for its answer beyond its own timeout (the control plane
# answers a long-poll when its timeout ends)
ANSWER_MARGIN_S = 15.0
CHUNK = 1 << 20  # a request body over this goes ahead of it as BlobChunk frames


# this process's client when it runs in a container (set by the container's entrypoint);
# ``session.api()`` returns it
CURRENT: ChannelApiClient | None = None


class _Waiter:
    __slots__ = ("done", "response")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.response: m.ApiResponse | None = None


class ChannelApiClient(ApiBase):
    """``ApiBase`` over a container's channel.

    ``send(frames)`` writes frames to the channel in order, with nothing of another sender
    between them; ``current_input()`` names the input the calling code runs (or None)."""

    def __init__(
        self,
        send: Callable[[list[object]], None],
        current_input: Callable[[], int | None],
        *,
        timeout: float = 60.0,
        chunked_uploads: bool = True,
    ) -> None:
        self.url = "channel:"  # for messages: the control plane behind this container
        self.timeout = timeout
        self.health = None
        self._send = send
        self._current_input = current_input
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, _Waiter] = {}
        self._closed: str | None = None  # why the channel is gone
        self._pid = os.getpid()  # a forked child shares the socket but not its reader
        # a container sends large blobs in chunks (its frames are small); a local client
        # may send a body as large as HTTP's in one frame
        self._chunked_uploads = chunked_uploads

    def request_raw(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        params: dict | None = None,
        timeout: float | None = None,
        content_type: str = MSGPACK,
    ) -> bytes:
        return self._request(method, path, body or b"", params, timeout, ahead=[])

    def put_blob(self, key: str, data: bytes) -> None:
        # a large value goes in chunks ahead of its request (no frame is large); the
        # control plane checks that the chunks it got hash to ``key``
        if len(data) <= CHUNK or not self._chunked_uploads:
            return super().put_blob(key, data)
        if hashlib.sha256(data).hexdigest() != key:
            raise exc.InvalidError(f"blob {key} does not hash to its key")
        view = memoryview(data)
        ahead: list[object] = [
            m.BlobChunk(bytes(view[i : i + CHUNK]), last=i + CHUNK >= len(data))
            for i in range(0, len(data), CHUNK)
        ]
        self._request(
            "PUT", f"/blobs/{key}", b"", {"chunked": "1"}, max(self.timeout, 300.0), ahead
        )

    def _request(
        self,
        method: str,
        path: str,
        body: bytes,
        params: dict | None,
        timeout: float | None,
        ahead: list[object],
    ) -> bytes:
        timeout = self.timeout if timeout is None else timeout
        if os.getpid() != self._pid:
            raise exc.ExecutionError(
                "a process forked inside a container cannot call the control plane (it "
                "shares the container's channel but not its reader): make the call from "
                "the container's own process (threads and asyncio tasks are fine)"
            )
        if "?" in path:
            raise exc.InvalidError(f"pass query parameters as params, not in the path: {path}")
        query = {str(k): str(v) for k, v in (params or {}).items()}
        req_id = next(self._ids)
        waiter = _Waiter()
        with self._lock:
            if self._closed is not None:
                raise exc.ConnectionError(self._closed)
            self._waiting[req_id] = waiter
        try:
            req = m.ApiRequest(req_id, method, path, query, body, self._current_input())  # type: ignore[arg-type]
            try:
                self._send([*ahead, req])
            except OSError as e:
                self.close_channel(f"the container's channel to the control plane failed: {e}")
            if not waiter.done.wait(timeout + ANSWER_MARGIN_S):
                raise exc.TimeoutError(
                    f"the control plane did not answer {method} {path} within "
                    f"{timeout + ANSWER_MARGIN_S:g}s"
                )
        finally:
            with self._lock:
                self._waiting.pop(req_id, None)
        resp = waiter.response
        if resp is None:  # woken by close_channel
            raise exc.ConnectionError(self._closed or "the container's channel closed")
        if resp.status >= 400:
            raise self._error(resp.status, resp.body)
        return resp.body

    def deliver(self, resp: m.ApiResponse) -> None:
        """The answer to a request (called by the container's channel reader)."""
        with self._lock:
            waiter = self._waiting.get(resp.req_id)
        if waiter is not None:  # else: its caller gave up waiting
            waiter.response = resp
            waiter.done.set()

    def close_channel(self, why: str) -> None:
        """The channel is gone: every waiting request and every later one fails with ``why``."""
        with self._lock:
            self._closed = why
            waiting = list(self._waiting.values())
        for w in waiting:
            w.done.set()
