"""The ``hosts`` provider: machines that joined this control plane with a join token
(``strato worker join``; their nodes are of provider ``joined``), behind the ``Provider``
interface (``base.py``).

They are already there: nothing is bought (``Capabilities(provisions=False)``;
``provision`` says how to add a machine instead). Its offers are the joined nodes that
hold no container now, each at the price per hour it declared (``STRATO_NODE_PRICE_PER_HOUR``,
0 where none). Its instances are the joined nodes; ``terminate`` drains one (no new
containers; its containers stop once their running inputs finish). Each ``refresh`` reports
a node that joined as ``running`` and one that left as ``terminated`` to the callback.

It reads the fleet through the callables it is given (the control plane's side builds
them), so this module needs nothing of the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from strato.protocol import messages as m

from .base import (
    Capabilities,
    Instance,
    InstanceState,
    Offer,
    OnStateChange,
    ProvisionError,
    StateChange,
)

JOINED = "joined"  # the provider of a node that joined with a join token


@dataclass(frozen=True)
class HostNode:
    """A joined node as the fleet sees it."""

    node_id: str
    info: m.NodeInfo
    idle: bool  # it holds no container now


def offer_of(node: HostNode) -> Offer:
    info = node.info
    gpu, count = next(iter(sorted(info.gpus.items())), (None, []))
    return Offer(
        provider="hosts",
        instance_type=info.name,
        gpu=gpu,
        gpu_count=len(count),
        cpu=info.cpu,
        memory_gib=info.memory_mb / 1024,
        price=info.price_per_hour,
        spot_price=None,
        region=info.region or "",
        zone=node.node_id,
    )


class HostsProvider:
    """The joined machines (see the module's doc)."""

    name = "hosts"
    capabilities = Capabilities(provisions=False, spot=False)

    def __init__(
        self,
        nodes: Callable[[], list[HostNode]],
        drain: Callable[[str, str], None],
        on_change: OnStateChange,
    ) -> None:
        self._nodes = nodes  # the connected nodes of provider ``joined``
        self._drain = drain  # (node id, reason): cordon it, stop its containers gracefully
        self.on_change = on_change
        self._known: dict[str, Instance] = {}

    def refresh(self) -> None:
        """Report the nodes that joined or left since the last look."""
        now = {n.node_id: n for n in self._nodes()}
        for node_id, node in now.items():
            if node_id not in self._known:
                inst = Instance(node_id, offer_of(node), False, InstanceState.RUNNING)
                inst.node_name, inst.running_at = node.info.name, time.monotonic()
                self._known[node_id] = inst
                self.on_change(StateChange(inst, InstanceState.RUNNING, "joined"))
        for node_id in [k for k in self._known if k not in now]:
            inst = self._known.pop(node_id)
            inst.state, inst.ended_at = InstanceState.TERMINATED, time.monotonic()
            inst.reason = "its agent disconnected"
            self.on_change(StateChange(inst, InstanceState.TERMINATED, inst.reason))

    # ------------------------------------------------------------------ the interface

    def offers(self) -> list[Offer]:
        """The joined nodes that hold no container, at their declared prices."""
        return [offer_of(n) for n in self._nodes() if n.idle]

    def provision(self, offer: Offer, *, spot: bool) -> Instance:
        raise ProvisionError(
            "the hosts provider buys nothing: its nodes are machines that joined; add one "
            "with `strato server join-token create` and `strato worker join` on it"
        )

    def terminate(self, instance_id: str, reason: str = "released") -> None:
        """Drain the node ``instance_id`` (its node id): it is the machine's owner's to
        stop; strato places nothing more there and stops its containers."""
        if any(n.node_id == instance_id for n in self._nodes()):
            self._drain(instance_id, reason)

    def instances(self) -> list[Instance]:
        self.refresh()
        return list(self._known.values())

    def close(self) -> None:
        """Nothing to give back: the machines are not strato's."""
