"""The node sessions of the fleet: each node's worker agent, its channel and heartbeats.

A worker agent registers its node (``worker_hello``), keeps it alive with heartbeats and
reports its containers' starts and exits (``on_worker_message``); when its channel drops
or it goes silent, its node is lost (``worker_gone``) and the containers on it count as
dead. :class:`NodeSessions` is the base of :class:`~strato.server.fleet.Fleet`, which
starts and stops the containers (``fleet.py``) and sets up the state declared here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from strato.protocol import frames
from strato.protocol import messages as m

from .containers import Container, ContainerRegistry, ContainerState
from .scheduler import NodeView
from .store import Store

if TYPE_CHECKING:
    from .sandboxes import Sandboxes as SandboxWatch

log = logging.getLogger("strato.fleet")

# an input held by containers of this many lost nodes counts a failed attempt (an input
# that kills its worker agent must not loop forever)
MAX_NODE_LOSSES = 3


class Peer:
    """One channel connection; writes are buffered frames (asyncio transport)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def send(self, msg: object) -> None:
        if not self.writer.is_closing():
            self.writer.write(frames.encode(msg))

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


@dataclass(eq=False)
class Node:
    view: NodeView
    info: m.NodeInfo
    peer: Peer | None
    worker_id: str
    last_heartbeat: float = field(default_factory=time.monotonic)
    lost_at: float | None = None  # when its worker agent was lost (None: connected)
    lost_reason: str = ""
    # containers counted dead with the lost agent: the next agent of the node kills what
    # is left of them (processes, cgroups)
    lost_containers: list[str] = field(default_factory=list)


