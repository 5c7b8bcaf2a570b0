"""Sandbox tunnels: ports of a sandbox reachable from outside (``encrypted_ports``,
``unencrypted_ports``; ``sb.tunnels()``).

Each port is reached two ways, both byte pipes to the port inside the sandbox:

- **through the web gateway** (``Tunnel.url``): ``http://<sandbox-id>-<port>.tunnel.<domain>
  :<gateway port>``. The gateway reads the head of a connection's first request, sees the
  host name (``routes.tunnel_host``) and hands the connection, that head included, to
  ``splice``; HTTP (keep-alive) and WebSockets pass unchanged, and no port is opened per
  tunnel. Tunnels are public URLs, as in Modal: whoever has the URL connects (the
  sandbox id in it is 64 random bits); an unknown or ended one is a 404.
- **a TCP listener of its own** on the web gateway's host (``STRATO_GATEWAY_HOST``,
  loopback by default; ``tcp_socket``/``tls_socket``), made when the sandbox is created and
  closed when it ends, for any TCP protocol.

The sandbox needs no network for either (``block_network=True`` works): the control
plane sends its agent an ``SbTunnelOpen``; the agent connects to ``127.0.0.1:<port>``
inside the sandbox and dials the channel socket it already has (relayed by its node's
agent on a joined node, like a web endpoint's tunnel), whose first frame,
``SbTunnelHello``, carries the container's token and the connection's id; raw bytes
follow. A hello whose container or token is not the sandbox's is dropped (another app's
container cannot take a connection), and another app's container cannot reach the
listener either: containers do not reach the host's loopback. ``encrypted_ports`` speak
TLS where the control plane has a certificate (``STRATO_TLS_CERT``/``STRATO_TLS_KEY``);
``unencrypted_ports`` are always plain TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import itertools
import logging
import socket
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from strato import exceptions as exc
from strato import settings
from strato.protocol import messages as m

if TYPE_CHECKING:
    from .manager import Sandbox, Sandboxes

log = logging.getLogger("strato.sandboxes")

OPEN_TIMEOUT_S = 10.0  # the agent's connection for a client, after SbTunnelOpen
START_WAIT_S = 60.0  # a client that connects while its sandbox still starts waits this long
READ_SIZE = 256 << 10
MAX_CONNECTIONS = 256  # client connections one sandbox's tunnels carry at once


def check_ports(req: m.CreateSandbox) -> list[tuple[int, bool]]:
    """(port, encrypted) of each port asked for; a port asked twice is an error."""
    ports = [(p, True) for p in req.encrypted_ports] + [(p, False) for p in req.unencrypted_ports]
    seen: set[int] = set()
    for p, _ in ports:
        if p in seen:
            raise exc.InvalidError(
                f"port {p} is given twice (encrypted_ports and unencrypted_ports together "
                "name each port once)"
            )
        seen.add(p)
    return ports


@dataclass(eq=False)
class _Tunnels:
    """One sandbox's listeners and the connections they carry."""

    infos: list[m.TunnelInfo] = field(default_factory=list)
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    closed: bool = False


