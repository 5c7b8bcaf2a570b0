"""The byte-level HTTP/1.1 reverse proxy: client connections, exchanges, tunnels.

``ClientConn`` parses each request head with httptools, asks the gateway where it goes,
and runs one ``Exchange`` at a time (pipelined requests wait their turn). An exchange
writes a rewritten head to an ``Upstream`` tunnel of a container (the ``/<app>/<label>``
prefix stripped, hop-by-hop headers dropped, those the ``Connection`` header names
included, and the client's own ``x-forwarded-*``, ``forwarded`` and
``x-strato-request-id`` replaced by the gateway's) and streams the body after it: raw
when the client sent a ``content-length``, re-chunked when it sent ``chunked``. The
response comes back as raw bytes, written to the client as they arrive (chunked
responses and server-sent events are never buffered); a second httptools parser only
watches for the end of the response so that the tunnel can carry the next request. A
``101 Switching Protocols`` turns both connections into a raw two-way pipe (WebSockets).
Backpressure goes both ways: a full write buffer on one side pauses reading on the
other.

Every exchange has a request id (``x-strato-request-id`` on every response, in the body
of the gateway's own error responses, and in the access log line). A request still
unanswered after the HTTP limit gets a ``303`` to ``/__strato/results/<id>``: the
exchange goes on, detached from its client, into a ``DeferredResult``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

import httptools

from ..listeners import HeadTooLarge, refusal

if TYPE_CHECKING:
    from .endpoint import Backend
    from .gateway import Gateway
    from .results import DeferredResult

HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"strato-token",  # the web token is the gateway's, never the app's
        # the gateway's own, never the client's (a forged one would reach the app)
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-prefix",
        b"x-forwarded-port",
        b"x-forwarded-server",
        b"x-real-ip",
        b"forwarded",
        b"x-strato-request-id",
    )
)
# Connection tokens that name no header to strip
CONNECTION_OPTIONS = frozenset((b"close", b"keep-alive", b"upgrade"))
BODY_BUFFER = 1 << 20  # request body held while waiting for a container, before pausing
DISCARD_LIMIT = 64 << 20  # after an error answered early, read and drop this much at most
DISCARD_S = 5.0
HEAD_DISCARD_LIMIT = 1 << 20  # after a 431
REASONS = {
    200: "OK",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def simple_response(
    status: int,
    body: bytes,
    rid: str,
    *,
    content_type: bytes = b"application/json",
    close: bool = False,
    extra: list[tuple[bytes, bytes]] = (),
) -> bytes:
    head = [
        f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\n".encode(),
        b"content-type: " + content_type + b"\r\n",
        b"content-length: " + str(len(body)).encode() + b"\r\n",
        b"x-strato-request-id: " + rid.encode() + b"\r\n",
    ]
    for k, v in extra:
        head.append(k + b": " + v + b"\r\n")
    if close:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body


def error_body(status: int, message: str, rid: str) -> bytes:
    body = {"error": REASONS.get(status, "Error"), "message": message, "request_id": rid}
    return json.dumps(body).encode()


class Upstream(asyncio.Protocol):
    """A tunnel the container dialed: a keep-alive HTTP/1.1 connection to its server."""

    __slots__ = ("backend", "transport", "ex", "closed", "owner", "on_lost")

    def __init__(self, backend: Backend, owner: object = None) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.ex: Exchange | None = None
        self.closed = False
        # the channel's StreamWriter this connection came in with: it closes the transport
        # when garbage-collected, so it lives as long as the tunnel
        self.owner = owner
        self.on_lost = None  # the channel listener's count of it (listeners.py)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:  # nothing asked: the container's server is confused; drop it
            self.transport.close()
            return
        ex.from_upstream(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.on_lost is not None:
            self.on_lost()
            self.on_lost = None
        b = self.backend
        b.tunnels -= 1
        try:
            b.idle.remove(self)
        except ValueError:
            pass
        ex = self.ex
        if ex is not None:
            self.ex = None
            ex.upstream_lost()

    def pause_writing(self) -> None:
        ex = self.ex
        if ex is not None and ex.conn.transport is not None:
            ex.conn.transport.pause_reading()

    def resume_writing(self) -> None:
        ex = self.ex
        if ex is not None and ex.conn.transport is not None and not ex.conn.closed:
            ex.conn.transport.resume_reading()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()


class Exchange:
    """One request and its response."""

    __slots__ = (
        "conn",
        "gw",
        "rid",
        "method",
        "url",
        "version",
        "headers",
        "host",
        "keep_alive",
        "upgrade",
        "content_length",
        "chunked",
        "t0",
        "body",
        "body_size",
        "body_done",
        "route",
        "target",
        "prefix",
        "endpoint",
        "backend",
        "up",
        "state",
        "status",
        "head_buf",
        "head_done",
        "resp_started",
        "parser",
        "raw",
        "raw_buf",
        "detached",
        "limit_handle",
        "wait_handle",
        "sent",
        "complete",
        "up_keep_alive",
        "drop",
        "head_size",
    )

    def __init__(self, conn: ClientConn, rid: str) -> None:
        self.conn = conn
        self.gw = conn.gw
        self.rid = rid
        self.t0 = time.monotonic()
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.host = ""
        self.content_length: int | None = None
        self.chunked = False
        self.body: list[bytes] | None = []  # framed body bytes not yet sent upstream
        self.body_size = 0  # body bytes received so far
        self.body_done = False
        self.route = None
        self.target = b"/"
        self.prefix = b""
        self.endpoint = None
        self.backend: Backend | None = None
        self.up: Upstream | None = None
        self.state = "new"  # new | waiting | bound | done
        self.status = 0
        self.head_buf = b""
        self.head_done = False
        self.resp_started = False
        self.parser = None
        self.raw = False  # a 101 made this exchange a two-way pipe
        self.raw_buf: list[bytes] | None = None  # client bytes after an upgrade, before 101
        self.detached: DeferredResult | None = None
        self.limit_handle: asyncio.TimerHandle | None = None
        self.wait_handle: asyncio.TimerHandle | None = None
        self.sent = 0  # response bytes passed on
        self.complete = False  # the response parser saw the end of the response
        self.up_keep_alive = False  # the tunnel may carry another request after this one
        self.drop: set[bytes] | None = None  # headers the client's Connection header names
        self.head_size = 0  # bytes of the head parsed so far (url, headers)

    # ------------------------------------------------------------------ request body

    def add_body(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        if self.body_size > self.gw.config.max_body:
            self.too_large()
            return
        data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked else chunk
        up = self.up
        if up is not None and self.state == "bound":
            up.transport.write(data)
        elif self.body is not None:
            self.body.append(data)
            if self.body_size > BODY_BUFFER:
                self.conn.transport.pause_reading()

    def end_body(self) -> None:
        self.body_done = True
        if self.chunked:
            if self.up is not None and self.state == "bound":
                self.up.transport.write(b"0\r\n\r\n")
            elif self.body is not None:
                self.body.append(b"0\r\n\r\n")

    def client_raw(self, data: bytes) -> None:
        """Bytes from the client after an upgrade request's head."""
        if not data:
            return
        if self.raw and self.up is not None:
            self.up.transport.write(data)
        else:
            if self.raw_buf is None:
                self.raw_buf = []
            self.raw_buf.append(data)

    def too_large(self) -> None:
        limit = self.gw.config.max_body
        if self.up is not None and not self.resp_started:
            self._drop_upstream()
        if self.resp_started or self.state == "done":
            self.conn.abort()
            return
        self.respond(
            413,
            f"the request body is over the gateway's limit of {limit} bytes (STRATO_WEB_MAX_BODY)",
        )

    # ------------------------------------------------------------------ dispatch

    def granted(self, backend: Backend, up: Upstream) -> None:
        """A waiting request got a slot (Endpoint.pump)."""
        if self.wait_handle is not None:
            self.wait_handle.cancel()
            self.wait_handle = None
        self.bind(backend, up)

    def bind(self, backend: Backend, up: Upstream) -> None:
        self.backend, self.up, self.state = backend, up, "bound"
        up.ex = self
        h = self.headers
        out = [self.method, b" ", self.target, b" HTTP/", self.version.encode(), b"\r\n"]
        drop = self.drop
        for name, value in h:
            if name in HOP_BY_HOP or name[:6] == b"proxy-" or (drop is not None and name in drop):
                continue
            out += (name, b": ", value, b"\r\n")
        out += (b"x-forwarded-for: ", self.conn.client_ip, b"\r\n")
        if self.host:
            out += (b"x-forwarded-host: ", self.host.encode("latin-1"), b"\r\n")
        out += (b"x-forwarded-proto: http\r\nx-strato-request-id: ", self.rid.encode(), b"\r\n")
        if self.prefix:
            out += (b"x-forwarded-prefix: ", self.prefix, b"\r\n")
        if self.chunked:
            out.append(b"transfer-encoding: chunked\r\n")
        if self.upgrade:
            for name, value in h:
                if name == b"upgrade":
                    out += (b"connection: upgrade\r\nupgrade: ", value, b"\r\n")
                    break
        out.append(b"\r\n")
        if self.body:
            out += self.body
        self.body = None
        up.transport.write(b"".join(out))
        self.parser = httptools.HttpResponseParser(self)
        if not self.conn.closed and self.conn.transport is not None:
            self.conn.transport.resume_reading()

    def wait_expired(self) -> None:
        self.wait_handle = None
        if self.state != "waiting":
            return
        ep = self.endpoint
        try:
            ep.waiters.remove(self)
        except ValueError:
            pass
        self.respond(
            503,
            f"no container of this endpoint became ready within {self.gw.config.wait_timeout_s:g}s"
            " (STRATO_WEB_WAIT_TIMEOUT); see `strato app logs` for why",
        )

    def limit_reached(self) -> None:
        """The HTTP limit passed: answer 303 and let the exchange finish detached."""
        self.limit_handle = None
        if self.state == "done" or self.resp_started or self.raw or self.detached is not None:
            return
        if not self.body_done:
            return  # still uploading: the client is slow, not the endpoint
        entry = self.gw.results.create(self)
        location = f"/__strato/results/{entry.result_id}".encode()
        self.conn.write(
            simple_response(
                303,
                error_body(303, "the request is still running; fetch its result here", self.rid),
                self.rid,
                extra=[(b"location", location), (b"retry-after", b"1")],
            )
        )
        self.gw.access(self, 303, note="redirected to its result")
        self.detached = entry
        self.conn.exchange_done(self, keep_alive=self.keep_alive)

    # ------------------------------------------------------------------ response

    def _emit(self, data: bytes) -> None:
        self.sent += len(data)
        if self.detached is not None:
            self.detached.append(data)
        else:
            self.conn.write(data)

    def from_upstream(self, data: bytes) -> None:
        if self.raw:
            self._emit(data)
            return
        if self.head_done:
            emit = feed = data
        else:
            if self.head_buf:
                data = self.head_buf + data
                self.head_buf = b""
            scanned = self._scan_head(data)
            if scanned is None:
                return
            emit, feed = scanned
        if feed:
            try:
                self.parser.feed_data(feed)
            except httptools.HttpParserUpgrade:
                pass  # on_message_complete has seen the 101
            except httptools.HttpParserError:
                self._upstream_failed("the endpoint sent an invalid HTTP response")
                return
        if emit:
            if not self.resp_started:
                self.resp_started = True
                if self.limit_handle is not None:
                    self.limit_handle.cancel()
                    self.limit_handle = None
            self._emit(emit)
        if self.complete or (self.head_done and self.method == b"HEAD"):
            self._finished(self.status)

    def _scan_head(self, buf: bytes) -> tuple[bytes, bytes] | None:
        """(bytes for the client, bytes for the parser): the final response head gets
        the request id; interim 1xx heads pass as they are; an incomplete head waits."""
        start = 0
        while True:
            end = buf.find(b"\r\n\r\n", start)
            if end < 0:
                if len(buf) - start > 65536:
                    self._upstream_failed("the endpoint's response head is over 64 KiB")
                    return None
                self.head_buf = buf[start:]
                return buf[:start], buf[:start]
            try:
                status = int(buf[start + 9 : start + 12])
            except ValueError:
                self._upstream_failed("the endpoint sent an invalid HTTP response")
                return None
            if 100 <= status < 200 and status != 101:
                start = end + 4
                continue
            self.status = status
            self.head_done = True
            return buf[:end] + b"\r\nx-strato-request-id: " + self.rid.encode() + buf[end:], buf

    # httptools callback (response parser); on_body and friends are left out on purpose:
    # the body passes through as raw bytes
    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return
        if status == 101:
            self.raw = True
            if self.raw_buf:
                self.up.transport.write(b"".join(self.raw_buf))
            self.raw_buf = None
            return
        self.up_keep_alive = self.parser.should_keep_alive()  # (reset once it returns)
        self.complete = True

    def _finished(self, status: int) -> None:
        if self.state == "done":
            return
        if self.method == b"HEAD":
            reusable = self.body_done
        else:
            reusable = self.body_done and not self.upgrade and self.up_keep_alive
        self._release(reusable)
        self.gw.access(self, status)
        self._done()

    def _done(self) -> None:
        self.state = "done"
        if self.limit_handle is not None:
            self.limit_handle.cancel()
            self.limit_handle = None
        if self.detached is not None:
            self.detached.finish()
            return
        self.conn.exchange_done(self, keep_alive=self.keep_alive and not self.upgrade)

    def _release(self, reusable: bool) -> None:
        up, backend = self.up, self.backend
        if up is None:
            return
        self.up = None
        up.ex = None
        if reusable and not up.closed:
            backend.idle.append(up)
        else:
            up.close()
        backend.mark_free(time.monotonic())
        backend.endpoint.pump_all()

    def _drop_upstream(self) -> None:
        self._release(False)

    def upstream_lost(self) -> None:
        """The tunnel closed under this exchange."""
        if self.state == "done":
            return
        backend = self.backend
        self.up = None
        if backend is not None:
            backend.mark_free(time.monotonic())
            backend.endpoint.pump_all()
        if self.raw:
            self.gw.access(self, 101)
            self.state = "done"
            if self.detached is None:
                self.conn.abort()
            return
        if self.head_done and self.parser is not None:
            try:
                self.parser.feed_data(b"")  # a body delimited by the close ends here
            except httptools.HttpParserError:
                pass
            self.gw.access(self, self.status, note="the container closed the connection")
            self.state = "done"
            if self.detached is not None:
                self.detached.finish()
            else:
                self.conn.close_after_write()
            return
        self._upstream_failed("the endpoint's container closed the connection (it may have died)")

    def _upstream_failed(self, why: str) -> None:
        if self.up is not None:
            self._release(False)
        if self.resp_started:
            self.gw.access(self, self.status or 502, note=why)
            self.state = "done"
            if self.detached is not None:
                self.detached.finish()
            else:
                self.conn.abort()
            return
        self.respond(502, why)

    # ------------------------------------------------------------------ the gateway's own

    def respond(self, status: int, message: str, *, close: bool = False) -> None:
        """Answer with the gateway's own JSON error (or status) response."""
        if self.state == "done":
            return
        if self.state == "waiting" and self.endpoint is not None:
            try:
                self.endpoint.waiters.remove(self)
            except ValueError:
                pass
        if self.wait_handle is not None:
            self.wait_handle.cancel()
            self.wait_handle = None
        close = close or not self.body_done or self.upgrade
        data = simple_response(status, error_body(status, message, self.rid), self.rid, close=close)
        self.gw.access(self, status, note=message)
        self.state = "done"
        if self.limit_handle is not None:
            self.limit_handle.cancel()
            self.limit_handle = None
        if self.detached is not None:
            self.detached.append(data)
            self.detached.finish()
            return
        self.conn.write(data)
        if close:
            self.conn.discard_then_close()
            self.conn.exchange_done(self, keep_alive=False, closing=True)
        else:
            self.conn.exchange_done(self, keep_alive=self.keep_alive)

    def respond_raw(self, data: bytes, *, close: bool = False) -> None:
        """Answer with bytes the gateway holds (a deferred result)."""
        self.state = "done"
        self.conn.write(data)
        self.conn.exchange_done(self, keep_alive=self.keep_alive and not close)

    def client_gone(self) -> None:
        """The client closed its connection under this exchange."""
        if self.state == "done" or self.detached is not None:
            return
        if self.state == "waiting":
            try:
                self.endpoint.waiters.remove(self)
            except ValueError:
                pass
        if self.wait_handle is not None:
            self.wait_handle.cancel()
        if self.limit_handle is not None:
            self.limit_handle.cancel()
        self._release(False)
        self.state = "done"
        self.gw.access(self, self.status if self.raw else 499, note="the client went away")


