"""The control plane's end of a joined agent's relay.

A worker agent on another machine carries its containers' channel connections over its
one connection to the control plane, each as a numbered stream of raw channel bytes
(``RelayOpen`` / ``RelayData`` / ``RelayClose``). The hub turns each stream back into a
reader and a writer and hands them to the very handler a direct channel connection gets
(``ControlPlane._on_channel``): the same hello check, frame limits, validation and
per-container scope, plus one more rule: a relayed container must be one placed on the
relaying agent's node (an agent cannot speak for another node's containers).

Flow: a stream's unread bytes are bounded (``HIGH_WATER``); past it the hub stops reading
the agent's connection until the stream's handler catches up (the agent's own TCP
backpressure then slows that node's containers), and a stream that stays full for
``STALL_S`` is closed. At most ``MAX_STREAMS`` streams per agent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from strato.protocol import frames
from strato.protocol import messages as m

log = logging.getLogger("strato.cluster.relay")

MAX_STREAMS = 4096
HIGH_WATER = 8 << 20
STALL_S = 10.0  # (well inside the heartbeat timeout: the agent is not read meanwhile)


class RelayStream:
    """The reading side of one relayed connection (what ``frames.read_frame`` needs)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._more = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data
        self._more.set()
        if len(self._buf) > HIGH_WATER:
            self._drained.clear()

    def feed_eof(self) -> None:
        self._eof = True
        self._more.set()
        self._drained.set()

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if self._eof:
                partial = bytes(self._buf)
                self._buf.clear()
                raise asyncio.IncompleteReadError(partial, n)
            self._more.clear()
            await self._more.wait()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        if len(self._buf) <= HIGH_WATER:
            self._drained.set()
        return data

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes as soon as there are any; b"" at the end (a sandbox tunnel's
        byte pipe)."""
        while not self._buf and not self._eof:
            self._more.clear()
            await self._more.wait()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        if len(self._buf) <= HIGH_WATER:
            self._drained.set()
        return data

    async def drained(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
            return True
        except TimeoutError:
            return False


class RelayTransport:
    """What the gateway takes over when it adopts a relayed web tunnel (as it takes over
    a direct tunnel's transport): writes go to the agent, the agent's bytes go to the
    protocol set on it, and closing it (either end) tells the protocol."""

    def __init__(self, writer: RelayWriter) -> None:
        self.writer = writer
        self.protocol: asyncio.Protocol | None = None
        self._lost = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol | None:
        return self.protocol

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def is_closing(self) -> bool:
        return self.writer.is_closing()

    def pause_reading(self) -> None:  # the agent's connection is shared: nothing to pause
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.close()

    def lost(self) -> None:
        if not self._lost and self.protocol is not None:
            self._lost = True
            self.protocol.connection_lost(None)


class RelayWriter:
    """The writing side of one relayed connection: what the handler writes goes back to
    the agent as ``RelayData`` frames (``Peer`` wraps it as it wraps a stream writer)."""

    def __init__(self, hub: RelayHub, conn: int) -> None:
        self.hub = hub
        self.conn = conn
        self.closed = False
        self.transport = RelayTransport(self)  # adopted by the gateway for a web tunnel

    @property
    def adopted(self) -> bool:
        return self.transport.protocol is not None

    def is_closing(self) -> bool:
        return self.closed or self.hub.closed

    def write(self, data: bytes) -> None:
        if self.is_closing():
            return
        view = memoryview(data)
        for i in range(0, len(view), m.RELAY_CHUNK):
            self.hub.send(m.RelayData(self.conn, bytes(view[i : i + m.RELAY_CHUNK])))

    async def drain(self) -> None:  # the agent's connection is drained by the hub
        pass

    def can_write_eof(self) -> bool:  # a relayed stream ends whole (RelayClose)
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.hub.closed:
            self.hub.send(m.RelayClose(self.conn))
        self.hub.forget(self.conn)
        self.transport.lost()


Handler = Callable[[RelayStream, RelayWriter], Awaitable[None]]


class RelayHub:
    """The relayed streams of one joined agent's connection."""

    def __init__(self, node_id: str, send: Callable[[object], None], handler: Handler) -> None:
        self.node_id = node_id
        self._send = send
        self.handler = handler
        self.streams: dict[int, tuple[RelayStream, RelayWriter, asyncio.Task[None]]] = {}
        self.closed = False
        self.opened = 0

    def send(self, msg: object) -> None:
        self._send(msg)

    def forget(self, conn: int) -> None:
        entry = self.streams.pop(conn, None)
        if entry is not None:
            entry[0].feed_eof()

    async def on_frame(self, msg: object) -> None:
        """A relay frame from the agent (``RelayOpen``, ``RelayData``, ``RelayClose``)."""
        if isinstance(msg, m.RelayOpen):
            if msg.conn in self.streams:
                raise frames.FrameError(f"relay stream {msg.conn} opened twice")
            if len(self.streams) >= MAX_STREAMS:
                log.warning("node %s relays %d connections, its limit", self.node_id, MAX_STREAMS)
                self.send(m.RelayClose(msg.conn))
                return
            reader, writer = RelayStream(), RelayWriter(self, msg.conn)
            task = asyncio.create_task(self._run(reader, writer), name=f"relay {msg.conn}")
            self.streams[msg.conn] = (reader, writer, task)
            self.opened += 1
        elif isinstance(msg, m.RelayData):
            entry = self.streams.get(msg.conn)
            if entry is None:
                return  # closed here already: what was on its way is dropped
            reader, writer, _ = entry
            if writer.adopted:  # a web tunnel: raw HTTP from the container's server
                assert writer.transport.protocol is not None
                writer.transport.protocol.data_received(msg.data)
                return
            reader.feed(msg.data)
            if len(reader) > HIGH_WATER and not await reader.drained(STALL_S):
                log.warning(
                    "node %s: relayed connection %d stalled; closed", self.node_id, msg.conn
                )
                writer.close()
        elif isinstance(msg, m.RelayClose):
            entry = self.streams.get(msg.conn)
            if entry is not None:
                entry[1].closed = True  # closed by the agent: nothing to say back
                self.forget(msg.conn)
                entry[1].transport.lost()

    async def _run(self, reader: RelayStream, writer: RelayWriter) -> None:
        try:
            await self.handler(reader, writer)
        except Exception:  # noqa: BLE001 - one stream's bug must not end the agent's
            log.exception("relayed connection %d of node %s failed", writer.conn, self.node_id)
        finally:
            if not writer.adopted:  # an adopted web tunnel lives on, the gateway's now
                writer.close()
            elif len(reader):  # what came behind its hello goes to the gateway
                data = await reader.readexactly(len(reader))
                assert writer.transport.protocol is not None
                writer.transport.protocol.data_received(data)

    async def close(self) -> None:
        """The agent's connection ended: every relayed connection ends with it."""
        self.closed = True
        entries = list(self.streams.values())
        self.streams.clear()
        for reader, writer, _ in entries:
            reader.feed_eof()
            writer.closed = True
            writer.transport.lost()
        for _, _, task in entries:
            try:
                await asyncio.wait_for(asyncio.shield(task), 5.0)
            except (TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001
                task.cancel()
