"""The API client of a process on the control plane's own machine: requests over the
control plane's Unix channel socket instead of HTTP.

The same routes, bodies, errors and timeouts as ``http.ApiClient`` (one ``ApiRequest``
frame out, one ``ApiResponse`` frame back, many in flight on one connection), without an
HTTP parser on either side: a warm ``.remote()`` costs one frame each way. The connection
opens with a ``ClientHello`` carrying the API token. When it drops (the control plane
restarts), the requests waiting on it and later ones dial again with backoff until
``reconnect_timeout``, and are sent again, as ``ApiClient`` does after a connection error
(every request of the SDK is safe to repeat: a call's id is the client's own).

No reader thread: a caller reads the socket itself (as redis-py does), so a request made
one at a time costs a ``sendall`` and a ``recv`` on the caller's thread (a blocking one,
with ``SO_RCVTIMEO`` bounding each wait: no ``select`` before it) and no hand-over
between threads. With several threads waiting, one of them reads (the *reader*) and hands
the others their answers; when it has its own answer (or gives up) it passes the reading
on to one still waiting.

``session.api()`` uses it when the control plane it found wrote its socket's path into
``$STRATO_HOME/server.json`` for the same URL (the embedded default); ``STRATO_CLIENT_HTTP=1``
keeps HTTP.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
import time

from strato import exceptions as exc
from strato import settings
from strato.protocol import frames
from strato.protocol import messages as m

from .api_base import MSGPACK, ApiBase, Reconnects
from .channel_api import ANSWER_MARGIN_S

RECV_SLICE_S = 0.25  # the longest one recv blocks before the reader checks its deadline


class _Waiter:
    __slots__ = ("response", "wake")

    def __init__(self) -> None:
        self.response: m.ApiResponse | None = None
        # answered, the connection closed, or: read now. Made (under the connection's
        # lock) only once its caller is to wait while another thread reads: most never do
        self.wake: threading.Event | None = None

    def set(self) -> None:
        if self.wake is not None:
            self.wake.set()


class _Connection:
    """One connection's requests; whoever waits for an answer may read for everyone."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # a blocking recv that gives up after a slice (the reader checks its deadline
        # between slices): one syscall per answer read, no select() before it
        sec = int(RECV_SLICE_S)
        usec = int((RECV_SLICE_S - sec) * 1e6)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, usec))
        self.frames = frames.SocketReader(sock)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards what follows
        self._waiting: dict[int, _Waiter] = {}
        self._reading = False  # a waiter reads the socket
        self._reader: int | None = None  # the thread that reads it
        self.closed: str | None = None  # why the connection is gone
        self._ids = itertools.count(1)

    def request(
        self, method: str, path: str, query: dict[str, str], body: bytes, timeout: float
    ) -> m.ApiResponse:
        req_id = next(self._ids)
        me = _Waiter()
        with self._lock:
            if self.closed is not None:
                raise exc.ConnectionError(self.closed)
            if self._reader == threading.get_ident():
                # a signal handler interrupted this thread while it reads for everyone:
                # its answer would wait on the very read it interrupted
                raise exc.ExecutionError(
                    f"{method} {path} was called from code that interrupted a strato call on "
                    "the same thread (a signal handler?): make it from another thread"
                )
            self._waiting[req_id] = me
        deadline = time.monotonic() + timeout + ANSWER_MARGIN_S
        try:
            data = frames.encode(m.ApiRequest(req_id, method, path, query, body))  # type: ignore[arg-type]
            try:
                with self._send_lock:
                    self.sock.sendall(data)
            except OSError as e:
                self.close(f"the connection to the strato control plane failed: {e}")
            while True:
                with self._lock:
                    if me.response is not None:
                        return me.response
                    if self.closed is not None:
                        raise exc.ConnectionError(self.closed)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise exc.TimeoutError(
                            f"the control plane did not answer {method} {path} within "
                            f"{timeout + ANSWER_MARGIN_S:g}s"
                        )
                    read = not self._reading
                    if read:
                        self._reading, self._reader = True, threading.get_ident()
                    elif me.wake is None:
                        wake = me.wake = threading.Event()
                    else:
                        wake = me.wake
                        wake.clear()
                if read:
                    self._read_until(me, deadline)
                else:
                    wake.wait(left)
        finally:
            with self._lock:
                self._waiting.pop(req_id, None)

    def _read_until(self, me: _Waiter, deadline: float) -> None:
        """Read answers (handing the others theirs) until ours came, the deadline passed
        or the connection closed; then let another waiter read."""
        try:
            while me.response is None:
                if not self.frames.has_frame() and time.monotonic() >= deadline:
                    return
                try:
                    msg = self.frames.read()
                except BlockingIOError:  # no byte for RECV_SLICE_S (SO_RCVTIMEO)
                    continue
                if msg is None:
                    self.close("the connection to the strato control plane closed")
                    return
                if isinstance(msg, m.ApiResponse):
                    with self._lock:
                        waiter = self._waiting.get(msg.req_id)
                        if waiter is not None:  # else: its caller gave up waiting
                            waiter.response = msg
                            waiter.set()
        except (OSError, ValueError, frames.FrameError) as e:
            self.close(f"the connection to the strato control plane failed: {e}")
        finally:
            with self._lock:
                self._reading, self._reader = False, None
                for waiter in self._waiting.values():
                    if waiter is not me and waiter.response is None:
                        waiter.set()  # it reads from now on
                        break

    def close(self, why: str) -> None:
        """The connection is gone: every waiting request and every later one fails with
        ``why`` (and is sent again on a new connection by ``LocalChannelClient``)."""
        with self._lock:
            if self.closed is not None:
                return
            self.closed = why
            for waiter in self._waiting.values():
                waiter.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class LocalChannelClient(ApiBase):
    def __init__(
        self,
        url: str,
        token: str,
        socket_path: str,
        *,
        timeout: float = 60.0,
        reconnect_timeout: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.socket_path = socket_path
        self.timeout = timeout
        self.reconnect_timeout = reconnect_timeout
        self.health = None
        self._lock = threading.Lock()
        self._conn: _Connection | None = None
        self._pid = os.getpid()
        self._connect()  # fails at once if the socket does not answer (the caller falls back)

    # ------------------------------------------------------------------ connection

    def _connect(self) -> _Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(5.0)
            sock.connect(self.socket_path)
            sock.settimeout(None)
            sock.sendall(frames.encode(m.ClientHello(self.token, settings.WORKSPACE.get())))
        except OSError:
            sock.close()
            raise
        self._conn = _Connection(sock)
        return self._conn

    def _current(self) -> _Connection:
        with self._lock:
            if os.getpid() != self._pid:  # a forked child: its own connection
                self._pid, self._conn = os.getpid(), None
            if self._conn is None or self._conn.closed is not None:
                return self._connect()
            return self._conn

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close("the client was closed")

    # ------------------------------------------------------------------ requests

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
        if "?" in path:
            raise exc.InvalidError(f"pass query parameters as params, not in the path: {path}")
        query = {str(k): str(v) for k, v in params.items()} if params else {}
        timeout = self.timeout if timeout is None else timeout
        reconnects = Reconnects(self.url, self.reconnect_timeout)
        while True:
            try:
                conn = self._current()
            except OSError as e:
                failure: BaseException = e
            else:
                try:
                    resp = conn.request(method, path, query, body or b"", timeout)
                except exc.ConnectionError as e:  # the connection dropped: dial again
                    failure = e
                else:
                    if resp.status >= 400:
                        raise self._error(resp.status, resp.body)
                    return resp.body
            reconnects.wait(failure)
