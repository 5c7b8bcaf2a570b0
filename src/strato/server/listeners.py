"""Limits of the control plane's three listeners: the HTTP API (uvicorn), the web gateway
and the channel (a Unix socket). They share one process, so each one gets a share of its
open files and cannot starve the others.

- **Open-file budget** (``fd_budget``): at start-up the process raises its
  ``RLIMIT_NOFILE`` soft limit to the hard limit, at most 65536 (or sets it to
  ``STRATO_MAX_OPEN_FILES``) and
  splits it: a reserve for everything else it opens (database, blobs, logs, pipes of the
  worker agent), then 50% for the gateway's client connections, 20% for the API's and 30%
  for the channel's (workers, containers and their web tunnels). A listener at its share
  refuses more connections at once (the gateway and the API answer ``503`` and close, the
  channel closes), so 30,000 slow connections to the gateway leave the API and the
  channel their files.
- **Header read timeout**: a connection must send a complete request head within
  ``STRATO_HEADER_TIMEOUT`` seconds of connecting (or of the first byte of its next
  request); a head trickled byte by byte (slowloris) does not extend it. Such connections
  are closed by a sweep that runs every second (``ConnectionGuard.sweep``).
- **Header size and count**: a head over ``STRATO_MAX_HEADER_BYTES`` or with more than
  ``STRATO_MAX_HEADERS`` header lines gets ``431`` and the connection is closed before
  more of it is buffered.
- **Idle keep-alive**: a connection idle between requests is closed after
  ``STRATO_KEEPALIVE_TIMEOUT`` seconds.

uvicorn has no header timeout or header-count limit of its own: ``api_protocol`` returns
a subclass of its httptools protocol that adds them. The gateway's own protocol
(``gateway/proxy.py``) uses the same ``ConnectionGuard``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from strato import settings

log = logging.getLogger("strato.listeners")

DEFAULT_HEADER_TIMEOUT_S = settings.HEADER_TIMEOUT.default
DEFAULT_KEEPALIVE_S = settings.KEEPALIVE_TIMEOUT.default
DEFAULT_MAX_HEADER_BYTES = settings.MAX_HEADER_BYTES.default
DEFAULT_MAX_HEADERS = settings.MAX_HEADERS.default
SWEEP_EVERY_S = 1.0
# shares of the open files left after the reserve
GATEWAY_SHARE, API_SHARE, CHANNEL_SHARE = 0.5, 0.2, 0.3
# at most this many connections by default, however high the limit (memory bounds them too)
GATEWAY_CAP, API_CAP, CHANNEL_CAP = 20000, 4096, 20000
RESERVE_MIN = 256  # open files kept for the rest of the process
NOFILE_CEILING = 1 << 20  # where the hard limit is unlimited
NOFILE_DEFAULT = 1 << 16  # raised this far by default (the worker agent inherits it)


@dataclass(frozen=True)
class FdBudget:
    """How the process's open files are shared between its listeners."""

    limit: int  # the RLIMIT_NOFILE soft limit now in force
    reserved: int
    gateway: int
    api: int
    channel: int


def raise_nofile(want: int | None = None) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit, at most ``NOFILE_DEFAULT``
    (never lowering it), or set it to ``want`` (at most the hard limit); returns the soft
    limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    target = min(top, want) if want else max(soft, min(top, NOFILE_DEFAULT))
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot set the open-file limit to %d: %s", target, e)
    return soft


