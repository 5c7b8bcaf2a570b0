"""Sandbox tunnels through the web gateway: a connection spliced to a sandbox's port.

A request whose host name is ``<sandbox-id>-<port>.tunnel.<domain>``
(``routes.tunnel_host``) is not routed to a web endpoint: its connection, from that first
request on (its head included, as it came), is handed to the sandbox's port
(``TunnelsView``, served by ``server/sandboxes/tunnels.py``) as raw bytes both ways (HTTP,
WebSockets). The gateway's limits apply to that first head, the sandbox's tunnel limits
after it.
:class:`SandboxTunnels` is the base of :class:`~strato.server.gateway.gateway.Gateway`,
which sets up the state declared here.
"""

from __future__ import annotations

import asyncio
from typing import Protocol
from urllib.parse import urlsplit

from ..listeners import ConnectionGuard
from .exchange import CLOSE, Exchange
from .proxy import ClientConn
from .routes import tunnel_hostname
from .wire import error_body, simple_response


class TunnelsView(Protocol):
    """The sandboxes' tunnels (``server/sandboxes/tunnels.py``), for connections to a
    tunnel's host name."""

    def refusal(self, sandbox_id: str, port: int) -> tuple[int, str] | None:
        """(status, why) where no connection can go to that port now, else None."""
        ...

    async def splice(
        self,
        sandbox_id: str,
        port: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        first: bytes,
    ) -> None:
        """Pipe the connection to the port, ``first`` before the rest; raises
        ``ConnectionError`` (why) when the tunnel cannot be opened."""
        ...


class SandboxTunnels:
    """The gateway's sandbox tunnels (the base of ``Gateway``)."""

    # set up by Gateway.__init__
    url: str
    guard: ConnectionGuard[ClientConn]
    tunnels: TunnelsView | None  # set where sandboxes are served
    _spliced: set[asyncio.Task[None]]  # connections in a sandbox tunnel

    def tunnel_url(self, sandbox_id: str, port: int) -> str | None:
        """The URL of a sandbox port through this gateway: the gateway's URL with the
        tunnel's host name (under the URL's host name, or ``localhost`` where that is an
        address), or None where the gateway is off."""
        if not self.url:
            return None
        parts = urlsplit(self.url)
        domain = parts.hostname or "localhost"
        if domain.replace(".", "").isdigit() or ":" in domain:
            domain = "localhost"
        host = tunnel_hostname(sandbox_id, port, domain)
        return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")

    def _tunnel(self, ex: Exchange, sandbox_id: str, port: int) -> None:
        """A request to a sandbox tunnel's host name: the connection becomes the tunnel's
        (from its first request on, so that the bytes it read go up as they came)."""
        tunnels = self.tunnels
        refusal = tunnels.refusal(sandbox_id, port) if tunnels is not None and port else (404, "")
        if refusal is not None:
            status, why = refusal
            if status == 404:  # the same whether it never was, has ended, or is another's
                why = f"no sandbox tunnel is served at {ex.host[:200]}"
            ex.respond(status, why)
            return
        conn = ex.conn
        if conn.raw is None:
            ex.respond(
                421,
                "this connection carried other requests before: a sandbox tunnel takes a "
                "connection of its own from its first request (open a new connection)",
                then=CLOSE,
            )
            return
        ex.spliced()
        first, reader, writer = conn.splice()
        task = asyncio.create_task(
            self._splice(conn, ex.rid, (sandbox_id, port), reader, writer, first)
        )
        self._spliced.add(task)
        task.add_done_callback(self._spliced.discard)

    async def _splice(
        self,
        conn: ClientConn,
        rid: str,
        target: tuple[str, int],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        first: bytes,
    ) -> None:
        assert self.tunnels is not None
        try:
            await self.tunnels.splice(*target, reader, writer, first)
        except ConnectionError as e:  # nothing went through: the client gets why
            body = error_body(502, f"the sandbox tunnel could not be opened: {e}", rid)
            writer.write(simple_response(502, body, rid, close=True))
        finally:
            if not writer.is_closing():
                writer.close()
            self.guard.release(conn)
