"""Nodes, their worker agents, and the containers running on them.

The fleet places a new container with the scheduler, reserves its resources, asks the
node's worker agent to start it, and tracks it until the agent reports its exit. It owns
the container registry (``containers.py``: each container's state) and the channel
sessions of containers and workers (those of the nodes' worker agents in
``fleet_nodes.py``, its base); what runs inside a container (inputs, leases) belongs to
the call manager. Others ask it: ``container``, ``containers_of``, ``backing_off``,
``container_stats``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

import msgspec

from strato import settings
from strato.exceptions import ContainerStartError, Error
from strato.protocol import messages as m
from strato.protocol.gpu import parse_gpu
from strato.protocol.mounts import MountManifest

from . import metrics
from .autoscaler import ContainerStat
from .calls.manager import CallManager, FunctionQueue
from .calls.state import Status
from .cluster.placer import FleetIndex
from .containers import LEAVING, Container, ContainerRegistry, ContainerState
from .fleet_nodes import Node, NodeSessions, Peer
from .scheduler import ContainerRequest, explain_unplaceable, place
from .scheduler import release as release_resources
from .scheduler import reserve as reserve_resources
from .scheduler.eviction import Resident, eviction_victims
from .store import Store

if TYPE_CHECKING:
    from .metering import Meter
    from .sandboxes import Sandboxes as SandboxWatch
    from .scheduler.quota import QuotaGate

log = logging.getLogger("strato.fleet")

EXIT_REPORT_GRACE_S = 3.0  # wait this long for the worker's exit report after a channel drops
# while a function cannot be placed, its app's user is told again after these many seconds
# (then every last one), with how long it has been so
WAIT_REPORT_AFTER_S = (5.0, 15.0, 30.0, 60.0)
STARTUP_TIMEOUT_S = 300.0
INIT_FAILURE_BACKOFF_S = (1.0, 30.0)


class Fleet(NodeSessions):
    def __init__(
        self,
        store: Store,
        calls: CallManager,
        registry: ContainerRegistry,
        *,
        token: str,
        epoch: str,
        http_url: str,
        channel_address: Callable[[str], str],
        runtime: str | None,
        on_change: Callable[[], None],
        tell: Callable[[str, str, str], None] = lambda app_id, text, container_id: None,
    ) -> None:
        self.store = store
        self.calls = calls
        self.token = token
        self.epoch = epoch
        self.http_url = http_url
        self.channel_address = channel_address
        self.runtime = runtime
        self._on_change = on_change
        self._tell = tell  # (app_id, text, container_id): progress shown to the app's user
        self.nodes: dict[str, Node] = {}
        self.registry = registry
        self._backoff: dict[str, tuple[float, float]] = {}  # function_id -> (until, next delay)
        # function_id -> (why it waits, since when, next report at, reports so far)
        self._unplaceable_logged: dict[str, tuple[str, float, float, int]] = {}
        self.quota: QuotaGate | None = None  # per-app quotas, set by the control plane
        # a worker agent sends a Heartbeat every few seconds; silent this long, its node is lost
        self.heartbeat_timeout_s = settings.WORKER_HEARTBEAT_TIMEOUT.get()
        self.agent_note = ""  # what the provider says of a dead agent (restarting in ...)
        self._node_losses: dict[int, int] = {}  # input_id -> lost nodes that held it
        # --- cluster: nodes that take no new containers (strato node cordon/drain)
        self.cordoned: set[str] = set()
        # --- cluster: the scan for small clusters, an index from 32 nodes on
        self.placement_index = FleetIndex()
        # --- secrets: the plain environment of a function's secrets for one start (set by
        # api/routes_secrets.py); None: secrets are not served and such functions wait
        self.secret_env: Callable[[m.FunctionSpec], dict[str, str]] | None = None
        # --- sandboxes: told when a sandbox's container is ready or gone (set by
        # api/routes_sandboxes.py; server/sandboxes)
        self.sandbox_watch: SandboxWatch | None = None
        # --- broker: can it buy a node for this request (then the work waits for it)
        self.supply: Callable[[ContainerRequest, bool], bool] | None = None
        # --- ray: why a supplier that had such work wait gives up on it (Ray's autoscaler
        # added no node in STRATO_RAY_AUTOSCALER_WAIT_S, or found it infeasible), or None
        self.supply_note: Callable[[ContainerRequest], str | None] | None = None
        self.meter: Meter | None = None  # --- broker: usage per container (metering.py)
        # --- broker: nodes whose provider took them back (spot preemption): losing one is
        # never its inputs' fault, so it never counts toward MAX_NODE_LOSSES
        self.preempted: set[str] = set()

    # ------------------------------------------------------------------ what others ask

    def container(self, container_id: str) -> Container | None:
        return self.registry.get(container_id)

    def containers_of(self, function_id: str) -> list[Container]:
        """The function's containers, whatever their state, oldest first."""
        return self.registry.of_function(function_id)

    def live_containers_of(self, function_id: str) -> list[Container]:
        """The function's starting and ready containers."""
        return self.registry.live_of(function_id)

    def backing_off(self, function_id: str, now: float) -> bool:
        """True while the function's containers failed to start and the next start of
        one waits."""
        until, _ = self._backoff.get(function_id, (0.0, 0.0))
        return until > now

    def failing_to_start(self, function_id: str) -> bool:
        """True from a failed start of one of its containers until one is ready."""
        return function_id in self._backoff

    def container_stats(
        self,
        function_id: str,
        load: Callable[[Container], tuple[int, float | None]] | None = None,
    ) -> list[ContainerStat]:
        """The function's containers as the autoscaler sees them (see
        ``ContainerRegistry.stats`` for ``load``)."""
        return self.registry.stats(function_id, load)

    # ------------------------------------------------------------------ containers

    def request_for(self, spec: m.FunctionSpec) -> ContainerRequest:
        res = spec.resources
        return ContainerRequest(
            cpu=res.cpu,
            memory_mb=res.memory_mb,
            gpu=parse_gpu(res.gpu or None),
            region=spec.region,  # --- broker: Modal's region= and cloud=
            provider=spec.cloud,
        )

    def start_container(self, fn: FunctionQueue) -> Container | None:
        """Place and start one container for ``fn``; None when it cannot start now."""
        until, _ = self._backoff.get(fn.function_id, (0.0, 0.0))
        if time.monotonic() < until:
            return None
        secret_env = self._secret_env(fn)  # --- secrets
        if secret_env is None:
            return None
        request = self.request_for(fn.spec)
        views = self.live_views()
        if self.quota is not None and self.quota.blocks(  # per-app quotas
            fn, request, self.registry.values(), views
        ):
            return None
        if fn.spec.nonpreemptible:  # --- broker: never on a spot node
            views = [v for v in views if not self.is_spot(v.node_id)]
        placement = self.placement_index.place(
            request, [v for v in views if v.node_id not in self.cordoned]
        )
        if placement is None:
            if not self._reclaim_idle(fn, request):
                self._unplaceable(fn, request)
            return None
        self._unplaceable_logged.pop(fn.function_id, None)
        node = self.nodes[placement.node_id]
        assert node.peer is not None  # placed on a connected node
        reserve_resources(node.view, request, placement)
        self.placement_index.touched(node.view.node_id)  # --- cluster
        cid = "ct-" + secrets.token_hex(6)
        s = Container(cid, fn.function_id, fn.app_id, node.view.node_id, request, placement)
        self.registry.add(s)
        if self.meter is not None:  # --- broker: metering
            self.meter.started(s, node.view, fn.name)
        self.store.insert_container(
            {
                "container_id": cid,
                "app_id": fn.app_id,
                "function_id": fn.function_id,
                "node_id": s.node_id,
                "state": "pending",
                "started_at": time.time(),
            }
        )
        mount = None
        if fn.spec.mount_id:
            raw = self.store.mount(fn.spec.mount_id)
            mount = msgspec.msgpack.decode(raw, type=MountManifest) if raw else None
        node.peer.send(
            m.ContainerStart(
                container_id=cid,
                app_id=fn.app_id,
                function_id=fn.function_id,
                spec=fn.spec,
                mount=mount,
                gpu_indices=placement.gpu_indices,
                channel=self.channel_address(node.view.node_id),
                runtime=self.runtime,
                token=s.token,
                secret_env=secret_env,
            )
        )
        log.info("starting container %s for %s on %s", cid, fn.name, s.node_id)
        self._tell(fn.app_id, f"starting a container for {fn.name} on {s.node_id}", cid)
        return s

    def _secret_env(self, fn: FunctionQueue) -> dict[str, str] | None:
        """The values of ``fn``'s secrets for a start; None (its queued inputs failed and
        its starts backing off, as for a failed start) when they cannot be had: a secret
        deleted since the deploy, a key that cannot open it. Errors never carry values."""
        if not fn.spec.secrets:
            return {}
        try:
            if self.secret_env is None:
                raise ContainerStartError("this control plane serves no secrets")
            return self.secret_env(fn.spec)
        except Error as e:
            why = f"cannot start a container for {fn.name}: {e}"
            log.warning("%s", why)
            self._tell(fn.app_id, why, "-")
            _, delay = self._backoff.get(fn.function_id, (0.0, INIT_FAILURE_BACKOFF_S[0]))
            self._backoff[fn.function_id] = (
                time.monotonic() + delay,
                min(delay * 2, INIT_FAILURE_BACKOFF_S[1]),
            )
            self.calls.fail_queued(
                fn.function_id, str(e), count_attempt=False, error_type=type(e).__name__
            )
            return None

    def _reclaim_idle(self, fn: FunctionQueue, request: ContainerRequest) -> bool:
        """Make room for ``fn`` by stopping idle containers of other functions (those kept
        warm only by their scale-down window). True when room is made or on its way."""
        nodes = [
            (node.view, [self._resident(s) for s in self.registry.on_node(node.view.node_id)])
            for node in self.nodes.values()
            if node.peer is not None and node.view.node_id not in self.cordoned
        ]
        spare: dict[str, int] = {}
        for _, residents in nodes:
            for r in residents:
                owner = self.calls.functions.get(r.function_id)
                if owner is not None and r.function_id not in spare:
                    live = len(self.registry.live_of(r.function_id))
                    keep = owner.spec.scaling.min_containers  # keep warm pools whole
                    spare[r.function_id] = 0 if owner.queue else live - keep
        victims = eviction_victims(request, fn.function_id, nodes, spare)
        if victims is None:
            return False
        for cid in victims:
            log.info("stopping idle container %s to make room for %s", cid, fn.name)
            self.stop(cid)
        return True

    @staticmethod
    def _resident(s: Container) -> Resident:
        return Resident(
            container_id=s.container_id,
            function_id=s.function_id,
            request=s.request,
            placement=s.placement,
            leaving=s.state in LEAVING,
            idle=s.state == ContainerState.READY and not s.inflight,
            idle_since=s.idle_since,
        )

    def _unplaceable(self, fn: FunctionQueue, request: ContainerRequest) -> None:
        empty = [v.emptied() for v in self.live_views()]
        if self.supply is not None and self.supply(request, fn.spec.nonpreemptible):
            return  # --- broker: a node is bought for it (the broker tells the app)
        if empty and place(request, empty) is None:
            # No node could ever run it: fail its inputs rather than let them wait forever.
            why = explain_unplaceable(request, empty)
            note = self.supply_note(request) if self.supply_note is not None else None
            if note:  # --- ray
                why = f"{why}; {note}"
            self.calls.fail_queued(
                fn.function_id,
                f"no node of this cluster can run {fn.name}: {why}",
                count_attempt=False,
                error_type="ResourceUnavailableError",
            )
            return
        now = time.monotonic()
        connected = [n for n in self.nodes.values() if n.peer is not None]
        if not self.nodes:  # at start-up, before the first worker agent has registered
            why, what = "no worker agent has registered yet", "waits for a worker agent"
        elif not connected:  # every node's agent is gone (dead, restarting, unreachable)
            lost = sorted(self.nodes.values(), key=lambda n: n.lost_at or now)
            why = "; ".join(
                f"node {n.view.node_id} lost its worker agent"
                f" {now - (n.lost_at or now):.0f}s ago ({n.lost_reason})"
                for n in lost
            )
            if self.agent_note:
                why += f"; {self.agent_note}"
            what = f"waits for a worker agent: no node can run it now: {why}"
        else:
            why = explain_unplaceable(request, [n.view for n in self.nodes.values()])
            what = f"waits for capacity: {why}"
        self._report_wait(fn, why, what, now)

    def _report_wait(self, fn: FunctionQueue, why: str, what: str, now: float) -> None:
        """Tell the app's user why ``fn`` cannot run, when that changes and again now and
        then, with how long it has been so."""
        key = why.split(" lost its worker agent ")[0]  # the seconds in it change each tick
        prior = self._unplaceable_logged.get(fn.function_id)
        if prior is None:
            since, n = now, 0
        else:
            prior_why, since, due, n = prior
            if prior_why == key and now < due:
                return
        waited = now - since
        text = f"{fn.name} {what}" + (f" (for {waited:.0f}s)" if waited >= 1 else "")
        due = now + WAIT_REPORT_AFTER_S[min(n, len(WAIT_REPORT_AFTER_S) - 1)]
        self._unplaceable_logged[fn.function_id] = (key, since, due, n + 1)
        log.info("%s", text)
        self._tell(fn.app_id, text, "-")

    def container_hello(self, hello: m.ContainerHello, peer: Peer) -> Container | None:
        s = self.registry.get(hello.container_id)
        if s is None or hello.token != s.token or s.state == ContainerState.GONE:
            return None
        s.peer = peer
        return s

    def container_ready(self, s: Container) -> None:
        if s.state != ContainerState.STARTING:
            return
        s.state = ContainerState.READY
        s.idle_since = time.monotonic()
        self._backoff.pop(s.function_id, None)
        metrics.cold_start(s.function_id, time.monotonic() - s.started_at, s.container_id)
        self.store.set_container_state(s.container_id, "ready")
        if self.sandbox_watch is not None:  # --- sandboxes
            self.sandbox_watch.ready(s)
        self._tell(
            s.app_id, f"container ready in {time.monotonic() - s.started_at:.2f}s", s.container_id
        )
        self.calls.on_ready(s.function_id)

    def container_init_failed(self, s: Container, msg: m.ContainerInitFailed) -> None:
        self._init_failed(s, msg.error, msg.traceback, msg.exc, msg.error_type)
        self.kill(s.container_id, "its start-up code raised")

    def _init_failed(
        self,
        s: Container,
        error: str,
        tb: str | None,
        exc: bytes | None,
        error_type: str | None = None,
    ) -> None:
        """``error``: the failure's message (with no ``error_type``, "Type: message")."""
        said = f"{error_type}: {error}" if error_type else error
        log.warning("container %s failed to start: %s", s.container_id, said)
        self._tell(s.app_id, f"container failed to start: {said}", s.container_id)
        _, delay = self._backoff.get(s.function_id, (0.0, INIT_FAILURE_BACKOFF_S[0]))
        self._backoff[s.function_id] = (
            time.monotonic() + delay,
            min(delay * 2, INIT_FAILURE_BACKOFF_S[1]),
        )
        self.calls.fail_queued(
            s.function_id, error, exc, tb, error_type=error_type, init_failure=True
        )

    def _exited(self, s: Container, description: str, oom: bool) -> None:
        """The worker reports the container's exit. Its own channel is another connection:
        while that is open, frames it sent before it exited (its last outputs) may still
        be on their way, so it ends when its channel closes (every frame read), or after
        ``EXIT_REPORT_GRACE_S``."""
        if s.state == ContainerState.GONE:
            return
        if s.peer is None:  # its channel is closed (or never opened): nothing more comes
            self._gone(s, description, oom=oom)
            return
        s.exit_report = (description, oom)
        if s.lost_handle is None:
            loop = asyncio.get_running_loop()
            s.lost_handle = loop.call_later(EXIT_REPORT_GRACE_S, self._gone, s, description, oom)

    def channel_lost(self, s: Container) -> None:
        """The container's channel closed: wait briefly for the worker's exit report,
        or end it now if that came first."""
        if s.state == ContainerState.GONE:
            return
        s.peer = None
        if s.exit_report is not None:
            description, oom = s.exit_report
            self._gone(s, description, oom=oom)
            return
        loop = asyncio.get_running_loop()
        s.lost_handle = loop.call_later(
            EXIT_REPORT_GRACE_S, self._gone, s, "closed its channel unexpectedly", False
        )

    def stop(self, container_id: str, grace_s: float = 10.0) -> None:
        """Graceful scale-down: the container finishes its current input and exits."""
        s = self.registry.get(container_id)
        if s is None or s.state in (*LEAVING, ContainerState.GONE):
            return
        s.state = ContainerState.STOPPING
        self.store.set_container_state(container_id, "stopping")
        if s.peer is not None:
            s.peer.send(m.StopContainer(grace_s))
        node = self.nodes.get(s.node_id)
        if node is not None and node.peer is not None:
            # the worker enforces the grace period in case the container ignores the request
            node.peer.send(m.ContainerKill(container_id, grace_s=grace_s + 5, reason="scale-down"))

    def kill(self, container_id: str, reason: str) -> None:
        s = self.registry.get(container_id)
        if s is None or s.state == ContainerState.GONE:
            return
        s.state = ContainerState.KILLING
        node = self.nodes.get(s.node_id)
        if node is not None and node.peer is not None:
            node.peer.send(m.ContainerKill(container_id, 0.0, reason))
        else:
            self._gone(s, f"killed ({reason}) while its node was unreachable", oom=False)

    def _gone(
        self,
        s: Container,
        description: str,
        oom: bool,
        node_lost: bool = False,
        blamed: int = 0,
    ) -> None:
        """The container has ended. ``node_lost``: it ended with its node's worker agent,
        through no fault of its inputs: none counts a failed attempt (but the first
        ``blamed``, lost with their node too often), none backs off."""
        if s.state == ContainerState.GONE:
            return
        if s.lost_handle is not None:
            s.lost_handle.cancel()
        prior = s.state
        s.state = ContainerState.GONE
        status: Status = "died"
        what = f"was {description}" if description.startswith("killed") else description
        kind, error = "ContainerDiedError", f"the container running this input {what}"
        if oom:
            kind, error = (
                "OutOfMemoryError",
                f"the container running this input {what}; give the function more memory "
                "(memory=...) or make it use less",
            )
        if node_lost:
            self.calls.release_leases(s, blamed, status, error, error_type=kind, known=True)
        else:
            running = 1 if prior != ContainerState.KILLING else 0
            self.calls.release_leases(s, running, status, error, error_type=kind, known=False)
        fn = self.calls.functions.get(s.function_id)
        self.registry.remove(s)
        if self.meter is not None:  # --- broker: metering
            self.meter.ended(s.container_id)
        node = self.nodes.get(s.node_id)
        if node is not None:
            release_resources(node.view, s.request, s.placement)
            self.placement_index.touched(node.view.node_id)  # --- cluster
        if s.peer is not None:
            s.peer.close()
        self.store.set_container_state(s.container_id, "stopped", description)
        if self.sandbox_watch is not None:  # --- sandboxes
            self.sandbox_watch.gone(s, description, oom)
        if prior not in LEAVING:
            self._tell(s.app_id, f"container {description}", s.container_id)
        if prior == ContainerState.STARTING and fn is not None and fn.queue and not node_lost:
            # died before it was ready (a crash at import): back off before the next try
            self._init_failed(
                s, f"the container {what} while starting", None, None, "ContainerDiedError"
            )
        self._on_change()

    def check_startups(self, now: float) -> None:
        self.check_heartbeats(now)
        for s in self.registry.values():
            if s.state == ContainerState.STARTING and now - s.started_at > STARTUP_TIMEOUT_S:
                self.kill(s.container_id, f"not ready after {STARTUP_TIMEOUT_S:g}s")

    def stop_app(self, app_id: str, keep: Collection[str] = ()) -> None:
        """Kill the app's containers, but those in ``keep``."""
        for s in self.registry.of_app(app_id):
            if s.container_id not in keep:
                self.kill(s.container_id, "the app was stopped")
