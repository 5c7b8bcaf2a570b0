"""A real web gateway on loopback, for the proxy's unit tests: the test is its client (TCP
connections to its listener) and the container behind its one endpoint (tunnels as Unix
socket pairs, adopted as a container's channel connections are).

The gateway, its routing, its exchanges and its listener limits are the real code; only
what it asks of the rest of the control plane (the store, the call manager, the fleet)
is a small stand-in here, holding one app (``app``) with one endpoint (``ep``): requests
go to ``/app/ep/...``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from strato.exceptions import NotFoundError
from strato.protocol import messages as m
from strato.protocol.gpu import parse_gpu
from strato.server.autoscaler import ContainerStat
from strato.server.gateway import Gateway, GatewayConfig
from strato.server.listeners import ListenerLimits
from strato.server.scheduler import ContainerRequest, NodeView

APP_ID = "ap-test"
FUNCTION_ID = "fu-test"
PREFIX = b"/app/ep"
TOKEN = "wt-test-token"
TIMEOUT_S = 10.0
State = Literal["starting", "ready", "stopping", "killing", "gone"]


# ---------------------------------------------------------------------- stand-ins


@dataclass(eq=False)
class Box:
    """A container as the fleet shows it to the gateway."""

    container_id: str
    function_id: str = FUNCTION_ID
    app_id: str = APP_ID
    state: State = "ready"
    token: str = "tok"
    idle_since: float | None = None
    started_at: float = field(default_factory=time.monotonic)

    def note_busy(self) -> None:
        self.idle_since = None

    def note_idle(self, now: float) -> None:
        if self.state == "ready":
            self.idle_since = now


@dataclass
class Function:
    function_id: str
    app_id: str
    spec: m.FunctionSpec


class Store:
    def __init__(self, spec: m.FunctionSpec) -> None:
        self.spec = spec

    def apps(self) -> list[dict]:
        return [{"app_id": APP_ID, "name": "app", "state": "deployed", "workspace": "main"}]

    def functions_of(self, app_id: str) -> list[dict]:
        return [{"function_id": FUNCTION_ID, "spec": msgspec.msgpack.encode(self.spec)}]


class Calls:
    def __init__(self, spec: m.FunctionSpec) -> None:
        self.fn = Function(FUNCTION_ID, APP_ID, spec)
        self.arrivals = 0

    def function(self, function_id: str) -> Function:
        if function_id != FUNCTION_ID:
            raise NotFoundError(function_id)
        return self.fn

    def note_arrival(self, function_id: str, now: float | None = None) -> None:
        self.arrivals += 1


class Fleet:
    def __init__(self) -> None:
        self.boxes: dict[str, Box] = {}
        self.stopped: list[str] = []
        self.nodes: list[NodeView] = []  # connected nodes (none: placement is not judged)
        self.supply = None  # no broker: nothing can be bought

    def container(self, container_id: str) -> Box | None:
        return self.boxes.get(container_id)

    def containers_of(self, function_id: str) -> list[Box]:
        return [b for b in self.boxes.values() if b.function_id == function_id]

    def live_containers_of(self, function_id: str) -> list[Box]:
        return [b for b in self.containers_of(function_id) if b.state in ("starting", "ready")]

    def backing_off(self, function_id: str, now: float) -> bool:
        return False

    def container_stats(
        self, function_id: str, load: Callable[[Box], tuple[int, float | None]]
    ) -> list[ContainerStat]:
        out = []
        for b in self.containers_of(function_id):
            inflight, idle_since = load(b)
            state = b.state if b.state in ("starting", "ready") else "stopping"
            out.append(ContainerStat(b.container_id, state, inflight, idle_since, b.started_at))
        return out

    def stop(self, container_id: str) -> None:
        self.stopped.append(container_id)

    def live_views(self) -> list[NodeView]:
        return list(self.nodes)

    def request_for(self, spec: m.FunctionSpec) -> ContainerRequest:
        res = spec.resources
        return ContainerRequest(
            cpu=res.cpu, memory_mb=res.memory_mb, gpu=parse_gpu(res.gpu or None)
        )


class Logs:
    def __init__(self) -> None:
        self.lines: list[m.LogLine] = []

    def append(self, app_id: str, lines: list[m.LogLine]) -> None:
        self.lines.extend(lines)


# ---------------------------------------------------------------------- the two sides


class Tunnel:
    """The container's end of one tunnel: raw HTTP/1.1 from the gateway."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def head(self) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)

    async def request(self) -> tuple[bytes, dict[bytes, bytes], bytes]:
        """(request line, headers, body) of the next request, the body read whole."""
        line, headers = parse_head(await self.head())
        return line, headers, await read_body(self.reader, headers)

    async def read(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), TIMEOUT_S)

    async def eof(self) -> bytes:
        """What comes until the gateway closes the tunnel."""
        return await asyncio.wait_for(self.reader.read(), TIMEOUT_S)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()


