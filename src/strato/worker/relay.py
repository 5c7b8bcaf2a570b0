"""The agent's end of the relay (a worker agent that joined over the network).

Containers on a joined node dial their channel exactly as on the control plane's own
machine: a Unix socket (``$STRATO_HOME/run/relay.sock``), bound into isolating runtimes
as the control plane's socket is for a local node, so ``block_network`` containers work
on every node. The agent does not read their frames: each connection becomes a numbered
stream of raw bytes over its one connection to the control plane (``RelayOpen``, then
``RelayData`` both ways, ``RelayClose`` from either end), where the control plane reads
it as it reads a direct channel connection, with the same checks. When the agent's
connection to the control plane ends, every relayed connection is closed (the control
plane counts those containers' channels gone; they are killed when their node's agent
registers again).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from strato.protocol import messages as m

log = logging.getLogger("strato.worker.relay")

READ = m.RELAY_CHUNK


class Relay:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.address = f"unix:{socket_path}"
        self._send: Callable[[object], None] | None = None
        self._drain: Callable[[], Awaitable[None]] | None = None
        self._conns: dict[int, asyncio.StreamWriter] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(
            self._on_conn, path=str(self.socket_path), limit=1 << 20
        )
        # containers run as other users under the isolating runtimes (as with the control
        # plane's socket, what guards it is the folder it is bound from and the hello)
        os.chmod(self.socket_path, 0o666)

    def attach(self, send: Callable[[object], None], drain: Callable[[], Awaitable[None]]) -> None:
        """A session with the control plane began: relay over it."""
        self._send, self._drain = send, drain

    def detach(self) -> None:
        """The session ended: every relayed connection ends with it."""
        self._send = self._drain = None
        conns, self._conns = self._conns, {}
        for w in conns.values():
            w.close()

    def on_frame(self, msg: object) -> None:
        """``RelayData`` / ``RelayClose`` from the control plane."""
        if isinstance(msg, m.RelayData):
            w = self._conns.get(msg.conn)
            if w is not None and not w.is_closing():
                w.write(msg.data)
        elif isinstance(msg, m.RelayClose):
            w = self._conns.pop(msg.conn, None)
            if w is not None:
                w.close()

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        send = self._send
        if send is None:  # no session: the container's dial fails, and it retries or ends
            writer.close()
            return
        conn = next(self._ids)
        self._conns[conn] = writer
        send(m.RelayOpen(conn))
        try:
            while True:
                data = await reader.read(READ)
                if not data or self._send is not send:
                    break
                send(m.RelayData(conn, data))
                drain = self._drain
                if drain is not None:
                    await drain()  # the control plane's connection sets the pace
        except (ConnectionError, OSError) as e:
            log.debug("relayed connection %d: %s", conn, e)
        finally:
            if self._conns.pop(conn, None) is not None and self._send is send:
                send(m.RelayClose(conn))
            writer.close()

    def close(self) -> None:
        self.detach()
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(OSError):
            self.socket_path.unlink()
