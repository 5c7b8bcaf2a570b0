"""A tunnel a web container dialed: a keep-alive HTTP/1.1 connection to its server.

The gateway adopts the connection (``Gateway.adopt_tunnel``) and pools it on the
container's ``Backend``; an ``Exchange`` borrows it for one request at a time. Bytes
from the container go to the exchange that holds the tunnel; a tunnel that speaks while
nobody holds it is confused and dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from .exchange import Pause

if TYPE_CHECKING:
    from .endpoint import Backend
    from .exchange import Exchange


class Upstream(asyncio.Protocol):
    __slots__ = ("backend", "transport", "ex", "closed", "paused", "owner", "on_lost")

    def __init__(self, backend: Backend, owner: object = None) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.ex: Exchange | None = None
        self.closed = False
        self.paused = False  # reading paused (the client's write buffer is full)
        # the channel's StreamWriter this connection came in with: it closes the transport
        # when garbage-collected, so it lives as long as the tunnel
        self.owner = owner
        self.on_lost: Callable[[], None] | None = None  # the channel listener's count of it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, only alike)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:  # nothing asked: the container's server is confused; drop it
            self.close()
            return
        ex.from_upstream(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
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
        if ex is not None:
            ex.conn.pause_reading(Pause.UPSTREAM)

    def resume_writing(self) -> None:
        ex = self.ex
        if ex is not None:
            ex.conn.resume_reading(Pause.UPSTREAM)

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if not self.closed and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.closed and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()


def adopt(backend: Backend, writer: asyncio.StreamWriter) -> Upstream:
    """Take over the transport of a channel connection (an ``asyncio.StreamWriter``)."""
    up = Upstream(backend, writer)
    transport = writer.transport
    transport.set_protocol(up)
    up.connection_made(transport)
    return up