class Client:
    """One client connection to the gateway."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, *, head_only: bool = False) -> tuple[int, dict[bytes, bytes], bytes]:
        """(status, headers, body) of the next response (``head_only``: a response to
        HEAD, or one whose body the test reads itself)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
        line, headers = parse_head(head)
        status = int(line.split(b" ")[1])
        if head_only or 100 <= status < 200:
            return status, headers, b""
        return status, headers, await read_body(self.reader, headers, until_eof=True)

    async def read(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), TIMEOUT_S)

    async def eof(self) -> bytes:
        """What comes until the gateway closes the connection (a reset counts)."""
        try:
            return await asyncio.wait_for(self.reader.read(), TIMEOUT_S)
        except ConnectionResetError:
            return b""

    async def closed(self) -> bool:
        """Whether the gateway closed (or reset) the connection: EOF once all is read."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), TIMEOUT_S):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()


def parse_head(head: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    lines = head[:-4].split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for raw in lines[1:]:
        name, _, value = raw.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def read_body(
    reader: asyncio.StreamReader, headers: dict[bytes, bytes], *, until_eof: bool = False
) -> bytes:
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        out = b""
        while True:
            size = int((await asyncio.wait_for(reader.readline(), TIMEOUT_S)).strip(), 16)
            data = await asyncio.wait_for(reader.readexactly(size + 2), TIMEOUT_S)
            if size == 0:
                return out
            out += data[:-2]
    if b"content-length" in headers:
        n = int(headers[b"content-length"])
        return await asyncio.wait_for(reader.readexactly(n), TIMEOUT_S)
    if until_eof:
        return await asyncio.wait_for(reader.read(), TIMEOUT_S)
    return b""


def response(body: bytes = b"ok", status: int = 200, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n%b\r\n%b" % (status, len(body), extra, body)


# ---------------------------------------------------------------------- the gateway


class Harness:
    def __init__(
        self,
        *,
        max_inputs: int = 1,
        http_limit_s: float = 150.0,
        wait_timeout_s: float = 30.0,
        max_body: int = 4 << 30,
        limits: ListenerLimits | None = None,
        requires_auth: bool = False,
        gpu: str | None = None,
    ) -> None:
        web = m.WebConfig(kind="asgi", label="ep", requires_auth=requires_auth)
        spec = m.FunctionSpec(
            name="ep",
            module="m",
            qualname="ep",
            max_inputs=max_inputs,
            web=web,
            resources=m.Resources(gpu=[gpu] if gpu else []),
        )
        self.config = GatewayConfig(
            host="127.0.0.1",
            port=0,
            http_limit_s=http_limit_s,
            max_body=max_body,
            wait_timeout_s=wait_timeout_s,
            token=TOKEN,
            limits=limits or ListenerLimits(max_connections=100),
        )
        self.store = Store(spec)
        self.calls = Calls(spec)
        self.fleet = Fleet()
        self.logs = Logs()
        self.wakes = 0
        self.gw = Gateway(
            self.config,
            calls=self.calls,
            fleet=self.fleet,
            store=self.store,
            logs=self.logs,
            wake=self._wake,
        )
        self._n = 0
        self._open: list[asyncio.StreamWriter] = []

    def _wake(self) -> None:
        self.wakes += 1

    async def __aenter__(self) -> Harness:
        await self.gw.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for w in self._open:
            w.close()
        await self.gw.close()

    # -------------------------------------------------------------- containers

    def container(self, state: State = "ready") -> Box:
        self._n += 1
        box = Box(f"ct-{self._n}", state=state)
        self.fleet.boxes[box.container_id] = box
        return box

    async def tunnel(self, box: Box | None = None) -> Tunnel:
        """A new tunnel of ``box`` (of a new ready container if none is given)."""
        box = box or self.container()
        gw_side, ct_side = socket.socketpair()
        _, gw_writer = await asyncio.open_connection(sock=gw_side)
        hello = m.WebTunnelHello(container_id=box.container_id, token=box.token)
        assert self.gw.adopt_tunnel(hello, gw_writer)
        reader, writer = await asyncio.open_connection(sock=ct_side)
        self._open += [gw_writer, writer]
        return Tunnel(reader, writer)

    def ready(self, box: Box) -> None:
        """The container became ready (its tunnels start taking requests)."""
        box.state = "ready"
        self.gw.container_ready(box)

    # -------------------------------------------------------------- clients

    async def client(self) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.gw.port)
        self._open.append(writer)
        return Client(reader, writer)

    # -------------------------------------------------------------- what it saw

    @property
    def endpoint(self):
        return self.gw.endpoints[FUNCTION_ID]

    def access(self) -> list[str]:
        """The access lines written so far."""
        self.gw.access_log.flush()
        return [line.text for line in self.logs.lines]

    async def until(self, cond: Callable[[], bool], what: str) -> None:
        """Wait (on the loop) until ``cond()`` holds."""
        deadline = time.monotonic() + TIMEOUT_S
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.01)


def run(coro_fn: Callable[[Harness], Awaitable[None]], *, loop: str = "uvloop", **kw: Any) -> None:
    """Run ``coro_fn(harness)`` against a fresh gateway, on ``loop`` (``uvloop``, the
    control plane's, or ``asyncio``)."""

    async def main() -> None:
        async with Harness(**kw) as h:
            await coro_fn(h)

    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    else:
        asyncio.run(main())


def get(path: bytes = b"/", extra: bytes = b"", method: bytes = b"GET") -> bytes:
    return method + b" " + PREFIX + path + b" HTTP/1.1\r\nhost: t\r\n" + extra + b"\r\n"
