"""One request and its response, as a state machine.

An ``Exchange`` moves through these phases (``Phase``); every move goes through
``_to``, which refuses one the table ``NEXT`` does not list::

    HEAD --> QUEUED --+--> WAITING --+--> SENT --+--> RECEIVING --> DONE
                      |              |           +--> TUNNEL -----> DONE
                      +--------------+
                      +--> FETCHING --> DONE          (and any phase --> DONE)

- ``HEAD``: the client connection is reading the request head.
- ``QUEUED``: the head is read; the request waits for the ones pipelined before it on its
  connection, then the gateway routes it (``Gateway.begin``).
- ``WAITING``: routed, waiting for a free slot on a container of its endpoint
  (``Endpoint.waiters``), at most ``STRATO_WEB_WAIT_TIMEOUT`` seconds.
- ``FETCHING``: a request for a deferred result (``/__strato/results/<id>``) that is
  not complete yet.
- ``SENT``: it holds a slot and a tunnel (``Upstream``); the head went up, the body follows
  as it comes; no final response head yet (interim ``1xx`` heads pass through).
- ``RECEIVING``: the final response head went to the client; the body follows, raw, as it
  arrives. A response parser only watches for its end so that the tunnel can carry the
  next request.
- ``TUNNEL``: a ``101 Switching Protocols`` made both connections one raw two-way pipe.
- ``DONE``: ended.

Every end goes through ``_end``: it cancels the timers, leaves the endpoint's queue,
gives back the slot and the tunnel (to the pool when the tunnel is clean, else closed),
writes the access line, and then either completes a detached result or tells the client
connection what to do next (``After``: serve the next request, close, drop the rest of
an unread body and close, or reset).

Detaching is not an end: a request still unanswered after the HTTP limit gets a ``303``
to ``/__strato/results/<id>`` and goes on without its client, into a ``DeferredResult``.
"""

from __future__ import annotations

import asyncio
import enum
import time
from typing import TYPE_CHECKING

import httptools

from .wire import (
    LAST_CHUNK,
    BadResponse,
    body_is_framed,
    chunk,
    error_body,
    scan_response_head,
    simple_response,
    upstream_head,
)

if TYPE_CHECKING:
    from .endpoint import Backend, Endpoint
    from .gateway import Gateway
    from .proxy import ClientConn
    from .results import DeferredResult
    from .routes import Route
    from .upstream import Upstream

BODY_BUFFER = 1 << 20  # request bytes held while waiting for a tunnel, before pausing


class Phase(enum.Enum):
    bit: int  # (set below: the table NEXT as bit masks, for the check on every move)
    allowed: int

    HEAD = "head"
    QUEUED = "queued"
    WAITING = "waiting"
    FETCHING = "fetching"
    SENT = "sent"
    RECEIVING = "receiving"
    TUNNEL = "tunnel"
    DONE = "done"


NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.HEAD: frozenset({Phase.QUEUED, Phase.DONE}),
    Phase.QUEUED: frozenset({Phase.WAITING, Phase.SENT, Phase.FETCHING, Phase.DONE}),
    Phase.WAITING: frozenset({Phase.SENT, Phase.DONE}),
    Phase.FETCHING: frozenset({Phase.DONE}),
    Phase.SENT: frozenset({Phase.RECEIVING, Phase.TUNNEL, Phase.DONE}),
    Phase.RECEIVING: frozenset({Phase.DONE}),
    Phase.TUNNEL: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
}

# The members as module names: looking a member up on its enum class costs several times
# a global's, and an exchange does that many times a request.
HEAD, QUEUED, WAITING, FETCHING, SENT, RECEIVING, TUNNEL, DONE = Phase

for _i, _phase in enumerate(Phase):
    _phase.bit = 1 << _i
for _phase, _next in NEXT.items():
    _phase.allowed = sum(p.bit for p in _next)


class After(enum.Enum):
    """What the client connection does once an exchange is over."""

    KEEP = "keep"  # serve its next request
    CLOSE = "close"  # close once the answer is written
    DISCARD = "discard"  # answered before the body was read: drop the rest a while, close
    ABORT = "abort"  # reset it: the response was cut short
    NONE = "none"  # nothing: the client is gone


KEEP, CLOSE, DISCARD, ABORT, NONE = After


class Pause:
    """Why a client connection stops reading, as bits (it reads again once none is left).
    Plain ints: they are combined on every request, and enum flags are slow at that."""

    BUFFER = 1  # a request's body (or an upgrade's early bytes) waits for a tunnel
    UPSTREAM = 2  # the tunnel's write buffer is full
    PIPELINE = 4  # too many pipelined requests wait their turn
    ANY_EXCHANGE = BUFFER | UPSTREAM  # the reasons that end with an exchange