class NodeSessions:
    """The fleet's nodes and their worker agents' sessions (the base of ``Fleet``)."""

    # set up by Fleet.__init__
    store: Store
    registry: ContainerRegistry
    epoch: str
    http_url: str
    nodes: dict[str, Node]
    heartbeat_timeout_s: float
    agent_note: str
    preempted: set[str]
    sandbox_watch: SandboxWatch | None
    _node_losses: dict[int, int]
    _unplaceable_logged: dict[str, tuple[str, float, float, int]]
    _on_change: Callable[[], None]
    _tell: Callable[[str, str, str], None]

    # the container side, Fleet's: what a node session reports of a container
    def _exited(self, s: Container, description: str, oom: bool) -> None:
        raise NotImplementedError

    def _init_failed(
        self,
        s: Container,
        error: str,
        tb: str | None,
        exc: bytes | None,
        error_type: str | None = None,
    ) -> None:
        raise NotImplementedError

    def _gone(
        self,
        s: Container,
        description: str,
        oom: bool,
        node_lost: bool = False,
        blamed: int = 0,
    ) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ what others ask

    def is_spot(self, node_id: str) -> bool:
        """--- broker: a spot node (its provider may take it back; label ``spot=1``)."""
        node = self.nodes.get(node_id)
        return node is not None and node.info.labels.get("spot") == "1"

    def live_views(self) -> list[NodeView]:
        """The nodes whose worker agent is connected."""
        return [n.view for n in self.nodes.values() if n.peer is not None]

    # ------------------------------------------------------------------ workers

    def worker_hello(
        self,
        hello: m.WorkerHello,
        peer: Peer,
        credential: Callable[[str], str] | None = None,
    ) -> str:
        """Register the node of ``hello``; ``credential(node_id)``: a joined agent's node
        credential, sent in its welcome (--- cluster)."""
        info = hello.node
        node_id = "node-" + msgspec.msgpack.encode([info.provider, info.name]).hex()[-12:]
        old = self.nodes.get(node_id)
        view = NodeView(
            node_id=node_id,
            provider=info.provider,
            region=info.region,
            price_per_hour=info.price_per_hour,
            cpu_total=info.cpu,
            memory_mb=info.memory_mb,
            gpus={k: list(v) for k, v in info.gpus.items()},
        )
        if old is not None:  # a reconnect: keep the reservations of its live containers
            view.cpu_reserved = old.view.cpu_reserved
            view.memory_reserved_mb = old.view.memory_reserved_mb
            view.gpus_in_use = old.view.gpus_in_use
            if old.peer is not None and old.peer is not peer:
                old.peer.close()
        self.nodes[node_id] = Node(view, info, peer, hello.worker_id)
        if old is not None and old.lost_at is not None:
            log.info(
                "node %s: its worker agent is back after %.1fs",
                node_id,
                time.monotonic() - old.lost_at,
            )
            self.agent_note = ""
        self.store.upsert_node(
            node_id, info.name, info.provider, msgspec.msgpack.encode(info), "ready"
        )
        kill = [cid for cid in hello.running if cid not in self.registry]
        if old is not None:  # those of its lost agent, whatever this agent knows of them
            kill += [cid for cid in old.lost_containers if cid not in kill]
        peer.send(
            m.WorkerWelcome(
                node_id=node_id,
                epoch=self.epoch,
                http_url=self.http_url,
                kill=kill,
                # --- cluster: a joined agent's node credential, for its code and blobs
                api_token=credential(node_id) if credential is not None else "",
            )
        )
        log.info(
            "node %s (%s, %s CPU, %s MiB, GPUs %s) joined",
            node_id,
            info.name,
            info.cpu,
            info.memory_mb,
            info.gpus or "none",
        )
        self._on_change()
        return node_id

    def worker_gone(self, node_id: str, peer: Peer, why: str = "its channel closed") -> None:
        """The node's worker agent is gone (its channel dropped, or it stopped sending
        heartbeats): the node places nothing until an agent registers as it again, and its
        containers count as dead. Their inputs go back to the front of the queue without
        an attempt counted: the node failed, not the input (a later agent of the node kills
        what is left of them; their late outputs carry stale dispatch tokens)."""
        node = self.nodes.get(node_id)
        if node is None or node.peer is not peer:
            return
        node.peer = None
        node.view.healthy = False
        node.lost_at = time.monotonic()
        node.lost_reason = why
        self.store.set_node_state(node_id, "lost")
        lost = self.registry.on_node(node_id)
        node.lost_containers += [s.container_id for s in lost]
        log.warning(
            "node %s lost its worker agent (%s); %d containers lost with it",
            node_id,
            why,
            len(lost),
        )
        told: set[str] = set()
        for s in lost:
            if s.app_id not in told and s.state in (ContainerState.STARTING, ContainerState.READY):
                told.add(s.app_id)
                self._tell(
                    s.app_id,
                    f"node {node_id} lost its worker agent ({why}); the inputs its "
                    "containers held go back to the queue",
                    "-",
                )
            blamed = 0 if node_id in self.preempted else self._repeat_losses(s)
            self._gone(
                s,
                "lost its node's worker agent"
                + (f" ({MAX_NODE_LOSSES} times with this input)" if blamed else ""),
                oom=False,
                node_lost=True,
                blamed=blamed,
            )
        if peer is not None:
            peer.close()
        self._on_change()

    def _repeat_losses(self, s: Container) -> int:
        """Count one more lost node for each input ``s`` holds; those lost with their
        node ``MAX_NODE_LOSSES`` times are put first in its leases, and counted."""
        blamed = []
        for input_id in s.inflight:
            n = self._node_losses.get(input_id, 0) + 1
            self._node_losses[input_id] = n
            if n >= MAX_NODE_LOSSES:
                blamed.append(input_id)
        if len(self._node_losses) > 100_000:  # forget the oldest
            for input_id in list(self._node_losses)[:10_000]:
                del self._node_losses[input_id]
        if blamed:
            for input_id in blamed:
                self._node_losses.pop(input_id, None)
            first = {i: s.inflight[i] for i in blamed}
            first.update((i, lease) for i, lease in s.inflight.items() if i not in first)
            s.inflight = first  # release_leases counts the first ``running`` as failed
        return len(blamed)

    def check_heartbeats(self, now: float) -> None:
        """A connected agent silent for ``heartbeat_timeout_s`` is lost (hung, or its
        machine unreachable without the connection noticing)."""
        for node_id, node in list(self.nodes.items()):
            if node.peer is not None and now - node.last_heartbeat > self.heartbeat_timeout_s:
                self.worker_gone(
                    node_id,
                    node.peer,
                    f"no heartbeat for {now - node.last_heartbeat:.0f}s",
                )

    def worker_restarting(self, text: str) -> None:
        """What the provider says of a dead agent it is restarting (shown to waiting apps)."""
        self.agent_note = text
        for fn_id in list(self._unplaceable_logged):
            why, since, _, n = self._unplaceable_logged[fn_id]
            self._unplaceable_logged[fn_id] = (why, since, 0.0, n)  # tell again now
        self._on_change()

    def on_worker_message(self, node_id: str, msg: object) -> None:
        node = self.nodes.get(node_id)
        if node is not None:
            node.last_heartbeat = time.monotonic()
        if isinstance(msg, m.ContainerExited):
            s = self.registry.get(msg.container_id)
            if s is not None:
                self._exited(s, msg.description, msg.oom_killed)
        elif isinstance(msg, m.ContainerStartFailed):
            s = self.registry.get(msg.container_id)
            if s is not None:
                # unknown types reach the caller as RemoteError, strato's own
                # (ImageBuildError, ...) as themselves
                self._init_failed(s, msg.error, None, None, msg.error_type)
                said = f"{msg.error_type}: {msg.error}" if msg.error_type else msg.error
                self._gone(s, f"failed to start: {said}", oom=False)
        elif isinstance(msg, m.SbOomCount):  # --- sandboxes
            if self.sandbox_watch is not None:
                self.sandbox_watch.oom_count(msg.container_id, msg.count)
        elif isinstance(msg, m.SbSnapshotDone):  # --- sandboxes: a snapshot's layer
            if self.sandbox_watch is not None:
                self.sandbox_watch.snapshots.done(node_id, msg)
        elif isinstance(msg, m.ContainerStarted):
            s = self.registry.get(msg.container_id)
            # its "ready" comes over its own channel and may be handled first: a record
            # never goes back from ready (or stopping) to starting
            if s is not None and s.state == ContainerState.STARTING:
                self.store.set_container_state(s.container_id, "starting")
