"""The container registry: every live container of this control plane, by id and by
function, with its state. The fleet owns it (it alone adds, removes and changes the
state of containers); the call manager, the gateway and the scaling module read it.

A container's ``inflight`` (its leases) and ``last_progress`` belong to the call manager;
``idle_since`` says since when it has held no work: whoever hands it work (the call
manager, the gateway for a web endpoint) notes that with :meth:`Container.note_busy` and
:meth:`Container.note_idle`.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .autoscaler import ContainerStat
from .calls.state import ContainerRef, Lease
from .scheduler import ContainerRequest, Placement

if TYPE_CHECKING:
    from .fleet_nodes import Peer


class ContainerState(enum.StrEnum):
    """``starting`` (placed, not ready yet) -> ``ready`` (takes inputs) -> ``stopping``
    (finishes what it holds, then exits) or ``killing`` (asked to die now) -> ``gone``."""

    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    KILLING = "killing"
    GONE = "gone"


LIVE = (ContainerState.STARTING, ContainerState.READY)  # counted as the function's containers
LEAVING = (ContainerState.STOPPING, ContainerState.KILLING)


@dataclass(eq=False)
class Container:
    container_id: str
    function_id: str
    app_id: str
    node_id: str
    request: ContainerRequest
    placement: Placement
    started_at: float = field(default_factory=time.monotonic)
    state: ContainerState = ContainerState.STARTING
    peer: Peer | None = None
    inflight: dict[int, Lease] = field(default_factory=dict)
    last_progress: float = field(default_factory=time.monotonic)
    idle_since: float | None = None
    lost_handle: asyncio.TimerHandle | None = None
    # the worker's exit report (description, oom), kept while the container's own channel
    # may still carry its last frames
    exit_report: tuple[str, bool] | None = None
    token: str = field(default_factory=lambda: secrets.token_hex(16))

    def send(self, msg: object) -> None:
        if self.peer is not None:
            self.peer.send(msg)

    def note_busy(self) -> None:
        """It carries work now (the fleet does not reclaim a busy container)."""
        self.idle_since = None

    def note_idle(self, now: float) -> None:
        """It carries nothing since ``now`` (noted while it is ready)."""
        if self.state == ContainerState.READY:
            self.idle_since = now


def container_stat(c: Container, inflight: int, idle_since: float | None) -> ContainerStat:
    """One container as the autoscaler sees it: leaving ones count as stopping; only a
    ready one is idle."""
    ready = c.state == ContainerState.READY
    return ContainerStat(
        container_id=c.container_id,
        state="stopping" if c.state not in LIVE else ("ready" if ready else "starting"),
        inflight=inflight,
        idle_since=idle_since if ready else None,
        started_at=c.started_at,
    )


class ContainerRegistry:
    """Live containers by id, by function and by app, in the order they started."""

    def __init__(self) -> None:
        self._by_id: dict[str, Container] = {}
        self._by_function: dict[str, dict[str, Container]] = {}

    def add(self, c: Container) -> None:
        self._by_id[c.container_id] = c
        self._by_function.setdefault(c.function_id, {})[c.container_id] = c

    def remove(self, c: Container) -> None:
        self._by_id.pop(c.container_id, None)
        of_fn = self._by_function.get(c.function_id)
        if of_fn is not None:
            of_fn.pop(c.container_id, None)
            if not of_fn:
                del self._by_function[c.function_id]

    def get(self, container_id: str) -> Container | None:
        return self._by_id.get(container_id)

    def __contains__(self, container_id: object) -> bool:
        return container_id in self._by_id

    def __iter__(self) -> Iterator[Container]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def values(self) -> list[Container]:
        return list(self._by_id.values())

    def of_function(self, function_id: str) -> list[Container]:
        return list(self._by_function.get(function_id, {}).values())

    def ready_of(self, function_id: str) -> list[ContainerRef]:
        return [
            c
            for c in self._by_function.get(function_id, {}).values()
            if c.state == ContainerState.READY
        ]

    def live_of(self, function_id: str) -> list[Container]:
        """The function's starting and ready containers."""
        return [c for c in self._by_function.get(function_id, {}).values() if c.state in LIVE]

    def has_function(self, function_id: str) -> bool:
        return bool(self._by_function.get(function_id))

    def of_app(self, app_id: str) -> list[Container]:
        return [c for c in self._by_id.values() if c.app_id == app_id]

    def on_node(self, node_id: str) -> list[Container]:
        return [c for c in self._by_id.values() if c.node_id == node_id]

    def mark_killing(self, container: ContainerRef) -> None:
        c = self._by_id.get(container.container_id)
        if c is not None and c.state != ContainerState.GONE:
            c.state = ContainerState.KILLING

    def stats(
        self,
        function_id: str,
        load: Callable[[Container], tuple[int, float | None]] | None = None,
    ) -> list[ContainerStat]:
        """The function's containers for the autoscaler. ``load``: a container's inputs
        in flight and since when it is idle, where another part than the call manager
        hands it work (the gateway); by default its leases and ``idle_since``."""
        out = []
        for c in self._by_function.get(function_id, {}).values():
            inflight, idle_since = load(c) if load is not None else (len(c.inflight), c.idle_since)
            out.append(container_stat(c, inflight, idle_since))
        return out