class ClientConn(asyncio.Protocol):
    """One client connection to the gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: list[Exchange] = []  # the first one is running
        self.cur: Exchange | None = None  # the one being parsed
        self.upgraded: Exchange | None = None
        self.closed = False
        self.closing = False
        self.discarding = 0  # > 0: reading and dropping input before closing
        self.client_ip = b"-"
        # listener limits (server/listeners.py): the guard's sweep closes a connection
        # whose head is not complete ``header_timeout_s`` after ``head_since``, or that
        # is idle between requests ``keepalive_s`` after ``idle_since``
        self.head_since: float | None = None
        self.idle_since: float | None = None
        self.head_bytes = 0
        self.refused = False
        self.overflow: str | None = None

    # ------------------------------------------------------------------ asyncio

    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self.gw.guard.admit(self):
            self.refused = self.closed = self.closing = True  # (reads nothing more)
            transport.write(refusal())
            transport.close()
            return
        self.head_since = time.monotonic()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.client_ip = str(peer[0]).encode()

    def guard_close(self) -> None:
        if not self.closed and self.transport is not None:
            self.head_since = self.idle_since = None
            self.closing = True
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.upgraded is not None:
            self.upgraded.client_raw(data)
            return
        if self.discarding:
            self.discarding += len(data)
            if self.discarding > DISCARD_LIMIT:
                self.transport.close()
            return
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            ex = self.cur
            if ex is not None and ex.upgrade:
                self.upgraded = ex
                ex.client_raw(data[e.args[0] :])
        except httptools.HttpParserError:
            if self.overflow is not None:
                self._too_large(self.overflow)
            else:
                self._bad_request()
            return
        if self.head_since is not None:  # (a head that began in this chunk counts it all)
            self.head_bytes += len(data)
            if self.head_bytes > self.gw.config.limits.max_header_bytes:
                self._too_large(
                    f"the request head is over {self.gw.config.limits.max_header_bytes} bytes "
                    "(STRATO_MAX_HEADER_BYTES)"
                )

    def connection_lost(self, exc) -> None:
        if self.refused:
            return
        self.closed = True
        self.gw.guard.release(self)
        for ex in self.queue:
            ex.client_gone()
        self.queue.clear()

    def pause_writing(self) -> None:
        ex = self.queue[0] if self.queue else None
        if ex is not None and ex.up is not None and ex.up.transport is not None:
            ex.up.transport.pause_reading()

    def resume_writing(self) -> None:
        ex = self.queue[0] if self.queue else None
        if ex is not None and ex.up is not None and ex.up.transport is not None:
            ex.up.transport.resume_reading()

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self.cur = ex = Exchange(self, self.gw.next_rid())
        if self.head_since is None:
            self.head_since = ex.t0
        self.idle_since = None

    def on_url(self, url: bytes) -> None:
        ex = self.cur
        ex.url += url
        ex.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.cur
        limits = self.gw.config.limits
        ex.head_size += len(name) + len(value) + 4
        if len(ex.headers) >= limits.max_headers or ex.head_size > limits.max_header_bytes:
            if len(ex.headers) >= limits.max_headers:
                self.overflow = (
                    f"the request has over {limits.max_headers} header lines (STRATO_MAX_HEADERS)"
                )
            else:
                self.overflow = (
                    f"the request head is over {limits.max_header_bytes} bytes "
                    "(STRATO_MAX_HEADER_BYTES)"
                )
            raise HeadTooLarge(self.overflow)
        name = name.lower()
        if name == b"content-length":
            try:
                ex.content_length = int(value)
            except ValueError:
                ex.content_length = None
        elif name == b"transfer-encoding":
            ex.chunked = b"chunked" in value.lower()
        elif name == b"host":
            ex.host = value.decode("latin-1")
        elif name == b"connection":  # the headers it names are hop-by-hop
            for token in value.lower().split(b","):
                token = token.strip()
                if token and token not in CONNECTION_OPTIONS:
                    if ex.drop is None:
                        ex.drop = set()
                    ex.drop.add(token)
        ex.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_since = None
        self.head_bytes = 0
        ex = self.cur
        p = self.parser
        ex.method = p.get_method()
        ex.version = p.get_http_version()
        ex.keep_alive = p.should_keep_alive()
        ex.upgrade = p.should_upgrade()
        self.queue.append(ex)
        if len(self.queue) == 1:
            self.gw.begin(ex)

    def on_body(self, body: bytes) -> None:
        ex = self.cur
        if ex.state != "done":
            ex.add_body(body)

    def on_message_complete(self) -> None:
        ex = self.cur
        if ex.state != "done":
            ex.end_body()
        else:
            ex.body_done = True

    # ------------------------------------------------------------------ helpers

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def exchange_done(self, ex: Exchange, *, keep_alive: bool, closing: bool = False) -> None:
        if self.queue and self.queue[0] is ex:
            self.queue.pop(0)
        elif ex in self.queue:
            self.queue.remove(ex)
        if self.upgraded is ex:
            self.upgraded = None
            keep_alive = False
        if closing:
            return
        if not keep_alive:
            self.close_after_write()
            return
        if self.queue:
            nxt = self.queue[0]
            if nxt.state == "new":
                self.gw.begin(nxt)
        elif self.head_since is None and self.upgraded is None:
            self.idle_since = time.monotonic()

    def close_after_write(self) -> None:
        if not self.closed:
            self.closing = True
            self.transport.close()  # asyncio flushes the write buffer first

    def abort(self) -> None:
        if not self.closed:
            self.transport.abort()

    def discard_then_close(self, limit: int = DISCARD_LIMIT) -> None:
        """Answered early (413, 401, ...) while the body still comes: read and drop it
        for a while (at most ``limit`` bytes), so that the client reads the answer
        instead of a reset."""
        if self.closed:
            return
        self.discarding = 1 + DISCARD_LIMIT - limit
        try:
            self.transport.write_eof()
        except (NotImplementedError, OSError, RuntimeError):
            pass
        asyncio.get_running_loop().call_later(DISCARD_S, self.close_after_write)

    def _too_large(self, why: str) -> None:
        """431: the head is over a limit; close before buffering more of it."""
        self.head_since = None
        self.parser = httptools.HttpRequestParser(self)  # drop what it holds
        rid = self.gw.next_rid()
        self.write(simple_response(431, error_body(431, why, rid), rid, close=True))
        # (so that the client reads the 431, not a reset; a flood is cut off after 1 MiB)
        self.discard_then_close(HEAD_DISCARD_LIMIT)

    def _bad_request(self) -> None:
        rid = self.gw.next_rid()
        self.write(
            simple_response(400, error_body(400, "invalid HTTP request", rid), rid, close=True)
        )
        self.close_after_write()
