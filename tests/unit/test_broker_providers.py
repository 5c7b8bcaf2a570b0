"""Joined hosts and Ray's nodes behind the broker's ``Provider`` interface: what they
offer, that they buy nothing, what ``terminate`` does, and the states they report. The
Ray side runs the provider's own loop against the fake ``ray`` module of
``test_ray_parts.py`` (Ray itself is an edge these unit tests cannot start)."""

from __future__ import annotations

import pytest
from test_ray_parts import NODE, _provider, fake_ray  # noqa: F401 - the fixture

from strato.protocol import messages as m
from strato.providers.base import InstanceState, Provider, ProvisionError
from strato.providers.hosts import HostNode, HostsProvider


def node(node_id: str, name: str, *, idle: bool = True, price: float = 0.0, gpus=None):
    info = m.NodeInfo(
        name=name,
        provider="joined",
        cpu=8.0,
        memory_mb=32768,
        gpus=gpus or {},
        region="eu-west",
        price_per_hour=price,
    )
    return HostNode(node_id, info, idle)


class Hosts:
    """The fleet's joined nodes as the broker hands them to the provider."""

    def __init__(self) -> None:
        self.nodes = [
            node("n1", "gpu-box", price=1.5, gpus={"L4": [0, 1]}),
            node("n2", "busy-box", idle=False, price=0.2),
        ]
        self.drained: list[tuple[str, str]] = []
        self.events: list = []
        self.provider = HostsProvider(
            lambda: list(self.nodes),
            lambda nid, why: self.drained.append((nid, why)),
            self.events.append,
        )


def test_hosts_offer_their_idle_joined_nodes_at_their_declared_price():
    h = Hosts()
    p = h.provider
    assert isinstance(p, Provider) and not p.capabilities.provisions and not p.capabilities.spot
    [offer] = p.offers()  # the busy node holds containers: not offered
    assert (offer.provider, offer.instance_type, offer.gpu, offer.gpu_count) == (
        "hosts",
        "gpu-box",
        "L4",
        2,
    )
    assert (offer.price, offer.spot_price, offer.cpu, offer.memory_gib) == (1.5, None, 8.0, 32.0)
    assert offer.region == "eu-west" and offer.offer_id == "hosts/gpu-box/n1"
    with pytest.raises(ProvisionError, match="join-token create"):
        p.provision(offer, spot=False)


def test_hosts_report_joins_and_departures_and_terminate_drains():
    h = Hosts()
    p = h.provider
    assert {i.instance_id: i.state for i in p.instances()} == {
        "n1": InstanceState.RUNNING,
        "n2": InstanceState.RUNNING,
    }
    assert [(e.instance.node_name, e.state) for e in h.events] == [
        ("gpu-box", InstanceState.RUNNING),
        ("busy-box", InstanceState.RUNNING),
    ]
    p.terminate("n2", "the operator wants it back")
    p.terminate("n9")  # not one of its nodes: nothing
    assert h.drained == [("n2", "the operator wants it back")]
    h.nodes = h.nodes[:1]  # n2's agent disconnected
    p.refresh()
    assert (h.events[-1].instance.instance_id, h.events[-1].state) == (
        "n2",
        InstanceState.TERMINATED,
    )
    assert [i.instance_id for i in p.instances()] == ["n1"]
    p.refresh()
    assert len(h.events) == 3  # reported once


def test_ray_nodes_are_offers_and_terminate_gives_one_back_for_good(fake_ray):  # noqa: F811
    lost: list = []
    p = _provider(lost)
    assert isinstance(p, Provider) and not p.capabilities.provisions
    p.reconcile()  # actors made; their agents have not answered yet
    assert {i.state for i in p.instances()} == {InstanceState.PROVISIONING}
    assert p.offers() == []
    p.reconcile()  # their info() answered
    assert {i.state for i in p.instances()} == {InstanceState.RUNNING}
    offers = {o.instance_type: o for o in p.offers()}
    gpu = offers["ray-881a044f5674"]
    assert (gpu.provider, gpu.gpu, gpu.gpu_count, gpu.cpu) == ("ray", "H100", 2, 4.0)
    assert gpu.price == 0.0  # the Ray cluster's own
    with pytest.raises(ProvisionError, match="autoscaler"):
        p.provision(gpu, spot=False)
    p.terminate(NODE["NodeID"], "released")
    stopped = [a for a in fake_ray.actors if NODE["NodeID"] in a.spec]
    assert [a.stopped for a in stopped] == [True]
    assert lost == [("ray-881a044f5674", "released")]
    p.reconcile()
    p.reconcile()  # the node is still alive in Ray: no new agent there
    assert len([a for a in fake_ray.actors if NODE["NodeID"] in a.spec]) == 1
    assert [i.node_name for i in p.instances()] == ["ray-ffffffffffff"]
