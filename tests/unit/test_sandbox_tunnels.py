"""``server/sandboxes/tunnels.py``: a tunnel connection is handed only to the hello that
carries its sandbox's container and token (another container cannot take it, nor make it
fail); ports asked twice are refused."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.server.sandboxes.tunnels import Tunnels, _Tunnels, check_ports


def _pending(tunnels: Tunnels, conn_id: int) -> asyncio.Future:
    sb: Any = SimpleNamespace(
        sandbox_id="sb-0123456789abcdef",
        container=SimpleNamespace(container_id="c-sb", token="right-token"),
    )
    fut = asyncio.get_running_loop().create_future()
    tunnels.pending[conn_id] = (sb, fut)
    return fut


def test_only_the_sandboxs_own_hello_takes_a_connection() -> None:
    async def run() -> None:
        tunnels = Tunnels(SimpleNamespace())  # type: ignore[arg-type]
        fut = _pending(tunnels, 7)
        reader: Any = asyncio.StreamReader()
        for hello in (
            m.SbTunnelHello("c-sb", "wrong-token", 7),
            m.SbTunnelHello("c-other", "right-token", 7),
            m.SbTunnelHello("c-sb", "right-token", 8),  # no such connection
        ):
            await tunnels.on_hello(hello, reader, None)  # type: ignore[arg-type]
            assert not fut.done() and 7 in tunnels.pending
        held = asyncio.create_task(
            tunnels.on_hello(m.SbTunnelHello("c-sb", "right-token", 7), reader, None)  # type: ignore[arg-type]
        )
        got_reader, _writer, hello, done = await asyncio.wait_for(fut, 5)
        assert got_reader is reader and hello.conn_id == 7 and 7 not in tunnels.pending
        assert not held.done()  # the agent's connection is held while the pipe runs
        done.set_result(None)
        await asyncio.wait_for(held, 5)

    asyncio.run(run())


def test_a_sandbox_that_ends_fails_its_waiting_connections() -> None:
    async def run() -> None:
        tunnels = Tunnels(SimpleNamespace())  # type: ignore[arg-type]
        fut = _pending(tunnels, 1)
        tunnels.by_sandbox["sb-0123456789abcdef"] = _Tunnels()
        tunnels.close("sb-0123456789abcdef")
        with pytest.raises(exc.SandboxTerminatedError):
            await fut
        assert not tunnels.pending

    asyncio.run(run())


def test_ports_asked_twice_are_refused() -> None:
    req = m.CreateSandbox(app_id="ap-1", encrypted_ports=[80, 443], unencrypted_ports=[22])
    assert check_ports(req) == [(80, True), (443, True), (22, False)]
    with pytest.raises(exc.InvalidError, match="port 443 is given twice"):
        check_ports(m.CreateSandbox(app_id="ap-1", encrypted_ports=[443], unencrypted_ports=[443]))
