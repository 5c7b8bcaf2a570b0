"""What the call manager keeps in memory: each function's queue of inputs, the inputs of
each call not yet ended, and the leases containers hold.

A container itself is the fleet's (``server/containers.py``); the call manager sees it
through :class:`ContainerRef` and finds a function's containers through
:class:`ContainerDirectory`.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

import msgspec

from strato.exceptions import NotFoundError
from strato.protocol import messages as m

from ..store import Store

# how an input ended (what its final output says)
Status = Literal["success", "failure", "died", "timeout", "cancelled"]

K = TypeVar("K")
V = TypeVar("V")

# inputs whose container (and whether it failed to start) is remembered once they ended
RAN_KEPT = 100_000


class Recent(Generic[K, V]):
    """A map that keeps its newest entries: at least ``limit // 2``, at most ``limit``
    (two generations of plain dicts: a put costs one dict store, on hot paths)."""

    def __init__(self, limit: int) -> None:
        self.half = max(1, limit // 2)
        self._new: dict[K, V] = {}
        self._old: dict[K, V] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._new or key in self._old

    def put(self, key: K, value: V) -> None:
        new = self._new
        new[key] = value
        if len(new) >= self.half:
            self._old, self._new = new, {}

    def get(self, key: K) -> V | None:
        found = self._new.get(key)
        return found if found is not None else self._old.get(key)

    def pop(self, key: K) -> V | None:
        a, b = self._new.pop(key, None), self._old.pop(key, None)
        return a if a is not None else b


class Where(enum.StrEnum):
    """Where an input is: waiting in its function's queue, leased to a container, waiting
    for a retry's delay, or ended with its final output."""

    QUEUED = "queued"
    LEASED = "leased"
    RETRY = "retry"
    DONE = "done"


class AppState(enum.StrEnum):
    DEPLOYED = "deployed"
    EPHEMERAL = "ephemeral"
    STOPPED = "stopped"


@dataclass(eq=False)
class Pending:
    input_id: int
    call_id: str
    idx: int
    function_id: str
    args: bytes | None
    args_blob: str | None
    method: str | None
    attempts: int = 0  # failed attempts so far
    where: Where = Where.QUEUED
    session: ContainerRef | None = None
    solo: bool = False  # run it alone in its container (it may be what crashed one)


@dataclass(eq=False)
class Lease:
    pending: Pending
    token: int
    dispatched_at: float


class ContainerRef(Protocol):
    """What the call manager needs of a live container (the fleet's ``Container``).

    ``inflight`` (its leases) and ``last_progress`` are the call manager's; ``state`` is
    the fleet's, read here; ``idle_since`` says since when it holds no work."""

    container_id: str
    function_id: str
    inflight: dict[int, Lease]
    last_progress: float
    idle_since: float | None

    @property
    def state(self) -> str: ...

    def send(self, msg: object) -> None: ...


class ContainerDirectory(Protocol):
    """How the call manager finds a function's containers (the fleet's registry)."""

    def of_function(self, function_id: str) -> Iterable[ContainerRef]: ...

    def ready_of(self, function_id: str) -> list[ContainerRef]: ...

    def mark_killing(self, container: ContainerRef) -> None:
        """The container is about to be killed: it takes no more inputs."""
        ...


@dataclass(eq=False)
class FunctionQueue:
    """One function as the call manager sees it: its spec, its app's state and its queue
    of inputs ready to run."""

    function_id: str
    app_id: str
    name: str
    spec: m.FunctionSpec
    app_state: AppState
    queue: deque[Pending] = field(default_factory=deque)
    ewma_duration: float | None = None  # seconds one input takes, smoothed
    last_activity: float = field(default_factory=time.monotonic)


_spec_decoder = msgspec.msgpack.Decoder(m.FunctionSpec)


class Ledger:
    """The functions the call manager has loaded, and the inputs of each call that have
    not ended yet."""

    def __init__(
        self,
        store: Store,
        containers: ContainerDirectory,
        on_arrival: Callable[[str, float], None],
    ) -> None:
        self.store = store
        self.containers = containers
        self.on_arrival = on_arrival
        self.functions: dict[str, FunctionQueue] = {}
        self.live: dict[str, dict[int, Pending]] = {}  # call_id -> input_id -> Pending
        # input_id -> the container that ran it last, of the inputs that ended (newest)
        self.ran_on: Recent[int, str] = Recent(RAN_KEPT)
        # input_ids of the inputs that ended because their containers failed to start
        self.init_failed: Recent[int, None] = Recent(RAN_KEPT)

    def function(self, function_id: str) -> FunctionQueue:
        fn = self.functions.get(function_id)
        if fn is None:
            row = self.store.function_row(function_id)
            if row is None:
                raise NotFoundError(f"function {function_id} does not exist")
            fn = FunctionQueue(
                function_id=function_id,
                app_id=row.app_id,
                name=row.name,
                spec=_spec_decoder.decode(row.spec),
                app_state=AppState(row.app_state),
            )
            self.functions[function_id] = fn
        return fn

    def inflight(self, fn: FunctionQueue) -> int:
        """Inputs of ``fn`` leased to its containers."""
        return sum(len(c.inflight) for c in self.containers.of_function(fn.function_id))

    def track(self, p: Pending) -> None:
        self.live.setdefault(p.call_id, {})[p.input_id] = p

    def untrack(self, p: Pending) -> None:
        live = self.live.get(p.call_id)
        if live is not None:
            live.pop(p.input_id, None)
            if not live:
                del self.live[p.call_id]