class PhaseError(RuntimeError):
    """A move the state machine does not allow (a bug)."""


class Exchange:
    __slots__ = (
        "conn",
        "gw",
        "rid",
        "t0",
        "phase",
        # the request
        "method",
        "url",
        "version",
        "headers",
        "host",
        "keep_alive",
        "upgrade",
        "content_length",
        "chunked",
        "drop",
        "head_size",
        "body_size",
        "body_done",
        "pending",
        "raw_buf",
        "refusal",
        # routing and dispatch
        "route",
        "target",
        "prefix",
        "endpoint",
        "backend",
        "up",
        "slot",
        "wait_handle",
        "limit_handle",
        "detached",
        # the response
        "status",
        "resp_head",
        "head_buf",
        "parser",
        "complete",
        "up_keep_alive",
        "sent",
    )

    def __init__(self, conn: ClientConn, rid: str) -> None:
        self.conn = conn
        self.gw: Gateway = conn.gw
        self.rid = rid
        self.t0 = time.monotonic()
        self.phase = HEAD
        self.method = b""
        self.url = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.host = ""
        self.keep_alive = False
        self.upgrade = False
        self.content_length: int | None = None
        self.chunked = False
        self.drop: set[bytes] | None = None  # headers the client's Connection header names
        self.head_size = 0  # bytes of the head parsed so far (url, headers)
        self.body_size = 0  # body bytes received so far
        self.body_done = False
        self.pending: list[bytes] | None = []  # framed body bytes not yet sent up
        self.raw_buf: list[bytes] | None = None  # bytes after an upgrade's head, before 101
        self.refusal: tuple[int, str, After] | None = None  # answered so, in its turn
        self.route: Route | None = None
        self.target = b"/"
        self.prefix = b""
        self.endpoint: Endpoint | None = None
        self.backend: Backend | None = None
        self.up: Upstream | None = None
        self.slot = False  # holds one of the backend's request slots
        self.wait_handle: asyncio.TimerHandle | None = None
        self.limit_handle: asyncio.TimerHandle | None = None
        self.detached: DeferredResult | None = None
        self.status = 0
        self.resp_head = b""  # the final response head as the container sent it (and more)
        self.head_buf = b""  # an incomplete response head
        self.parser: httptools.HttpResponseParser | None = None
        self.complete = False  # the response parser saw the end of the response
        self.up_keep_alive = False  # the tunnel may carry another request after this one
        self.sent = 0  # response bytes passed on

    def __repr__(self) -> str:
        return f"<Exchange {self.rid} {self.phase.value} {self.method!r} {self.url[:80]!r}>"

    def _to(self, phase: Phase) -> None:
        if not self.phase.allowed & phase.bit:
            raise PhaseError(f"exchange {self.rid}: {self.phase.value} -> {phase.value}")
        self.phase = phase

    # ------------------------------------------------------------------ the request

    def head_complete(self, method: bytes, version: str, keep_alive: bool, upgrade: bool) -> None:
        self.method, self.version = method, version
        self.keep_alive, self.upgrade = keep_alive, upgrade
        # a request without a body has all of it already (on_message_complete follows)
        self.body_done = not self.chunked and not self.content_length
        self._to(QUEUED)

    def refuse(self, status: int, why: str, then: After) -> None:
        """The request cannot be read: answer ``status`` in its turn (its head or body
        was malformed or over a limit)."""
        phase = self.phase
        if phase is HEAD:
            self.refusal = (status, why, then)
            self._to(QUEUED)
        elif phase is QUEUED:
            self.refusal = (status, why, then)
        elif phase in (RECEIVING, TUNNEL):
            self._end(self.status, note=why, then=ABORT)
        else:
            self.respond(status, why, then=then)

    def body(self, data: bytes) -> None:
        if self.phase is DONE:
            return
        self.body_size += len(data)
        if self.body_size > self.gw.config.max_body:
            self._body_too_large()
            return
        framed = chunk(data) if self.chunked else data
        if self.up is not None:
            self.up.write(framed)
        elif self.pending is not None:
            self.pending.append(framed)
            if self.body_size > BODY_BUFFER:
                self.conn.pause_reading(Pause.BUFFER)

    def body_end(self) -> None:
        self.body_done = True
        if self.phase is DONE or not self.chunked:
            return
        if self.up is not None:
            self.up.write(LAST_CHUNK)
        elif self.pending is not None:
            self.pending.append(LAST_CHUNK)

    def client_raw(self, data: bytes) -> None:
        """Bytes from the client after an upgrade request's head: the pipe's, once a
        ``101`` came back; held until then."""
        if not data or self.phase is DONE:
            return
        if self.phase is TUNNEL and self.up is not None:
            self.up.write(data)
            return
        if self.raw_buf is None:
            self.raw_buf = []
        self.raw_buf.append(data)
        if sum(map(len, self.raw_buf)) > BODY_BUFFER:
            self.conn.pause_reading(Pause.BUFFER)

    def client_gone(self) -> None:
        """The client closed its connection under this exchange."""
        if self.phase is DONE or self.detached is not None:
            return
        status = self.status if self.phase is TUNNEL else 499
        self._end(status, note="the client went away", then=NONE)

    def _body_too_large(self) -> None:
        limit = self.gw.config.max_body
        why = f"the request body is over the gateway's limit of {limit} bytes (STRATO_WEB_MAX_BODY)"
        if self.phase is RECEIVING:  # the response is under way: nothing to answer
            self._end(self.status, note=why, then=ABORT)
        else:
            self.respond(413, why)

    # ------------------------------------------------------------------ dispatch

    def wait(self, endpoint: Endpoint, timeout_s: float) -> None:
        """No container has a free slot: wait for one (``Endpoint.pump`` binds it)."""
        self._to(WAITING)
        endpoint.waiters.append(self)
        loop = asyncio.get_running_loop()
        self.wait_handle = loop.call_later(timeout_s, self.wait_expired)

    def bind(self, backend: Backend, up: Upstream) -> None:
        """Send the request up a tunnel of ``backend`` (a slot on it is taken)."""
        if self.wait_handle is not None:
            self.wait_handle.cancel()
            self.wait_handle = None
        self._to(SENT)
        self.backend, self.up, self.slot = backend, up, True
        up.ex = self
        out = upstream_head(
            method=self.method,
            target=self.target,
            version=self.version,
            headers=self.headers,
            drop=self.drop,
            client_ip=self.conn.client_ip,
            host=self.host,
            rid=self.rid,
            prefix=self.prefix,
            chunked=self.chunked,
            upgrade=self.upgrade,
        )
        if self.pending:
            out += self.pending
        self.pending = None
        up.write(b"".join(out))
        if self.conn.paused:
            self.conn.resume_reading(Pause.BUFFER)

    def fetching(self) -> None:
        """A request for a deferred result that is not complete yet."""
        self._to(FETCHING)

    def wait_expired(self) -> None:
        self.wait_handle = None
        if self.phase is not WAITING:
            return
        self.respond(
            503,
            f"no container of this endpoint became ready within {self.gw.config.wait_timeout_s:g}s"
            " (STRATO_WEB_WAIT_TIMEOUT); see `strato app logs` for why",
        )

    def limit_reached(self) -> None:
        """The HTTP limit passed: answer 303 and let the exchange finish detached."""
        self.limit_handle = None
        if self.phase not in (WAITING, SENT) or self.detached is not None:
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
        self.conn.exchange_done(self, KEEP if self.keep_alive else CLOSE)

    # ------------------------------------------------------------------ the response

    def from_upstream(self, data: bytes) -> None:
        phase = self.phase
        if phase is RECEIVING:
            self._receive(data)
        elif phase is TUNNEL:
            self._emit(data)
        elif phase is SENT:
            self._head(data)

    def _head(self, data: bytes) -> None:
        """Bytes before the final response head: pass interim heads, wait for the rest."""
        if self.head_buf:
            data = self.head_buf + data
            self.head_buf = b""
        try:
            scan = scan_response_head(data, self.rid)
        except BadResponse as e:
            self._fail(str(e))
            return
        if scan.interim:
            self._emit(scan.interim)
        if not scan.status:
            self.head_buf = scan.rest
            return
        self.status = scan.status
        if scan.status == 101:
            if not self.upgrade:
                self._fail("the endpoint switched protocols for a request that asked for none")
                return
            self._to(TUNNEL)
            self._emit(scan.final)
            if self.raw_buf and self.up is not None:
                self.up.write(b"".join(self.raw_buf))
            self.raw_buf = None
            self.conn.resume_reading(Pause.BUFFER)
            return
        self.resp_head = scan.raw_final
        self.parser = parser = httptools.HttpResponseParser(self)
        try:
            parser.feed_data(scan.raw_final)
        except httptools.HttpParserError:
            self._fail("the endpoint sent an invalid HTTP response")
            return
        self._to(RECEIVING)
        if self.limit_handle is not None:
            self.limit_handle.cancel()
            self.limit_handle = None
        self._emit(scan.final)
        # a response to HEAD has no body, whatever its content-length says
        if self.complete or self.method == b"HEAD":
            self._finished()

    def _receive(self, data: bytes) -> None:
        assert self.parser is not None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail("the endpoint sent an invalid HTTP response")
            return
        self._emit(data)
        if self.complete:
            self._finished()

    def _emit(self, data: bytes) -> None:
        self.sent += len(data)
        if self.detached is not None:
            self.detached.append(data)
        else:
            self.conn.write(data)

    # httptools callbacks (response parser); on_body and friends are left out on purpose:
    # the body passes through as raw bytes
    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.up_keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        assert self.parser is not None
        self.up_keep_alive = self.parser.should_keep_alive()  # (reset once it returns)
        self.complete = True

    def upstream_lost(self) -> None:
        """The tunnel closed under this exchange."""
        self.up = None
        phase = self.phase
        if phase is SENT:
            self._fail("the endpoint's container closed the connection (it may have died)")
        elif phase is RECEIVING:
            if body_is_framed(self.resp_head):  # the app failed (or died) mid-response
                self._end(
                    self.status,
                    note="cut short: the container ended the response before its end (see its log)",
                    then=ABORT,
                )
            else:  # a body delimited by the close ends here
                self._end(self.status, note="the container closed the connection", then=CLOSE)
        elif phase is TUNNEL:
            self._end(self.status, then=CLOSE)

    def _finished(self) -> None:
        """The response is complete."""
        if self.method == b"HEAD":
            reuse = self.body_done and self.up_keep_alive
        else:
            reuse = self.body_done and not self.upgrade and self.up_keep_alive
        then = KEEP if self.keep_alive and not self.upgrade else CLOSE
        self._end(self.status, reuse=reuse, then=then)

    def _fail(self, why: str) -> None:
        """The tunnel failed: a 502 where the response has not begun, else a reset."""
        if self.phase is SENT:
            self.respond(502, why)
        else:
            self._end(self.status or 502, note=why, then=ABORT)

    # ------------------------------------------------------------------ the gateway's own

    def respond(self, status: int, message: str, *, then: After | None = None) -> None:
        """Answer with the gateway's own JSON error (or status) response. Unless told,
        the connection goes on where the request was read whole and asked for it."""
        if self.phase is DONE:
            return
        if then is None:
            if not self.body_done or self.upgrade:
                then = DISCARD
            else:
                then = KEEP if self.keep_alive else CLOSE
        body = error_body(status, message, self.rid)
        data = simple_response(status, body, self.rid, close=then is not KEEP)
        self._end(status, note=message, then=then, answer=data)

    def spliced(self) -> None:
        """The connection goes on as a sandbox tunnel's byte pipe (``Gateway._tunnel``),
        this request's head included: the exchange ends here, as a switch of protocols."""
        self._end(101, note="spliced into a sandbox tunnel", then=NONE)

    def respond_raw(self, status: int, data: bytes, *, close: bool = False) -> None:
        """Answer with bytes the gateway holds (a deferred result, its health)."""
        then = KEEP if self.keep_alive and not close else CLOSE
        self._end(status, then=then, answer=data)

    # ------------------------------------------------------------------ the end

    def _end(
        self,
        status: int,
        *,
        then: After,
        note: str | None = None,
        answer: bytes = b"",
        reuse: bool = False,
    ) -> None:
        """The one way an exchange ends."""
        before = self.phase
        if before is DONE:
            return
        self._to(DONE)
        if self.wait_handle is not None:
            self.wait_handle.cancel()
            self.wait_handle = None
        if self.limit_handle is not None:
            self.limit_handle.cancel()
            self.limit_handle = None
        if before is WAITING and self.endpoint is not None:
            try:
                self.endpoint.waiters.remove(self)
            except ValueError:
                pass
        self.pending = self.raw_buf = None
        self._release(reuse)
        self.gw.access(self, status, note)
        detached = self.detached
        if detached is not None:
            if answer:
                detached.append(answer)
            detached.finish(status)
            return
        if answer:
            self.conn.write(answer)
        self.conn.exchange_done(self, then)

    def _release(self, reuse: bool) -> None:
        """Give back the slot, and the tunnel: to the pool if it is clean, else closed."""
        if not self.slot:
            return
        self.slot = False
        up, backend = self.up, self.backend
        assert backend is not None
        self.up = None
        if up is not None:
            up.ex = None
            if reuse and not up.closed:
                if up.paused:  # (by the client's backpressure)
                    up.resume_reading()
                backend.idle.append(up)
            else:
                up.close()
        backend.mark_free(time.monotonic())
        backend.endpoint.pump_all()
