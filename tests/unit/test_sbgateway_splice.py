"""The gateway's side of a sandbox tunnel (``Gateway._tunnel``, ``ClientConn.splice``) on
the proxy harness, on uvloop (the control plane's loop) and asyncio: every byte the
client sent, the head already parsed and whatever followed it in the same or later
reads, reaches the tunnel unchanged and in order, and the answer comes back raw.

The sandbox's side is a stand-in, named as such: ``SandboxPorts.splice`` pipes to a
socket pair whose other end the test holds, where the real ``Tunnels.splice`` pipes to
the sandbox agent's connection (tests/integration/test_sandbox_gateway_tunnels.py runs
that one)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest
from proxy_harness import TIMEOUT_S, Harness, run

LOOPS = ["uvloop", "asyncio"]
HOST = b"sb-0123456789abcdef-8000.tunnel.localhost:1"


class SandboxPorts:
    """Stand-in for ``server/sandboxes/tunnels.py``: one live tunnel, port 8000 of
    ``sb-0123456789abcdef``, whose far end is ``self.port`` (the test's)."""

    def __init__(self, fail: str = "") -> None:
        self.fail = fail
        self.port: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )

    def refusal(self, sandbox_id: str, port: int) -> tuple[int, str] | None:
        if (sandbox_id, port) != ("sb-0123456789abcdef", 8000):
            return 404, "no such tunnel"
        return None

    async def splice(self, sandbox_id, port, reader, writer, first: bytes) -> None:
        if self.fail:
            raise ConnectionError(self.fail)
        ours, theirs = socket.socketpair()
        up_reader, up_writer = await asyncio.open_connection(sock=ours)
        self.port.set_result(await asyncio.open_connection(sock=theirs))
        up_writer.write(first)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.write_eof()

        try:
            await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
        finally:
            up_writer.close()


def _with_tunnels(h: Harness, fail: str = "") -> SandboxPorts:
    ports = SandboxPorts(fail)
    h.gw.tunnels = ports
    return ports


@pytest.mark.parametrize("loop", LOOPS)
def test_the_bytes_read_with_the_head_and_after_it_reach_the_tunnel_in_order(loop):
    async def body(h: Harness) -> None:
        ports = _with_tunnels(h)
        c = await h.client()
        first = (
            b"POST /up HTTP/1.1\r\nHost: " + HOST + b"\r\nX-Case: Kept\r\n"
            b"Content-Length: 5\r\n\r\nhello"
            b"GET /next HTTP/1.1\r\nHost: other.localhost\r\n\r\n"  # pipelined: the tunnel's too
        )
        c.send(first[:20])  # the head in two reads
        await asyncio.sleep(0.05)
        c.send(first[20:])
        reader, writer = await asyncio.wait_for(ports.port, TIMEOUT_S)
        got = await asyncio.wait_for(reader.readexactly(len(first)), TIMEOUT_S)
        assert got == first, "the raw bytes, head included, as the client sent them"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        status, headers, data = await c.response(head_only=True)
        assert status == 200 and b"x-strato-request-id" not in headers, "the sandbox's own"
        assert await c.read(2) == b"ok"
        # later bytes, larger than one read, pass both ways; a half-close passes too
        big = bytes(range(256)) * 4096
        c.send(big)
        assert await asyncio.wait_for(reader.readexactly(len(big)), TIMEOUT_S) == big
        c.writer.write_eof()
        assert await asyncio.wait_for(reader.read(), TIMEOUT_S) == b""
        writer.write(b"bye")
        writer.write_eof()
        assert await c.eof() == b"bye"
        await h.until(lambda: not h.gw.guard.conns, "the spliced connection to leave the count")
        writer.close()

    run(body, loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_tunnel_that_cannot_be_opened_is_a_502_with_why(loop):
    async def body(h: Harness) -> None:
        _with_tunnels(h, fail="nothing accepts connections on port 8000 in the sandbox")
        c = await h.client()
        c.send(b"GET / HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n")
        status, _, data = await c.response()
        assert status == 502
        assert b"nothing accepts connections on port 8000" in data
        assert await c.closed()

    run(body, loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_unknown_tunnels_are_404_and_keep_the_connection_then_421(loop):
    async def body(h: Harness) -> None:
        _with_tunnels(h)
        c = await h.client()
        c.send(b"GET / HTTP/1.1\r\nHost: sb-0123456789abcdef-8001.tunnel.localhost\r\n\r\n")
        status, _, data = await c.response()
        assert status == 404 and b"no sandbox tunnel is served at sb-0123" in data
        c.send(b"GET / HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n")
        status, _, data = await c.response()
        assert status == 421 and b"connection of its own" in data
        assert await c.closed()
        h.gw.tunnels = None  # no sandboxes served: every tunnel host name is unknown
        c = await h.client()
        c.send(b"GET / HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n")
        assert (await c.response())[0] == 404
        with contextlib.suppress(OSError):
            c.close()

    run(body, loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_the_gateways_head_limit_applies_to_a_tunnels_head(loop):
    async def body(h: Harness) -> None:
        ports = _with_tunnels(h)
        c = await h.client()
        big = b"a" * (h.gw.config.limits.max_header_bytes + 1)
        c.send(b"GET / HTTP/1.1\r\nHost: " + HOST + b"\r\nX-Big: " + big + b"\r\n\r\n")
        assert (await c.response())[0] == 431
        assert not ports.port.done(), "nothing went to the tunnel"

    run(body, loop=loop)
