"""A small keep-alive HTTP/1.1 client for the control plane's API.

``http.client`` with one persistent connection per thread: a warm request costs one
``send`` and one ``recv``. Connection failures are retried with backoff until
``reconnect_timeout`` (a control plane that restarts is waited for); every request has a
timeout; error bodies become the matching ``strato.exceptions`` class.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from urllib.parse import urlencode, urlsplit

from strato import exceptions as exc
from strato import settings

from . import tls
from .api_base import MSGPACK, ApiBase, Reconnects

__all__ = ["MSGPACK", "ApiBase", "ApiClient"]


class ApiClient(ApiBase):
    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 60.0,
        reconnect_timeout: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise exc.InvalidError(
                f"bad server URL {url!r}: expected http://host:port or https://host:port"
            )
        self.url = url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        # https: verified against tls_context (default: STRATO_TLS_CA, else the system's CAs)
        self.tls: ssl.SSLContext | None = None
        self._tls_given = tls_context is not None
        if parts.scheme == "https":
            self.tls = tls_context or tls.client_context()
        self.token = token
        self.timeout = timeout
        self.reconnect_timeout = reconnect_timeout
        self._local = threading.local()
        self.health: dict | None = None  # the control plane's /health, once fetched
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": MSGPACK}
        if workspace := settings.WORKSPACE.get():
            self._headers["Strato-Workspace"] = workspace

    # ------------------------------------------------------------------ plumbing

    def _conn(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.tls is not None:
                conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=timeout, context=self.tls
                )
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._local.conn = conn
            self._local.fresh = True  # no answer read on it yet
        elif conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        self._drop()

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
        if params:
            path = f"{path}?{urlencode(params)}"
        timeout = self.timeout if timeout is None else timeout
        headers = (
            self._headers
            if content_type == MSGPACK
            else {**self._headers, "Content-Type": content_type}
        )
        reconnects = Reconnects(self.url, self.reconnect_timeout)
        while True:
            try:
                conn = self._conn(timeout)
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
                self._local.fresh = False
                if resp.will_close:
                    self._drop()
                break
            except TimeoutError:
                self._drop()
                raise exc.TimeoutError(
                    f"the control plane at {self.url} did not answer {method} {path} "
                    f"within {timeout:g}s"
                ) from None
            except ssl.SSLCertVerificationError as e:  # (an OSError: never retried)
                self._drop()
                raise tls.verify_failed(self.url, e, given=self._tls_given) from None
            except ssl.SSLError as e:
                self._drop()
                raise tls.not_tls(self.url, e) from None
            except (OSError, http.client.HTTPException) as e:
                self._drop()
                if (
                    self.tls is None
                    and getattr(self._local, "fresh", False)
                    and isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError))
                    and tls.speaks_tls(self.host, self.port)
                ):  # plain HTTP to an HTTPS port: it closed a new connection unanswered
                    raise tls.plain_http_to_tls(self.url) from None
                reconnects.wait(e)
        if status >= 400:
            raise self._error(status, data)
        return data
