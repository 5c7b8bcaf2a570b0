"""The containers behind one endpoint, their tunnels, and the requests waiting for them.

An ``Endpoint`` is one function (one deployed version of an app's label). Each of its
containers is a ``Backend`` holding the tunnels the container dialed (``Upstream``
connections, each a keep-alive HTTP/1.1 connection to the container's server) and the
number of requests in flight on it, at most the function's ``max_inputs``
(``@strato.concurrent``; one by default, as in Modal).

A request takes the least-loaded ready container with a free slot and an idle tunnel,
or waits in ``waiters`` (first come, first served) until one frees up or starts; the
autoscaler sees the waiters as queued and the slots in use as in flight. A redeployed
endpoint keeps the versions it replaced in ``previous``: while it has no ready container
yet, requests go to theirs, so a redeploy drops nothing; once it has one, they drain and
stop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from strato.protocol import messages as m

from ..containers import ContainerState
from .exchange import Phase

if TYPE_CHECKING:
    from ..autoscaler import ContainerStat
    from ..scheduler import ContainerRequest, NodeView
    from .exchange import Exchange
    from .upstream import Upstream

SERVING = ContainerState.READY


class ContainerView(Protocol):
    """What the gateway reads of one of the fleet's containers (``containers.Container``)."""

    @property
    def container_id(self) -> str: ...
    @property
    def function_id(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def token(self) -> str: ...
    @property
    def idle_since(self) -> float | None: ...
    @property
    def started_at(self) -> float: ...
    def note_busy(self) -> None: ...
    def note_idle(self, now: float) -> None: ...


class FleetView(Protocol):
    """What the gateway asks of the fleet."""

    def container(self, container_id: str) -> ContainerView | None: ...
    def containers_of(self, function_id: str) -> Sequence[ContainerView]: ...
    def live_containers_of(self, function_id: str) -> Sequence[ContainerView]: ...
    def backing_off(self, function_id: str, now: float) -> bool: ...
    def container_stats(
        self, function_id: str, load: Callable[[ContainerView], tuple[int, float | None]]
    ) -> list[ContainerStat]: ...
    def stop(self, container_id: str) -> None: ...
    def live_views(self) -> list[NodeView]: ...
    def request_for(self, spec: m.FunctionSpec) -> ContainerRequest: ...

    # the broker's "can a node be bought for this request" (None: no broker)
    supply: Callable[[ContainerRequest, bool], bool] | None


class FunctionView(Protocol):
    """What the gateway reads of a function (``calls.FunctionQueue``)."""

    @property
    def function_id(self) -> str: ...
    @property
    def app_id(self) -> str: ...
    @property
    def spec(self) -> m.FunctionSpec: ...


class CallsView(Protocol):
    """What the gateway asks of the call manager."""

    def function(self, function_id: str) -> FunctionView: ...
    def note_arrival(self, function_id: str, now: float | None = None) -> None: ...


class Backend:
    """One container of an endpoint, as the gateway sees it."""

    __slots__ = ("session", "endpoint", "idle", "tunnels", "inflight", "idle_since")

    def __init__(self, session: ContainerView, endpoint: Endpoint) -> None:
        self.session = session  # the fleet's container (state, container_id, ...)
        self.endpoint = endpoint
        self.idle: list[Upstream] = []  # connected tunnels not carrying a request
        self.tunnels = 0  # connected tunnels, idle or busy
        self.inflight = 0
        self.idle_since: float | None = time.monotonic()

    @property
    def container_id(self) -> str:
        return self.session.container_id

    def mark_busy(self) -> None:
        self.inflight += 1
        if self.idle_since is not None:
            self.idle_since = None
            self.session.note_busy()  # the fleet must not reclaim a busy container

    def mark_free(self, now: float) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle_since = now
            self.session.note_idle(now)


class Endpoint:
    def __init__(self, fn: FunctionView, max_waiting: int) -> None:
        self.fn = fn
        self.function_id = fn.function_id
        self.app_id = fn.app_id
        self.slots = max(1, fn.spec.max_inputs)
        self.max_waiting = max_waiting
        self.backends: dict[str, Backend] = {}
        self.waiters: deque[Exchange] = deque()
        self.previous: list[Endpoint] = []  # versions this one replaced, still draining
        self.successor: Endpoint | None = None  # set once this version is replaced
        self.retired_at: float | None = None

    # ------------------------------------------------------------------ dispatch

    def has_ready(self) -> bool:
        return any(b.session.state == SERVING for b in self.backends.values())

    def pick(self) -> tuple[Backend, Upstream] | None:
        """Take a slot and a tunnel on the least-loaded ready container, if one is free."""
        best = None
        slots = self.slots
        for b in self.backends.values():
            if b.idle and b.inflight < slots and b.session.state == SERVING:
                if best is None or b.inflight < best.inflight:
                    best = b
        if best is None:
            if self.previous and not self.has_ready():
                for ep in reversed(self.previous):
                    got = ep.pick()
                    if got is not None:
                        return got
            return None
        best.mark_busy()
        return best, best.idle.pop()

    def pump(self) -> None:
        """Hand free slots to waiting requests, oldest first."""
        waiters = self.waiters
        while waiters:
            if waiters[0].phase is not Phase.WAITING:  # (an exchange leaves when it ends)
                waiters.popleft()
                continue
            got = self.pick()
            if got is None:
                return
            waiters.popleft().bind(*got)

    def pump_all(self) -> None:
        """After a slot or tunnel of this endpoint frees up: its own waiters, and those of
        the versions that replaced it (which may borrow its containers)."""
        self.pump()
        ep = self.successor
        while ep is not None:
            ep.pump()
            ep = ep.successor

    # ------------------------------------------------------------------ accounting

    def inflight(self) -> int:
        return sum(b.inflight for b in self.backends.values())

    def load(self) -> tuple[int, int]:
        """(waiting, in flight) requests for the autoscaler. Requests that the versions this
        one replaced still carry count as this one's: the new version scales up to take
        over their traffic."""
        inflight = self.inflight() + sum(ep.inflight() for ep in self.previous)
        return len(self.waiters), inflight

    def backend_for(self, session: ContainerView) -> Backend:
        b = self.backends.get(session.container_id)
        if b is None:
            b = self.backends[session.container_id] = Backend(session, self)
        return b

    def forget_gone(self) -> None:
        for cid, b in list(self.backends.items()):
            if b.session.state == ContainerState.GONE and b.tunnels == 0:
                del self.backends[cid]