class Tunnels:
    def __init__(self, sandboxes: Sandboxes) -> None:
        self.sandboxes = sandboxes
        self.by_sandbox: dict[str, _Tunnels] = {}
        # conn id -> (sandbox, the client handler's future for the agent's connection)
        self.pending: dict[int, tuple[Sandbox, asyncio.Future]] = {}
        self._ids = itertools.count(1)
        self._tls: ssl.SSLContext | None | bool = False  # False: not loaded yet

    # ------------------------------------------------------------------ listeners

    def _where(self) -> tuple[str, str]:
        """(the address listeners bind, the host name clients are told)."""
        gw = self.sandboxes.cp.gateway
        bind = gw.config.host
        shown = urlsplit(gw.url).hostname if gw.url else None
        if not shown:
            shown = bind if bind not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return bind, shown

    def tls(self) -> ssl.SSLContext | None:
        if self._tls is False:
            from ..cluster.agents import server_ssl

            self._tls = server_ssl(settings.TLS_CERT.get(), settings.TLS_KEY.get())
        assert not isinstance(self._tls, bool)
        return self._tls

    async def open(self, sb: Sandbox, ports: list[tuple[int, bool]]) -> None:
        """Listen for each of ``sb``'s ports (at its create)."""
        if not ports:
            return
        bind, shown = self._where()
        gw = self.sandboxes.cp.gateway
        t = self.by_sandbox.setdefault(sb.sandbox_id, _Tunnels())
        try:
            for port, encrypted in ports:
                tls = self.tls() if encrypted else None
                sock = socket.create_server((bind, 0), backlog=128)
                server = await asyncio.start_server(
                    functools.partial(self._client, sb, port),
                    sock=sock,
                    ssl=tls,
                    limit=READ_SIZE,
                )
                t.servers.append(server)
                bound = sock.getsockname()[1]
                url = gw.tunnel_url(sb.sandbox_id, port) or ""
                t.infos.append(
                    m.TunnelInfo(port, shown, bound, tls is not None, not encrypted, url)
                )
        except OSError as e:
            self.close(sb.sandbox_id)
            raise exc.ResourceUnavailableError(f"cannot listen for a tunnel on {bind}: {e}") from e
        if sb.ended:  # it ended while the listeners were made
            self.close(sb.sandbox_id)

    def infos(self, sb: Sandbox) -> list[m.TunnelInfo]:
        t = self.by_sandbox.get(sb.sandbox_id)
        return list(t.infos) if t is not None and not t.closed else []

    def close(self, sandbox_id: str) -> None:
        """The sandbox ended: its listeners and every connection they carry go."""
        t = self.by_sandbox.pop(sandbox_id, None)
        if t is None:
            return
        t.closed = True
        for server in t.servers:
            server.close()
        for w in t.writers:
            w.transport.abort()
        t.writers.clear()
        for cid, (sb, fut) in list(self.pending.items()):
            if sb.sandbox_id == sandbox_id:
                del self.pending[cid]
                if not fut.done():
                    fut.set_exception(exc.SandboxTerminatedError(f"sandbox {sandbox_id} ended"))

    # ------------------------------------------------------------------ connections

    def refusal(self, sandbox_id: str, port: int) -> tuple[int, str] | None:
        """Why the gateway cannot splice a connection into ``port`` of ``sandbox_id``
        (404: no such live tunnel, whatever the workspace; 503: at its connection
        limit), or None."""
        t = self.by_sandbox.get(sandbox_id)
        if t is None or t.closed or all(i.port != port for i in t.infos):
            return 404, "no sandbox tunnel is served at this host name"
        if len(t.writers) >= 2 * MAX_CONNECTIONS:
            return 503, f"the sandbox's tunnels carry {MAX_CONNECTIONS} connections, their limit"
        return None

    async def splice(
        self,
        sandbox_id: str,
        port: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        first: bytes,
    ) -> None:
        """A gateway connection for ``port`` of ``sandbox_id``: ``first`` (the bytes the
        gateway read, a request head and what followed it) and then the rest of it go
        to the port, as through the port's listener. Raises ``ConnectionError`` (the
        reason) when the tunnel cannot be opened: nothing went through yet."""
        sb = self.sandboxes.live.get(sandbox_id)
        if sb is None:
            raise ConnectionError(f"sandbox {sandbox_id} has ended")
        await self._pipe(sb, port, reader, writer, first, raise_unopened=True)

    async def _client(
        self, sb: Sandbox, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A client connected to the listener of ``port``."""
        await self._pipe(sb, port, reader, writer, b"", raise_unopened=False)

    async def _pipe(
        self,
        sb: Sandbox,
        port: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        first: bytes,
        *,
        raise_unopened: bool,
    ) -> None:
        """Ask the agent for a connection to ``port``, then pipe bytes both ways (``first``
        up before the rest) until both sides end (or the sandbox does). A tunnel that
        cannot be opened resets the client, or raises ``ConnectionError`` where
        ``raise_unopened`` (the caller answers)."""
        t = self.by_sandbox.get(sb.sandbox_id)
        if t is None or t.closed or len(t.writers) >= 2 * MAX_CONNECTIONS:
            if raise_unopened:
                raise ConnectionError(f"sandbox {sb.sandbox_id} has no tunnel to port {port} now")
            writer.transport.abort()
            return
        t.writers.add(writer)
        conn_id = next(self._ids)
        try:
            await self.sandboxes.wait_running(sb, START_WAIT_S)
            s = sb.container
            assert s is not None
            fut: asyncio.Future = asyncio.get_running_loop().create_future()
            self.pending[conn_id] = (sb, fut)
            s.send(m.SbTunnelOpen(conn_id, port))
            up_reader, up_writer, hello, done = await asyncio.wait_for(fut, OPEN_TIMEOUT_S)
            why = hello.error
            if why:
                done.set_result(None)  # (the caller of on_hello closes the agent's side)
        except TimeoutError:
            why = f"the sandbox's agent did not connect to port {port} within {OPEN_TIMEOUT_S:g}s"
        except (exc.Error, ConnectionError) as e:
            why = str(e) or type(e).__name__
        if why:
            log.info("tunnel to port %s of sandbox %s: not opened (%s)", port, sb.sandbox_id, why)
            self.pending.pop(conn_id, None)
            t.writers.discard(writer)
            if raise_unopened:
                raise ConnectionError(why)
            writer.transport.abort()
            return
        try:
            t.writers.add(up_writer)
            if first:
                up_writer.write(first)
            await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
        finally:
            t.writers.discard(writer)
            t.writers.discard(up_writer)
            writer.close()
            if not done.done():
                done.set_result(None)

    async def on_hello(
        self, hello: m.SbTunnelHello, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A connection the agent dialed for ``hello.conn_id``: hand it to its client's
        handler and hold it (the caller closes it) until that pipe has ended."""
        entry = self.pending.get(hello.conn_id)
        s = entry[0].container if entry is not None else None
        if (
            entry is None
            or s is None
            or s.container_id != hello.container_id
            or not hmac.compare_digest(s.token.encode(), hello.token.encode())
        ):
            log.warning("a tunnel hello for connection %s that is not its; closed", hello.conn_id)
            return
        del self.pending[hello.conn_id]
        _sb, fut = entry
        if fut.done():
            return
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        fut.set_result((reader, writer, hello, done))
        await done


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Bytes from ``src`` to ``dst`` until ``src`` ends, then half-close ``dst`` (where it
    can be: a relayed stream cannot, and ends with the other direction)."""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await src.read(READ_SIZE):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
