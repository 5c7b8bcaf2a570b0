"""An instance the broker gave back (or lost to a preemption) while its worker agent was
still starting: neither side may leave its node in the fleet.

- The agent, told to stop between dialling and being welcomed, closes the channel it was
  just welcomed on instead of staying registered.
- The broker watches the ended instance's node name: a node that registers under it after
  the instance ended is dropped once its agent is gone.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

import pytest
from manager_helpers import RecordingPeer, make_fleet, make_manager

from strato.protocol import frames
from strato.protocol import messages as m
from strato.providers.base import Instance, InstanceState, Offer, StateChange
from strato.providers.config import ConfigWatch
from strato.server.broker import service
from strato.server.broker.service import Broker, Held
from strato.server.containers import ContainerRegistry
from strato.server.fleet import Fleet
from strato.server.fleet_nodes import Peer
from strato.server.store import Store
from strato.worker.agent import WorkerAgent


@pytest.fixture
def world(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    registry = ContainerRegistry()
    calls = make_manager(
        store,
        tmp_path / "blobs",
        m.FunctionSpec(name="f", module="mod", qualname="f"),
        containers=registry,
    )
    fleet = make_fleet(store, calls, registry)
    broker = Broker(
        ConfigWatch(tmp_path / "providers.toml"),  # absent: no providers to buy from
        fleet,
        calls,
        home=tmp_path,
        channel="unix:/nonexistent",
        token="t",
        tell=lambda app_id, text: None,
        offers=[],
    )
    yield fleet, broker
    store.close()


def _held(name: str) -> Held:
    offer = Offer("sim", "gpu-1x", "L4", 1, 4.0, 16.0, 1.0, 0.4, "us-east-1")
    inst = Instance(f"i-{name}", offer, spot=True, state=InstanceState.RUNNING, node_name=name)
    return Held(inst, "sim")


def _register(fleet: Fleet, name: str) -> tuple[str, Peer]:
    peer = cast(Peer, RecordingPeer())
    hello = m.WorkerHello(
        token="t",
        node=m.NodeInfo(name=name, provider="sim", cpu=4.0, memory_mb=16384),
        worker_id=f"wk-{name}",
    )
    return fleet.worker_hello(hello, peer), peer


def _end(broker: Broker, h: Held, now: float) -> None:
    broker.held[h.instance.instance_id] = h
    h.instance.state = InstanceState.PREEMPTED
    broker._on_change(StateChange(h.instance, InstanceState.PREEMPTED, "reclaimed"))
    broker.tick(now)


def test_a_node_registering_after_its_instance_ended_is_dropped_once_its_agent_is_gone(world):
    fleet, broker = world

    async def go():
        now = time.monotonic()
        _end(broker, _held("late"), now)  # ended before its agent registered
        node_id, peer = _register(fleet, "late")
        broker.tick(now + 1)
        assert node_id in fleet.nodes  # its agent is still there: not yet
        fleet.worker_gone(node_id, peer)
        broker.tick(now + 2)
        assert node_id not in fleet.nodes
        # watched until the window passes, then forgotten
        assert "late" in broker._ended_nodes
        broker.tick(now + service.ENDED_NODE_WATCH_S + 3)
        assert "late" not in broker._ended_nodes

    asyncio.run(go())


def test_a_registered_node_of_an_ended_instance_goes_when_its_agent_does(world):
    fleet, broker = world

    async def go():
        now = time.monotonic()
        node_id, peer = _register(fleet, "early")
        other_id, _ = _register(fleet, "other")
        _end(broker, _held("early"), now)
        assert node_id in fleet.nodes
        fleet.worker_gone(node_id, peer)
        broker.tick(now + 1)
        assert node_id not in fleet.nodes and other_id in fleet.nodes
        # past the window with no node left of that name: the name is forgotten
        broker.tick(now + service.ENDED_NODE_WATCH_S + 2)
        assert not broker._ended_nodes

    asyncio.run(go())


def test_an_agent_told_to_stop_while_registering_closes_its_channel(tmp_path):
    """The control plane welcomes an agent that was told to stop (SIGTERM's handler) while
    its hello was on the way: the agent must close that channel, not stay registered."""
    sock = str(tmp_path / "channel.sock")
    agent = WorkerAgent(f"unix:{sock}", "token", tmp_path)
    node = m.NodeInfo(name="n", provider="sim", cpu=1.0, memory_mb=1024)
    seen: dict[str, object] = {}

    async def control_plane(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if "hello" in seen:  # a later connection (what a registered agent dials next)
            writer.close()
            return
        seen["hello"] = await asyncio.wait_for(frames.read_frame(reader), 10)
        agent.request_stop()  # the provider's SIGTERM, before the welcome
        writer.write(frames.encode(m.WorkerWelcome(node_id="n", epoch="e", http_url="", kill=[])))
        await writer.drain()
        seen["eof"] = await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()

    async def go():
        server = await asyncio.start_unix_server(control_plane, sock)
        async with server:
            await asyncio.wait_for(agent._session(node), 10)
            for _ in range(200):  # the handler reads the close right after
                if "eof" in seen:
                    break
                await asyncio.sleep(0.05)

    asyncio.run(go())
    assert isinstance(seen["hello"], m.WorkerHello)
    assert seen.get("eof") is True, "the agent kept the channel it was welcomed on"
    assert agent._writer is None
