"""The API client of a process on the control plane's own machine: requests over the
control plane's Unix channel socket instead of HTTP.

The same routes, bodies, errors and timeouts as ``http.ApiClient`` (one ``ApiRequest``
frame out, one ``ApiResponse`` frame back, many in flight on one connection), without an
HTTP parser on either side: a warm ``.remote()`` costs one frame each way. The connection
opens with a ``ClientHello`` carrying the API token. When it drops (the control plane
restarts), the requests waiting on it and later ones dial again with backoff until
``reconnect_timeout``, and are sent again, as ``ApiClient`` does after a connection error
(every request of the SDK is safe to repeat: a call's id is the client's own).

``session.api()`` uses it when the control plane it found wrote its socket's path into
``$STRATO_HOME/server.json`` for the same URL (the embedded default); ``STRATO_CLIENT_HTTP=1``
keeps HTTP.
"""

from __future__ import annotations

import os
import socket
import threading

from strato import exceptions as exc
from strato.protocol import frames
from strato.protocol import messages as m

from .api_base import MSGPACK, ApiBase, Reconnects
from .channel_api import ChannelApiClient


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
        self._conn: ChannelApiClient | None = None
        self._sock: socket.socket | None = None
        self._pid = os.getpid()
        self._connect()  # fails at once if the socket does not answer (the caller falls back)

    # ------------------------------------------------------------------ connection

    def _connect(self) -> ChannelApiClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(5.0)
            sock.connect(self.socket_path)
            sock.settimeout(None)
            sock.sendall(frames.encode(m.ClientHello(self.token)))
        except OSError:
            sock.close()
            raise
        send_lock = threading.Lock()

        def send(msgs: list[object]) -> None:
            with send_lock:
                sock.sendall(b"".join(frames.encode(msg) for msg in msgs))

        conn = ChannelApiClient(send, lambda: None, timeout=self.timeout, chunked_uploads=False)
        threading.Thread(
            target=self._read, args=(sock, conn), name="strato-api-channel", daemon=True
        ).start()
        self._conn, self._sock = conn, sock
        return conn

    @staticmethod
    def _read(sock: socket.socket, conn: ChannelApiClient) -> None:
        reader = frames.SocketReader(sock)
        try:
            while (msg := reader.read()) is not None:
                if isinstance(msg, m.ApiResponse):
                    conn.deliver(msg)
        except (OSError, frames.FrameError):
            pass
        conn.close_channel("the connection to the strato control plane closed")
        try:
            sock.close()
        except OSError:
            pass

    def _current(self) -> ChannelApiClient:
        with self._lock:
            if os.getpid() != self._pid:  # a forked child: its own connection
                self._pid, self._conn, self._sock = os.getpid(), None, None
            if self._conn is None:
                return self._connect()
            return self._conn

    def _drop(self, conn: ChannelApiClient) -> None:
        with self._lock:
            if self._conn is conn:
                sock, self._conn, self._sock = self._sock, None, None
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def close(self) -> None:
        with self._lock:
            conn = self._conn
        if conn is not None:
            self._drop(conn)

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
        reconnects = Reconnects(self.url, self.reconnect_timeout)
        while True:
            try:
                conn = self._current()
            except OSError as e:
                failure: BaseException = e
            else:
                try:
                    return conn.request_raw(method, path, body, params=params, timeout=timeout)
                except exc.ConnectionError as e:  # the connection dropped: dial again
                    self._drop(conn)
                    failure = e
            reconnects.wait(failure)
