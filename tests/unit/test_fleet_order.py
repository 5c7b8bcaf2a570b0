"""A container's own channel and its worker agent's channel are two connections: what the
fleet hears on one can come before what was sent earlier on the other. Neither order may
lose a container's state or its last outputs."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any, cast

import pytest
from manager_helpers import RecordingPeer, make_fleet, make_manager

from strato.protocol import messages as m
from strato.server import fleet as fleet_module
from strato.server.calls.manager import CallManager
from strato.server.containers import Container, ContainerRegistry, ContainerState
from strato.server.fleet_nodes import Peer
from strato.server.store import Store


class World:
    def __init__(self, tmp_path) -> None:
        self.store = Store(f"sqlite:///{tmp_path / 'state.db'}")
        registry = ContainerRegistry()
        spec = m.FunctionSpec(name="f", module="mod", qualname="f")  # no retries
        self.calls: CallManager = make_manager(
            self.store, tmp_path / "blobs", spec, containers=registry
        )
        self.fleet = make_fleet(self.store, self.calls, registry)
        hello = m.WorkerHello(
            token="t",
            node=m.NodeInfo(name="n1", provider="local", cpu=2.0, memory_mb=4096),
            worker_id="wk-1",
        )
        self.node_id = self.fleet.worker_hello(hello, cast(Peer, RecordingPeer()))

    def container(self) -> tuple[Container, RecordingPeer]:
        """A container of ``fu-1`` that dialled its channel."""
        s = self.fleet.start_container(self.calls.function("fu-1"))
        assert s is not None
        peer = RecordingPeer()
        s.peer = cast(Any, peer)
        return s, peer

    def record_states(self) -> list[str]:
        self.store.flush()
        return [r["state"] for r in self.store.containers(live_only=False)]


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.store.close()


def test_ready_heard_before_started_stays_ready(world):
    async def go():
        s, _ = world.container()
        world.fleet.container_ready(s)  # over the container's own channel
        world.fleet.on_worker_message(world.node_id, m.ContainerStarted(s.container_id, 42))
        assert world.record_states() == ["ready"]

    asyncio.run(go())


def test_started_before_ready_is_recorded(world):
    async def go():
        s, _ = world.container()
        world.fleet.on_worker_message(world.node_id, m.ContainerStarted(s.container_id, 42))
        assert world.record_states() == ["starting"]
        world.fleet.container_ready(s)
        assert world.record_states() == ["ready"]

    asyncio.run(go())


async def _run_one(world, s: Container, peer: RecordingPeer) -> m.TaskInput:
    world.fleet.container_ready(s)
    args = pickle.dumps(((1,), {}))
    await world.calls.create_call(m.CreateCall("fc-1", "fu-1", [m.InputItem(0, args)]))
    (inp,) = [i for msg in peer.sent if isinstance(msg, m.RunInputs) for i in msg.inputs]
    return inp


def _exited(s: Container) -> m.ContainerExited:
    return m.ContainerExited(s.container_id, 0, None, False, "exited with code 0")


def test_an_exit_report_before_the_last_output_keeps_the_output(world):
    async def go():
        s, peer = world.container()
        inp = await _run_one(world, s, peer)
        world.fleet.on_worker_message(world.node_id, _exited(s))  # heard first
        assert world.fleet.container(s.container_id) is s  # its channel may hold more
        out = m.TaskOutput(inp.input_id, inp.attempt, "success", pickle.dumps(2), duration=0.01)
        world.calls.on_outputs(s, [out])
        world.fleet.channel_lost(s)  # its channel reached its end: every frame is read
        assert s.state == ContainerState.GONE
        assert world.fleet.container(s.container_id) is None
        got = await world.calls.wait_outputs("fc-1", 0, 0.0, 10)
        assert [(o.status, pickle.loads(o.data)) for o in got.outputs] == [("success", 2)]
        assert world.store.pending_inputs() == []

    asyncio.run(go())


def test_an_exit_report_ends_a_container_whose_channel_stays_open(world, monkeypatch):
    monkeypatch.setattr(fleet_module, "EXIT_REPORT_GRACE_S", 0.05)

    async def go():
        s, peer = world.container()
        await _run_one(world, s, peer)
        world.fleet.on_worker_message(world.node_id, _exited(s))
        assert s.state == ContainerState.READY
        for _ in range(100):  # the grace timer ends it, with its input failed as died
            await asyncio.sleep(0.05)
            if s.state == ContainerState.GONE:
                break
        assert s.state == ContainerState.GONE and peer.closed
        got = await world.calls.wait_outputs("fc-1", 0, 0.0, 10)
        assert [o.status for o in got.outputs] == ["died"]

    asyncio.run(go())


def test_an_exit_report_after_the_channel_closed_ends_it_at_once(world):
    async def go():
        s, peer = world.container()
        await _run_one(world, s, peer)
        world.fleet.channel_lost(s)
        assert s.state == ContainerState.READY  # it waits for the worker's word
        world.fleet.on_worker_message(world.node_id, _exited(s))
        assert s.state == ContainerState.GONE

    asyncio.run(go())
