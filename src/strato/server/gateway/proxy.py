"""The byte-level HTTP/1.1 reverse proxy: one ``ClientConn`` per client connection.

``ClientConn`` parses request heads with httptools and makes an ``Exchange``
(``exchange.py``) of each request; exchanges run one at a time, in order (pipelined
requests wait their turn, their bodies buffered up to a limit). The gateway routes each
one (``Gateway.begin``); the exchange writes a rewritten head to a tunnel of a container
(``upstream.py``: the ``/<app>/<label>`` prefix stripped, hop-by-hop headers dropped,
those the ``Connection`` header names included, and the client's own ``x-forwarded-*``,
``forwarded`` and ``x-strato-request-id`` replaced by the gateway's, see ``wire.py``)
and streams the body after it: raw when the client sent a ``content-length``,
re-chunked when it sent ``chunked``. The response comes back as raw bytes, written to
the client as they arrive (chunked responses and server-sent events are never
buffered). A ``101 Switching Protocols`` turns both connections into a raw two-way pipe
(WebSockets). Backpressure goes both ways: a full write buffer on one side pauses
reading on the other.

Every exchange has a request id (``x-strato-request-id`` on every response, in the body
of the gateway's own error responses, and in the access log line).

The connection itself is in one ``ConnPhase``: reading requests, upgraded (every byte
after an upgrade request's head belongs to its exchange), spliced (its first request
named a sandbox tunnel: ``splice`` hands the transport, and the bytes read so far, to a
byte pipe), discarding (answered before it read a whole request: input is read and
dropped for a while so that the client reads the answer, not a reset), ending (it reads
no more: it answers the requests it read, then closes), closing, closed, or refused
(over the listener's connection limit).
A request head over the listener's limits gets a ``431``, a malformed request a ``400``,
each in its turn after the requests before it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import TYPE_CHECKING, cast

import httptools

from ..listeners import HeadTooLarge, refusal
from .exchange import ABORT, CLOSE, DISCARD, DONE, HEAD, KEEP, QUEUED, After, Exchange, Pause
from .wire import connection_tokens

if TYPE_CHECKING:
    from .gateway import Gateway

log = logging.getLogger("strato.gateway")

DISCARD_LIMIT = 64 << 20  # after an error answered early, read and drop this much at most
DISCARD_S = 5.0
HEAD_DISCARD_LIMIT = 1 << 20  # after a 431
MAX_PIPELINED = 32  # requests read ahead of the one running; then reading pauses
SPLICE_READ = 256 << 10  # a sandbox tunnel's client stream buffers twice this, then pauses


class ConnPhase(enum.Enum):
    OPEN = "open"
    UPGRADED = "upgraded"
    DISCARDING = "discarding"
    ENDING = "ending"
    CLOSING = "closing"
    CLOSED = "closed"
    REFUSED = "refused"
    SPLICED = "spliced"


# (as module names, for the same reason as exchange.py's)
OPEN, UPGRADED, DISCARDING, ENDING, CLOSING, CLOSED, REFUSED, SPLICED = ConnPhase


class StopParsing(Exception):
    """Raised from a parser callback: the connection reads no more requests."""


class ClientConn(asyncio.Protocol):
    """One client connection to the gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.transport: asyncio.Transport
        self.phase = OPEN
        self.parser = httptools.HttpRequestParser(self)
        self.queue: list[Exchange] = []  # the first one is running
        self.cur: Exchange | None = None  # the one being parsed
        self.upgraded: Exchange | None = None
        self.paused = 0  # Pause bits
        self.discard_budget = 0  # bytes still read and dropped while discarding
        self.eof_sent = False
        self.advancing = False  # starting the next requests (see _next)
        self.client_ip = b"-"
        # listener limits (server/listeners.py): the guard's sweep closes a connection
        # whose head is not complete ``header_timeout_s`` after ``head_since``, or that
        # is idle between requests ``keepalive_s`` after ``idle_since``
        self.head_since: float | None = None
        self.idle_since: float | None = None
        self.head_bytes = 0
        self.overflow: str | None = None
        # the bytes read until the first request head is routed (a sandbox tunnel's
        # connection sends them on as they came), then None
        self.raw: list[bytes] | None = []

    # ------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, only alike)
        self.transport = cast(asyncio.Transport, transport)
        if not self.gw.guard.admit(self):
            self.phase = REFUSED  # (reads nothing more)
            self.transport.write(refusal())
            self.transport.close()
            return
        self.head_since = time.monotonic()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.client_ip = str(peer[0]).encode()

    def guard_close(self) -> None:
        """The guard's sweep: past the header timeout, or idle past the keep-alive."""
        self.head_since = self.idle_since = None
        self.close_after_write()

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase is UPGRADED:
            assert self.upgraded is not None
            self.upgraded.client_raw(data)
            return
        if phase is DISCARDING:
            self.discard_budget -= len(data)
            if self.discard_budget < 0:
                self.close_after_write()
            return
        if phase is not OPEN:
            return
        if self.raw is not None:
            self.raw.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            ex = self.cur
            if self.phase is not OPEN or ex is None:
                return
            if ex.phase is DONE:  # answered without a switch: the parser is stuck
                self.close_after_write()
                return
            self.phase = UPGRADED
            self.upgraded = ex
            ex.client_raw(data[e.args[0] :])
            return
        except httptools.HttpParserError as e:
            if self.phase is not OPEN:
                return  # (StopParsing: answered, or closing)
            if self.overflow is not None:
                self._refuse(431, self.overflow, HEAD_DISCARD_LIMIT)
            else:
                cause = e.__cause__
                if cause is not None and not isinstance(cause, StopParsing):
                    log.error("the gateway failed on a request", exc_info=cause)
                self._refuse(400, "invalid HTTP request", 0)
            return
        if self.head_since is not None and self.phase is OPEN:
            # (a head that began in this chunk counts it all)
            self.head_bytes += len(data)
            limit = self.gw.config.limits.max_header_bytes
            if self.head_bytes > limit:
                self._refuse(
                    431,
                    f"the request head is over {limit} bytes (STRATO_MAX_HEADER_BYTES)",
                    HEAD_DISCARD_LIMIT,
                )

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase is REFUSED:
            return
        self.phase = CLOSED
        self.gw.guard.release(self)
        self.upgraded = None
        queue, self.queue = self.queue, []
        for ex in queue:
            ex.client_gone()

    def pause_writing(self) -> None:
        if self.queue and self.queue[0].up is not None:
            self.queue[0].up.pause_reading()

    def resume_writing(self) -> None:
        if self.queue and self.queue[0].up is not None:
            self.queue[0].up.resume_reading()

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        if self.phase is not OPEN:
            raise StopParsing
        self.cur = ex = Exchange(self, self.gw.next_rid())
        if self.head_since is None:
            self.head_since = ex.t0
        self.idle_since = None

    def on_url(self, url: bytes) -> None:
        ex = self.cur
        assert ex is not None
        ex.url += url
        ex.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.cur
        assert ex is not None
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
            tokens = connection_tokens(value)
            if tokens:
                ex.drop = tokens if ex.drop is None else ex.drop | tokens
        ex.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_since = None
        self.head_bytes = 0
        ex = self.cur
        assert ex is not None
        p = self.parser
        ex.head_complete(
            p.get_method(), p.get_http_version(), p.should_keep_alive(), p.should_upgrade()
        )
        self.queue.append(ex)
        if len(self.queue) > MAX_PIPELINED:
            self.pause_reading(Pause.PIPELINE)
        if len(self.queue) == 1:
            self._start(ex)
        self.raw = None
        if self.phase is SPLICED:
            raise StopParsing  # (the rest of the data is the tunnel's)

    def on_body(self, body: bytes) -> None:
        assert self.cur is not None
        self.cur.body(body)

    def on_message_complete(self) -> None:
        assert self.cur is not None
        self.cur.body_end()
        if not self.queue:  # (its exchange ended before the last of its body came)
            self._maybe_idle()

    # ------------------------------------------------------------------ exchanges

    def _start(self, ex: Exchange) -> None:
        if ex.refusal is not None:
            status, why, then = ex.refusal
            ex.respond(status, why, then=then)
            return
        try:
            self.gw.begin(ex)
        except Exception:  # a bug: answer it rather than leave the connection hanging
            log.exception("the gateway failed to route %r", ex)
            ex.respond(500, "the gateway failed on this request (see its log)", then=CLOSE)

    def exchange_done(self, ex: Exchange, then: After) -> None:
        """``ex`` is over for this connection (ended, or detached from it)."""
        queue = self.queue
        if queue and queue[0] is ex:
            queue.pop(0)
        elif ex in queue:
            queue.remove(ex)
        if self.paused:
            self.resume_reading(Pause.ANY_EXCHANGE)
            if len(queue) <= MAX_PIPELINED:
                self.resume_reading(Pause.PIPELINE)
        if self.upgraded is ex:
            self.upgraded = None
            if self.phase is UPGRADED:
                self.phase = OPEN  # (and closed just below)
            if then is KEEP:
                then = CLOSE
        if then is KEEP:
            self._next()
        elif then is CLOSE:
            self.close_after_write()
        elif then is DISCARD:
            self.discard_then_close()
        elif then is ABORT:
            self.abort()

    def _next(self) -> None:
        """Start the requests that waited their turn, until one of them runs. (A loop,
        not a recursion: requests answered at once end while it runs.)"""
        if self.advancing:
            return
        self.advancing = True
        try:
            while (
                self.queue
                and self.queue[0].phase is QUEUED
                and self.phase is not CLOSING
                and self.phase is not CLOSED
            ):
                self._start(self.queue[0])
        finally:
            self.advancing = False
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self.queue or self.phase is not OPEN or self.head_since is not None:
            return
        if self.cur is None or self.cur.body_done:
            self.idle_since = time.monotonic()

    def _refuse(self, status: int, why: str, discard: int) -> None:
        """The request being read cannot be: answer ``status`` after the requests before
        it, then close (reading and dropping at most ``discard`` bytes meanwhile)."""
        self.head_since = None
        self.head_bytes = 0
        self.parser = httptools.HttpRequestParser(self)  # drop what it holds
        if discard:
            self.phase = DISCARDING
            self.discard_budget = discard
            then = DISCARD
        else:
            self.phase = ENDING
            then = CLOSE
        ex = self.cur
        if ex is None or not (ex.phase is HEAD or (ex in self.queue and not ex.body_done)):
            ex = Exchange(self, self.gw.next_rid())  # between requests: one of its own
        queued = ex.phase is not HEAD
        ex.refuse(status, why, then)
        if not queued:
            self.queue.append(ex)
            if len(self.queue) == 1:
                self._start(ex)

    # ------------------------------------------------------------------ the transport

    def splice(self) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
        """While the first request's head is routed: the connection leaves HTTP for a byte
        pipe. Returns the bytes read so far (that head and whatever followed it) and
        streams for the rest; the connection stays in the guard's count until the pipe
        releases it."""
        assert self.raw is not None
        first, self.raw = b"".join(self.raw), None
        self.phase = SPLICED
        self.head_since = self.idle_since = None
        reader = asyncio.StreamReader(limit=SPLICE_READ)
        proto = asyncio.StreamReaderProtocol(reader)
        self.transport.set_protocol(proto)
        proto.connection_made(self.transport)
        writer = asyncio.StreamWriter(self.transport, proto, reader, asyncio.get_running_loop())
        if self.paused:
            self.paused = 0
            self.transport.resume_reading()
        return first, reader, writer

    def write(self, data: bytes) -> None:
        if self.phase is not CLOSED and not self.eof_sent:
            self.transport.write(data)

    def pause_reading(self, why: int) -> None:
        if not self.paused and self.phase is not CLOSED:
            self.transport.pause_reading()
        self.paused |= why

    def resume_reading(self, why: int) -> None:
        if not self.paused:
            return
        self.paused &= ~why
        if not self.paused and self.phase is not CLOSED:
            self.transport.resume_reading()

    def close_after_write(self) -> None:
        if self.phase not in (CLOSED, REFUSED):
            self.phase = CLOSING
            self.transport.close()  # asyncio flushes the write buffer first

    def abort(self) -> None:
        if self.phase is not CLOSED:
            self.phase = CLOSING
            self.transport.abort()

    def discard_then_close(self) -> None:
        """Answered early (413, 401, ...) while the body still comes: read and drop it
        for a while (at most ``discard_budget`` bytes), so that the client reads the
        answer instead of a reset."""
        if self.phase in (CLOSED, CLOSING, REFUSED):
            return
        if self.phase is not DISCARDING:
            self.phase = DISCARDING
            self.discard_budget = DISCARD_LIMIT
        self.resume_reading(Pause.ANY_EXCHANGE | Pause.PIPELINE)
        try:
            self.transport.write_eof()
            self.eof_sent = True
        except (NotImplementedError, OSError, RuntimeError):
            pass
        asyncio.get_running_loop().call_later(DISCARD_S, self.close_after_write)
