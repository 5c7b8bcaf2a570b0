"""Node administration: ``strato node list|describe|cordon|uncordon|drain|remove``.

- cordon: the node takes no new containers (what runs there goes on).
- drain: cordon, then every container on the node is asked to stop: each finishes the
  inputs it is running (within ``grace`` seconds, then it is killed) and takes no more;
  queued inputs go to other nodes. ``wait`` (seconds) answers once the node is empty.
- remove: the node is forgotten; its containers count as lost with it (their inputs go
  back to the queue), its agent's connection is closed and its node credential revoked
  (``node_credentials.py``). An agent that still runs
  joins again as a new node: stop it first, or revoke its join token.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from strato.exceptions import NotFoundError
from strato.protocol import messages as m

from ..api.router import Reply, Request, reply

if TYPE_CHECKING:
    from ..api.router import Router
    from ..control import ControlPlane
    from ..fleet_nodes import Node

MAX_WAIT_S = 600.0
MAX_GRACE_S = 3600.0


def register(api: Router, cp: ControlPlane) -> None:
    fleet = cp.fleet
    draining: set[str] = set()
    route = api.add

    def detail(node: Node, now: float) -> m.NodeDetail:
        nid = node.view.node_id
        live = [s.container_id for s in fleet.registry.on_node(nid)]
        if node.peer is None:
            state = "lost"
        elif nid in draining:
            state = "draining"
        elif nid in fleet.cordoned:
            state = "cordoned"
        else:
            state = "ready"
        return m.NodeDetail(
            node_id=nid,
            name=node.info.name,
            provider=node.info.provider,
            state=state,  # type: ignore[arg-type]
            cpu=node.view.cpu_total,
            cpu_reserved=node.view.cpu_reserved,
            memory_mb=node.view.memory_mb,
            memory_reserved_mb=node.view.memory_reserved_mb,
            gpus={k: len(v) for k, v in node.view.gpus.items()},
            labels=dict(node.info.labels),
            region=node.info.region,
            heartbeat_age_s=round(now - node.last_heartbeat, 3),
            containers=live,
            lost_reason=node.lost_reason if node.peer is None else "",
        )

    def find(key: str) -> Node:
        """A node by id or by name (a unique one)."""
        node = fleet.nodes.get(key)
        if node is not None:
            return node
        named = [n for n in fleet.nodes.values() if n.info.name == key]
        if len(named) == 1:
            return named[0]
        if named:
            ids = ", ".join(n.view.node_id for n in named)
            raise NotFoundError(f"several nodes are named {key!r} ({ids}): give its id")
        raise NotFoundError(f"no node {key!r}: see `strato node list`")

    @route(
        "GET", "/cluster/nodes", "Nodes with their state and containers", response=m.NodeDetailList
    )
    async def list_nodes(_: Request) -> Reply:
        now = time.monotonic()
        return reply(m.NodeDetailList([detail(n, now) for n in fleet.nodes.values()]))

    @route("GET", "/cluster/nodes/{node}", "One node", response=m.NodeDetail)
    async def describe(req: Request) -> Reply:
        return reply(detail(find(req.path_params["node"]), time.monotonic()))

    @route(
        "POST",
        "/cluster/nodes/{node}/cordon",
        "Place no new containers on a node",
        response=m.NodeDetail,
    )
    async def cordon(req: Request) -> Reply:
        node = find(req.path_params["node"])
        fleet.cordoned.add(node.view.node_id)
        return reply(detail(node, time.monotonic()))

    @route(
        "POST",
        "/cluster/nodes/{node}/uncordon",
        "Place containers on a node again",
        response=m.NodeDetail,
    )
    async def uncordon(req: Request) -> Reply:
        node = find(req.path_params["node"])
        fleet.cordoned.discard(node.view.node_id)
        draining.discard(node.view.node_id)
        cp._wake.set()
        return reply(detail(node, time.monotonic()))

    @route(
        "POST",
        "/cluster/nodes/{node}/drain",
        "Cordon a node and stop its containers once their running inputs finish",
        query={"grace": float, "wait": float},
        response=m.NodeDetail,
    )
    async def drain(req: Request) -> Reply:
        node = find(req.path_params["node"])
        nid = node.view.node_id
        grace = min(req.param("grace", float, 300.0), MAX_GRACE_S)
        wait = min(req.param("wait", float, 0.0), MAX_WAIT_S)
        fleet.cordoned.add(nid)
        draining.add(nid)
        for s in fleet.registry.on_node(nid):
            fleet.stop(s.container_id, grace)
        cp._wake.set()  # their queued inputs go to other nodes
        deadline = time.monotonic() + wait
        while fleet.registry.on_node(nid) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # a server-side wait: the client makes one request
        return reply(detail(node, time.monotonic()))

    @route("DELETE", "/cluster/nodes/{node}", "Forget a node (its containers count as lost)")
    async def remove(req: Request) -> Reply:
        node = find(req.path_params["node"])
        nid = node.view.node_id
        if node.peer is not None:
            fleet.worker_gone(nid, node.peer, "removed by the operator")
        for s in list(fleet.registry.on_node(nid)):
            fleet.kill(s.container_id, "its node was removed")
        fleet.nodes.pop(nid, None)
        if cp.agents is not None:  # its agent's node credential stops working now
            cp.agents.credentials.revoke_node(nid)
        fleet.cordoned.discard(nid)
        draining.discard(nid)
        cp.store.set_node_state(nid, "lost")
        return reply({"removed": nid})
