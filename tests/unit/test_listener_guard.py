"""The channel listener's connection guard (``listeners.guard_stream_handler``) on a real
Unix socket: connections over the limit are closed at once, and a connection handed to
another protocol (a web tunnel) counts until that protocol loses it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from strato.server.listeners import ConnectionGuard, ListenerLimits, guard_stream_handler


class Tunnel(asyncio.Protocol):
    """Like the gateway's ``Upstream``: calls ``on_lost`` when its connection closes, and
    keeps the handler's StreamWriter (which closes the transport when garbage-collected,
    at a moment the garbage collector chooses)."""

    def __init__(self, owner: asyncio.StreamWriter) -> None:
        self.owner = owner
        self.on_lost: Callable[[], None] | None = None
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.on_lost is not None:
            self.on_lost()


async def until(cond: Callable[[], bool]) -> None:
    """Wait for ``cond`` (the loop closes connections in its own time); fail after 10 s."""
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the guard's count never got there")


def test_channel_guard_counts_handed_off_connections(tmp_path):
    async def main() -> None:
        guard: ConnectionGuard[Any] = ConnectionGuard("channel", ListenerLimits(max_connections=2))
        tunnels: list[Tunnel] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line = await reader.readline()
            if line == b"tunnel\n":  # hand the connection to another protocol
                t = Tunnel(writer)
                writer.transport.set_protocol(t)
                t.connection_made(writer.transport)
                tunnels.append(t)
                return
            writer.close()

        path = str(tmp_path / "ch.sock")
        server = await asyncio.start_unix_server(guard_stream_handler(guard, handler), path=path)
        try:
            # a connection whose handler ends is released
            r, w = await asyncio.open_unix_connection(path)
            w.write(b"plain\n")
            assert await r.read() == b""
            w.close()
            await until(lambda: len(guard.conns) == 0)
            # two tunnels fill the limit and stay counted after their handler returned
            held = []
            for _ in range(2):
                r, w = await asyncio.open_unix_connection(path)
                w.write(b"tunnel\n")
                held.append((r, w))
            for _ in range(100):
                if len(tunnels) == 2:
                    break
                await asyncio.sleep(0.01)
            assert len(tunnels) == 2 and len(guard.conns) == 2
            # a third connection is closed at once
            r, w = await asyncio.open_unix_connection(path)
            w.write(b"tunnel\n")
            try:
                got = await asyncio.wait_for(r.read(), 5)
            except ConnectionResetError:
                got = b""
            assert got == b""
            w.close()
            assert guard.refused == 1 and len(tunnels) == 2
            # a tunnel that closes frees its place
            first = tunnels[0].transport
            assert first is not None
            first.close()
            await until(lambda: len(guard.conns) == 1)
            for _, w in held:
                w.close()
        finally:
            server.close()
            guard.stop()

    asyncio.run(main())