def fd_budget(env: Mapping[str, str] | None = None) -> FdBudget:
    """Raise the open-file limit and split it between the listeners (see the module's
    doc). ``STRATO_GATEWAY_MAX_CONNECTIONS``, ``STRATO_API_MAX_CONNECTIONS`` and
    ``STRATO_CHANNEL_MAX_CONNECTIONS`` override a share."""
    limit = raise_nofile(settings.MAX_OPEN_FILES.get(env))
    reserved = max(RESERVE_MIN, limit // 10)
    usable = max(limit - reserved, 64)

    def share(setting: settings.Setting[int | None], frac: float, cap: int) -> int:
        given = setting.get(env)
        return given if given is not None else max(16, min(cap, int(usable * frac)))

    budget = FdBudget(
        limit=limit,
        reserved=reserved,
        gateway=share(settings.GATEWAY_MAX_CONNECTIONS, GATEWAY_SHARE, GATEWAY_CAP),
        api=share(settings.API_MAX_CONNECTIONS, API_SHARE, API_CAP),
        channel=share(settings.CHANNEL_MAX_CONNECTIONS, CHANNEL_SHARE, CHANNEL_CAP),
    )
    if budget.gateway + budget.api + budget.channel > limit - RESERVE_MIN // 2:
        log.warning(
            "the listeners' connection limits (%d + %d + %d) exceed the open-file limit %d: "
            "one listener's clients can starve the others",
            budget.gateway,
            budget.api,
            budget.channel,
            limit,
        )
    return budget


@dataclass(frozen=True)
class ListenerLimits:
    max_connections: int
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_headers: int = DEFAULT_MAX_HEADERS

    @classmethod
    def from_env(cls, max_connections: int, env: Mapping[str, str] | None = None) -> ListenerLimits:
        return cls(
            max_connections=max_connections,
            header_timeout_s=settings.HEADER_TIMEOUT.get(env),
            keepalive_s=settings.KEEPALIVE_TIMEOUT.get(env),
            max_header_bytes=settings.MAX_HEADER_BYTES.get(env),
            max_headers=settings.MAX_HEADERS.get(env),
        )

    @property
    def backlog(self) -> int:
        """The listen backlog: connections the kernel queues before they are accepted
        (accepting a burst briefly takes as many files; the reserve absorbs them)."""
        return max(64, min(4096, self.max_connections // 4))


class Guarded(Protocol):
    """A connection the guard watches."""

    @property
    def head_since(self) -> float | None: ...
    @property
    def idle_since(self) -> float | None: ...
    def guard_close(self) -> None: ...


C = TypeVar("C", bound=Guarded)


class ConnectionGuard(Generic[C]):
    """The connections of one listener: admission against its limit, and the deadlines
    that a sweep enforces. A guarded connection has ``head_since`` (monotonic time its
    current request head began, or ``None`` when it is not reading one), ``idle_since``
    (``None`` unless idle between requests, when the guard, not the protocol, closes idle
    ones) and ``guard_close()``."""

    def __init__(self, name: str, limits: ListenerLimits) -> None:
        self.name = name
        self.limits = limits
        self.conns: set[C] = set()
        self.refused = 0
        self.timed_out = 0
        self._warned_at = 0.0
        self._sweeper: asyncio.Task[None] | None = None

    def admit(self, conn: C) -> bool:
        if self._sweeper is None:  # on the listener's loop, with its first connection
            self._sweeper = asyncio.get_running_loop().create_task(
                sweep_forever([self]), name=f"sweep {self.name}"
            )
        if len(self.conns) >= self.limits.max_connections:
            self.refused += 1
            now = time.monotonic()
            if now - self._warned_at > 60:
                self._warned_at = now
                log.warning(
                    "%s: %d connections open, its limit; refusing more (%d refused so far)",
                    self.name,
                    len(self.conns),
                    self.refused,
                )
            return False
        self.conns.add(conn)
        return True

    def release(self, conn: C) -> None:
        self.conns.discard(conn)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def sweep(self, now: float) -> int:
        """Close connections past their header timeout or idle past the keep-alive
        timeout; returns how many."""
        head_deadline = now - self.limits.header_timeout_s
        idle_deadline = now - self.limits.keepalive_s
        closed = 0
        for conn in list(self.conns):
            head = conn.head_since
            idle = conn.idle_since
            if (head is not None and head < head_deadline) or (
                idle is not None and idle < idle_deadline
            ):
                if head is not None:
                    self.timed_out += 1
                closed += 1
                conn.guard_close()
        return closed


async def sweep_forever(guards: list[ConnectionGuard[Any]]) -> None:
    """The sweep of every guard, once a second, until cancelled."""
    while True:
        await asyncio.sleep(SWEEP_EVERY_S)
        now = time.monotonic()
        for g in guards:
            try:
                g.sweep(now)
            except Exception:  # a bug here must not stop the other listeners' sweeps
                log.exception("sweeping %s failed", g.name)


def refusal(status_line: bytes = b"HTTP/1.1 503 Service Unavailable") -> bytes:
    body = b'{"error": "Service Unavailable", "message": "too many connections"}'
    return (
        status_line
        + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nconnection: close\r\n\r\n"
        + body
    )


def too_large(what: str) -> bytes:
    body = json.dumps({"error": "Request Header Fields Too Large", "message": what}).encode()
    return (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


class HeadTooLarge(Exception):
    """Raised from a parser callback: the request head is over a limit."""


# ---------------------------------------------------------------------- the API (uvicorn)


def api_protocol(guard: ConnectionGuard[Any]) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with ``guard``'s limits: connections over the limit
    get a 503 and are closed; a head must be complete within the header timeout and
    within the size and count limits (else 431). Keep-alive idling is uvicorn's own
    (``timeout_keep_alive``)."""
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    limits = guard.limits
    max_bytes, max_headers = limits.max_header_bytes, limits.max_headers

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.head_since: float | None = None
            self.idle_since: float | None = None  # uvicorn closes idle keep-alive ones itself
            self.head_bytes = 0  # bytes received while a head is incomplete
            self.head_size = 0  # bytes of the head parsed (url, headers)
            self.nheaders = 0
            self.refused = False
            self.overflow: str | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            if not guard.admit(self):
                self.refused = True
                transport.write(refusal())
                transport.close()
                return
            super().connection_made(transport)
            self.head_since = time.monotonic()

        def connection_lost(self, exc) -> None:
            if self.refused:
                return
            guard.release(self)
            super().connection_lost(exc)

        def guard_close(self) -> None:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.refused:
                return
            super().data_received(data)
            if self.head_since is not None and not self.transport.is_closing():
                self.head_bytes += len(data)
                if self.head_bytes > max_bytes:
                    self._too_large(f"the request head is over {max_bytes} bytes")

        def send_400_response(self, msg: str) -> None:
            if self.overflow is not None:
                self._too_large(self.overflow)
                return
            super().send_400_response(msg)

        def _too_large(self, why: str) -> None:
            self.head_since = None
            self.transport.write(too_large(why))
            self.transport.close()
            self.parser = httptools.HttpRequestParser(self)  # drop what it buffered

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self.head_since is None:
                self.head_since = time.monotonic()
            self.head_bytes = 0
            self.head_size = 0
            self.nheaders = 0

        def on_url(self, url: bytes) -> None:
            self.head_size += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self.nheaders += 1
            self.head_size += len(name) + len(value) + 4
            if self.nheaders > max_headers:
                self.overflow = f"the request has over {max_headers} header lines"
                raise HeadTooLarge(self.overflow)
            if self.head_size > max_bytes:
                self.overflow = f"the request head is over {max_bytes} bytes"
                raise HeadTooLarge(self.overflow)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self.head_since = None
            self.head_bytes = 0
            super().on_headers_complete()

    return GuardedHttpToolsProtocol


def api_uvicorn_options(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``uvicorn.Config`` arguments that give the API listener its limits."""
    limits = ListenerLimits.from_env(fd_budget(env).api, env)
    guard: ConnectionGuard[Any] = ConnectionGuard("API listener", limits)
    return {
        "http": api_protocol(guard),
        "ws": "none",  # the API has no WebSocket routes
        "timeout_keep_alive": limits.keepalive_s,
        "backlog": limits.backlog,
    }


# ---------------------------------------------------------------------- the channel


class _ChannelConn:
    __slots__ = ("transport", "head_since", "idle_since")

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.head_since: float | None = None  # the channel's handler times its first frame
        self.idle_since: float | None = None

    def guard_close(self) -> None:
        self.transport.close()


def guard_stream_handler(
    guard: ConnectionGuard[Any],
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """Wrap an ``asyncio.start_*_server`` handler so that connections over the guard's
    limit are closed at once. A connection the handler hands to another protocol (a web
    tunnel, ``transport.set_protocol``) counts until that protocol's ``connection_lost``:
    the handler's protocol gets an ``on_lost`` callback if it has that attribute."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        conn = _ChannelConn(transport)
        if not guard.admit(conn):
            transport.abort()
            return
        handed_off = False
        try:
            await handler(reader, writer)
        finally:
            proto = transport.get_protocol()
            if not transport.is_closing() and hasattr(proto, "on_lost"):
                proto.on_lost = lambda: guard.release(conn)
                handed_off = True
            if not handed_off:
                guard.release(conn)

    return guarded


def guard_channel(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    env: Mapping[str, str] | None = None,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """The channel's handler with its share of the open files as its connection limit."""
    limits = ListenerLimits.from_env(fd_budget(env).channel, env)
    guard: ConnectionGuard[Any] = ConnectionGuard("channel", limits)
    return guard_stream_handler(guard, handler)
