"""The ``ray`` provider: the nodes of an existing Ray cluster, one strato worker agent each.

``strato server start --provider ray`` (or ``STRATO_PROVIDER=ray``) connects the control
plane to the Ray cluster at ``RAY_ADDRESS`` (Ray's own convention; unset: ``auto``, the
cluster this machine belongs to) as a Ray driver, and for each live Ray node creates a
``NodeAgent`` actor (``ray_agent.py``) pinned to that node
(``NodeAffinitySchedulingStrategy(node_id, soft=False)``) that reserves what strato will
use there: ``STRATO_RAY_SHARE`` of the node's CPUs, memory and (whole) GPUs, and its
accelerator type. The actor runs the node's worker agent, which joins the control plane's
agent listener over TCP with a join token this provider made, and declares the inventory
read from Ray (CPUs, memory, GPUs by accelerator type, and the node's Ray labels).

Every ``POLL_S`` the provider reads ``ray.nodes()``: a new node gets its actor; a node Ray
reports dead is lost in strato at once (the fleet's lost-node path: its containers count as
dead and the inputs they held go back to the queue), without waiting for the heartbeat
timeout; an actor that died on a live node is created again after a backoff. Containers
still run under strato's runtimes on those nodes: Ray owns the machines, strato schedules
its containers on what it reserved.

Work that no node can place now (the broker's demand: queued inputs, warm pools, the
autoscaler's wanted containers) is reported to Ray's autoscaler at each poll where it
changed, with ``ray.autoscaler.sdk.request_resources(bundles=...)`` (``demand_bundles``),
and cleared (an empty request) when it goes away and when the provider closes, so that an
autoscaling Ray cluster grows for strato's containers and may shrink again. Work that fits
no Ray node at all waits for such a node up to ``STRATO_RAY_AUTOSCALER_WAIT_S``
(``ray_wait.py``; 0, the default: it fails at once). The demand, by shape, and its
bundles are ``ray_demand.py``'s.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from strato import settings
from strato.exceptions import InvalidError

from .base import Capabilities, Instance, InstanceState, Offer, ProvisionError
from .ray_agent import AgentSpec
from .ray_demand import ACCELERATOR, MIB, Pending, demand_bundles, pending_of, shape_of_request

if TYPE_CHECKING:
    from strato.server.control import ControlPlane
    from strato.server.scheduler import ContainerRequest

    from .ray_wait import AutoscalerWait

log = logging.getLogger("strato.providers.ray")

POLL_S = 1.0
PROBE_TIMEOUT_S = 5.0
PENDING_WARN_S = 30.0  # an actor not started by then: say what it waits for
JOIN_TOKEN_NAME = "ray provider"  # (server/cluster/join_tokens.py: RAY_PROVIDER_TOKEN)
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# worker settings that are each node's own (from Ray), or the control plane's alone
NOT_FORWARDED = frozenset(
    {
        "STRATO_HOME",
        "STRATO_NODE_NAME",
        "STRATO_NODE_CPU",
        "STRATO_NODE_MEMORY_MB",
        "STRATO_NODE_GPUS",
        "STRATO_NODE_LABELS",
        "STRATO_TOKEN",
        "STRATO_JOIN_TOKEN",
        "STRATO_AGENT_PORT",
        "STRATO_SERVER_URL",
        "STRATO_IMAGE_CACHE",  # a path on this machine; each node keeps its own
    }
)


@dataclass(frozen=True)
class RayNodeShape:
    """What strato reserves on one Ray node, read from ``ray.nodes()``."""

    ray_node_id: str
    ip: str
    cpu: float
    memory_bytes: int
    gpu_count: int
    accelerator: str | None  # Ray's name (``accelerator_type:<name>``), as given
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return node_name(self.ray_node_id)

    @property
    def memory_mb(self) -> int:
        return self.memory_bytes // MIB

    def actor_options(self) -> dict[str, Any]:
        """The actor's Ray options, but the scheduling strategy (Ray's types)."""
        opts: dict[str, Any] = {
            "num_cpus": self.cpu,
            "num_gpus": self.gpu_count,
            "memory": self.memory_bytes,
            "max_restarts": 0,  # the provider makes a new one (and sees the node's death)
            "max_concurrency": 4,  # info() answers while stop() waits
        }
        if self.accelerator and self.gpu_count:
            opts["accelerator_type"] = self.accelerator
        return opts


def node_name(ray_node_id: str) -> str:
    return f"ray-{ray_node_id[:12]}"


def shape_of(node: Mapping[str, Any], share: float, required: str = "") -> RayNodeShape | None:
    """What strato takes of a live Ray node (``share`` of it), or None: it is dead, lacks
    the ``required`` resource, or would offer no CPU."""
    if not node.get("Alive") or not node.get("NodeID"):
        return None
    res: Mapping[str, float] = node.get("Resources") or {}
    if required and res.get(required, 0) <= 0:
        return None
    cpu = math.floor(float(res.get("CPU", 0)) * share * 1000) / 1000
    if cpu <= 0:
        return None
    accelerator = next((k[len(ACCELERATOR) :] for k in res if k.startswith(ACCELERATOR)), None)
    labels = {str(k): str(v) for k, v in (node.get("Labels") or {}).items()}
    labels.setdefault("ray.io/node-id", str(node["NodeID"]))
    if node.get("NodeManagerAddress"):
        labels["ray.io/node-ip"] = str(node["NodeManagerAddress"])
    return RayNodeShape(
        ray_node_id=str(node["NodeID"]),
        ip=str(node.get("NodeManagerAddress") or ""),
        cpu=cpu,
        memory_bytes=int(float(res.get("memory", 0)) * share),
        gpu_count=int(math.floor(float(res.get("GPU", 0)) * share)),
        accelerator=accelerator,
        labels=labels,
    )


def gpu_type(accelerator: str | None) -> str | None:
    """strato's name of Ray's accelerator type (``H100``, ``A100``...), kept when unknown."""
    if not accelerator:
        return None
    from strato.protocol.gpu import canonical_gpu_name

    return canonical_gpu_name(accelerator) or accelerator


def forwarded_env(env: Mapping[str, str]) -> dict[str, str]:
    """The worker settings set for the control plane that its Ray nodes' agents get too
    (``STRATO_RUNTIME``, ``STRATO_LOG_LEVEL``, ``STRATO_WORKER_HEARTBEAT_S``...)."""
    out = {}
    for name, s in settings.REGISTRY.items():
        if settings.WORKER not in s.readers or s.internal or name in NOT_FORWARDED:
            continue
        if name in env:
            out[name] = env[name]
    return out


def advertised_host(host: str, driver_ip: str) -> str:
    """The address agents on Ray nodes dial: the control plane's host, or this machine's
    address in the Ray cluster where it listens on every interface."""
    return driver_ip if host in WILDCARD_HOSTS else host


@dataclass
class _Agent:
    shape: RayNodeShape
    actor: Any
    ping: Any = None  # an outstanding info() call
    created_at: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    warned: bool = False  # that it waits for its resources


class RayProvider:
    """The Ray cluster's nodes as strato nodes (see the module's doc)."""

    name = "ray"
    # behind the Provider interface (base.py): its nodes are there already; Ray's
    # autoscaler grows the cluster from the demand reported to it, not offer by offer
    capabilities = Capabilities(provisions=False, spot=False)

    def __init__(
        self,
        *,
        channel: str,
        server_url: str,
        join_token: str,
        on_node_lost: Callable[[str, str], None],
        share: float = 1.0,
        required_resource: str = "",
        agent_home: str = "",
        env: Mapping[str, str] | None = None,
        poll_s: float = POLL_S,
        demand: Callable[[], list[Pending]] = list,
        wait: AutoscalerWait | None = None,
    ) -> None:
        self.channel = channel
        self.server_url = server_url
        self.join_token = join_token
        self.on_node_lost = on_node_lost
        self.share = share
        self.required_resource = required_resource
        self.agent_home = agent_home
        self.env = dict(env or {})
        self.poll_s = poll_s
        self.demand = demand  # (on the control plane's loop) what no node can place
        self.wait = wait  # work no Ray node fits waits for Ray's autoscaler (ray_wait.py)
        self.shapes: list[RayNodeShape] = []  # strato's share of each node with an agent
        self.requested: list[dict[str, float]] = []  # what Ray's autoscaler was asked for
        self.totals: dict[str, Mapping[str, float]] = {}  # Ray node id -> its resources
        self.agents: dict[str, _Agent] = {}  # Ray node id -> its actor
        self.dead: set[str] = set()  # Ray node ids seen dead
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._task: asyncio.Task | None = None
        self._closed = False
        self.released: set[str] = set()  # Ray node ids given back (``terminate``): no agent

    # ------------------------------------------------------------------ the loop

    def follow(self) -> asyncio.Task:
        """Follow the cluster's nodes until ``close``; call from the control plane's loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="ray-provider")
        return self._task

    async def _follow(self) -> None:
        while not self._closed:
            try:
                await asyncio.to_thread(self.reconcile)
                held = [self.totals[nid] for nid in self.agents if nid in self.totals]
                pending = self.demand()
                if self.wait is not None:
                    self.wait.keep(replace(p, count=1) for p in pending)
                    if self.wait.since:  # Ray's autoscaler may find them infeasible
                        from .ray_wait import infeasible_bundles

                        self.wait.saw_infeasible(await asyncio.to_thread(infeasible_bundles))
                bundles = demand_bundles(pending, held, self.share, self.required_resource)
                if bundles != self.requested:
                    await asyncio.to_thread(self.request, bundles, len(held))
            except Exception:  # noqa: BLE001 - Ray hiccups: try again at the next poll
                log.exception("reading the Ray cluster failed; trying again")
            await asyncio.sleep(self.poll_s)

    def request(self, bundles: list[dict[str, float]], held: int = 0) -> None:
        """Ask Ray's autoscaler for ``bundles`` (``[]``: clear strato's request)."""
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
        self.requested = bundles
        if bundles:
            log.info(
                "asked Ray's autoscaler for %d containers no node can place (with the "
                "%d Ray nodes strato holds)",
                len(bundles) - held,
                held,
            )
        else:
            log.info("cleared strato's request to Ray's autoscaler: no work waits")

    def reconcile(self) -> None:
        """One look at ``ray.nodes()``: start, check and forget agents to match it."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = ray.nodes()
        alive = {n["NodeID"]: n for n in nodes if n.get("Alive")}
        self.totals = {nid: n.get("Resources") or {} for nid, n in alive.items()}
        for n in nodes:
            nid = n.get("NodeID")
            if nid and not n.get("Alive") and nid not in self.dead:
                self.dead.add(nid)
                self._node_left(nid, "its Ray node left the cluster")
        for nid in list(self.agents):
            if nid not in alive and self._closed is False:
                self._node_left(nid, "its Ray node left the cluster")
        self._check_actors(alive)
        now = time.monotonic()
        for nid, node in alive.items():
            if nid in self.agents or self._closed or self._retry_at.get(nid, 0) > now:
                continue
            if nid in self.released:
                continue
            shape = shape_of(node, self.share, self.required_resource)
            if shape is None:
                continue
            spec = AgentSpec(
                name=shape.name,
                ray_node_id=nid,
                channel=self.channel,
                server_url=self.server_url,
                join_token=self.join_token,
                cpu=shape.cpu,
                memory_mb=shape.memory_mb,
                gpu_count=shape.gpu_count,
                gpu_type=gpu_type(shape.accelerator),
                labels=shape.labels,
                env=self.env,
                agent_home=self.agent_home,
            )
            from .ray_agent import NodeAgent

            actor: Any = (  # an ActorHandle (Ray's types do not see its methods)
                ray.remote(NodeAgent)
                .options(
                    **shape.actor_options(),
                    scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False),
                )
                .remote(spec.to_json())
            )
            agent = _Agent(shape, actor, created_at=now)
            agent.ping = actor.info.remote()
            self.agents[nid] = agent
            log.info(
                "Ray node %s (%s): starting strato node %s (%g CPU, %d MiB, %d GPU %s)",
                nid[:12],
                shape.ip,
                shape.name,
                shape.cpu,
                shape.memory_mb,
                shape.gpu_count,
                shape.accelerator or "",
            )
        self.shapes = [a.shape for a in self.agents.values()]

    def _check_actors(self, alive: Mapping[str, Any]) -> None:
        """Read the answers of the actors' last ``info()``; ask again; a dead actor on a
        live node is made again after a backoff."""
        import ray

        now = time.monotonic()
        for nid, a in self.agents.items():
            if not a.info and not a.warned and now - a.created_at > PENDING_WARN_S:
                a.warned = True
                log.warning(
                    "strato's actor on Ray node %s has not started after %.0fs: Ray has not "
                    "%g CPU, %d MiB and %d GPU free there (other Ray work holds them?); "
                    "lower STRATO_RAY_SHARE or free them",
                    nid[:12],
                    PENDING_WARN_S,
                    a.shape.cpu,
                    a.shape.memory_mb,
                    a.shape.gpu_count,
                )
        pending = {a.ping: nid for nid, a in self.agents.items() if a.ping is not None}
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in ready:
            nid = pending[ref]
            agent = self.agents.get(nid)
            if agent is None:
                continue
            try:
                agent.info = ray.get(ref)
                agent.ping = agent.actor.info.remote()
                self._failures.pop(nid, None)
            except Exception as e:  # noqa: BLE001 - RayActorError and its kin: the actor died
                del self.agents[nid]
                if nid not in alive:
                    continue
                n = self._failures[nid] = self._failures.get(nid, 0) + 1
                delay = min(0.5 * 2 ** (n - 1), 30.0)
                self._retry_at[nid] = time.monotonic() + delay
                log.warning(
                    "the strato actor of Ray node %s died (%s); a new one in %.1fs",
                    nid[:12],
                    str(e).splitlines()[0] if str(e) else type(e).__name__,
                    delay,
                )
                self.on_node_lost(agent.shape.name, "its Ray actor died")

    def _node_left(self, nid: str, why: str) -> None:
        agent = self.agents.pop(nid, None)
        self._retry_at.pop(nid, None)
        self._failures.pop(nid, None)
        name = agent.shape.name if agent is not None else node_name(nid)
        log.warning("Ray node %s is gone: strato node %s is lost", nid[:12], name)
        self.on_node_lost(name, why)

    # ------------------------------------------------------------------ the end

    def close(self, grace_s: float = 20.0) -> None:
        """Stop every node's agent (each stops its containers), then leave the cluster."""
        import ray

        self._closed = True
        if self._task is not None:
            self._task.cancel()
        if self.requested:  # strato's demand leaves with it
            try:
                self.request([])
            except Exception:  # noqa: BLE001 - Ray gone already
                log.exception("clearing strato's request to Ray's autoscaler")
        agents = list(self.agents.values())
        self.agents.clear()
        refs = []
        for a in agents:
            try:
                refs.append(a.actor.stop.remote())
            except Exception:  # noqa: BLE001 - gone already
                pass
        if refs:
            try:
                ray.wait(refs, num_returns=len(refs), timeout=grace_s)
            except Exception:  # noqa: BLE001
                log.exception("stopping the Ray nodes' agents")
        for a in agents:
            try:
                ray.kill(a.actor)
            except Exception:  # noqa: BLE001
                pass
        ray.shutdown()

    # ------------------------------------------------------------------ the Provider interface

    def offers(self) -> list[Offer]:
        """Its nodes whose agent is up, each as what strato reserves there (price 0: the
        Ray cluster's own)."""
        return [offer_of(a.shape) for a in self.agents.values() if a.info]

    def provision(self, offer: Offer, *, spot: bool) -> Instance:
        raise ProvisionError(
            "the ray provider buys nothing: Ray's autoscaler adds nodes for the work no node "
            "can place (it is asked at each poll), or add one with `ray start --address ...`"
        )

    def terminate(self, instance_id: str, reason: str = "released") -> None:
        """Stop strato's agent on the Ray node ``instance_id`` and start none there again
        (the node stays Ray's); its strato node is lost (its inputs go back to the queue)."""
        self.released.add(instance_id)
        agent = self.agents.pop(instance_id, None)
        if agent is None:
            return
        self.shapes = [a.shape for a in self.agents.values()]
        log.info("Ray node %s given back (%s): its strato agent stops", instance_id[:12], reason)
        try:
            agent.actor.stop.remote()
        except Exception:  # noqa: BLE001 - gone already
            pass
        self.on_node_lost(agent.shape.name, reason)

    def instances(self) -> list[Instance]:
        """Its nodes: running once their agent answered, provisioning before."""
        out = []
        for nid, a in self.agents.items():
            state = InstanceState.RUNNING if a.info else InstanceState.PROVISIONING
            inst = Instance(nid, offer_of(a.shape), False, state, node_name=a.shape.name)
            out.append(inst)
        return out


def offer_of(shape: RayNodeShape) -> Offer:
    return Offer(
        provider="ray",
        instance_type=shape.name,
        gpu=gpu_type(shape.accelerator),
        gpu_count=shape.gpu_count,
        cpu=shape.cpu,
        memory_gib=shape.memory_mb / 1024,
        price=0.0,
        spot_price=None,
        region=shape.labels.get("region", ""),
        zone=shape.ray_node_id[:12],
    )


def connect(address: str | None) -> str:
    """Join the Ray cluster at ``address`` (``RAY_ADDRESS``; None: ``auto``) as a driver;
    returns this machine's address in it."""
    try:
        import ray
    except ImportError as e:
        raise InvalidError(
            "the ray provider needs Ray in the control plane's environment: "
            "pip install 'strato[ray]' (and strato on every Ray node)"
        ) from e

    if address and address != "auto" and "://" not in address:
        reachable(address)
    try:
        ray.init(
            address=address or "auto",
            namespace="strato",
            log_to_driver=False,
            logging_level=logging.WARNING,
            ignore_reinit_error=True,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise InvalidError(
            f"no Ray cluster answers at {address or 'auto'} ({e}): start one (`ray start "
            "--head`) or set RAY_ADDRESS to its address (HOST:PORT of its head node)"
        ) from e
    return ray.util.get_node_ip_address()


def reachable(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail at once, naming ``RAY_ADDRESS``, where nothing listens at ``HOST:PORT``
    (``ray.init`` would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidError(f"RAY_ADDRESS={address!r} is not valid: expected HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout_s).close()
    except OSError as e:
        raise InvalidError(
            f"no Ray cluster answers at RAY_ADDRESS={address} ({e}): start one (`ray start "
            "--head`) or set RAY_ADDRESS to its head node's HOST:PORT"
        ) from e


async def start(cp: ControlPlane, address: str | None, env: Mapping[str, str]) -> RayProvider:
    """Connect the control plane ``cp`` to Ray and start following the cluster's nodes:
    opens the agent listener if none is configured, and makes the provider's join token
    (the one of an earlier run is revoked)."""
    from strato.server.cluster.agents import AgentListener, server_ssl
    from strato.server.cluster.join_tokens import JoinTokens

    driver_ip = await asyncio.to_thread(connect, address)
    if cp.agents is None:  # agents dial the control plane's host, on a port of its own
        tls = server_ssl(settings.TLS_CERT.get(env), settings.TLS_KEY.get(env))
        cp.agents = AgentListener(cp, cp.config.host, 0, tls)
        await cp.agents.start()
    tokens = JoinTokens(cp.config.home)
    for t in tokens.list():
        if t.name == JOIN_TOKEN_NAME:
            tokens.revoke(t.id)
    _, join_token = tokens.create(JOIN_TOKEN_NAME)
    host = advertised_host(cp.config.host, driver_ip)
    port = cp.agents.port
    http_port = int(cp.http_url.rsplit(":", 1)[1]) if ":" in cp.http_url else cp.config.port
    scheme = "https" if cp.http_url.startswith("https:") else "http"  # (STRATO_TLS_CERT)
    loop = asyncio.get_running_loop()
    from .ray_wait import AutoscalerWait

    share = settings.RAY_SHARE.get(env)
    required = settings.RAY_NODE_RESOURCE.get(env)
    wait = AutoscalerWait(settings.RAY_AUTOSCALER_WAIT_S.get(env), share, required)

    def lost(name: str, why: str) -> None:
        loop.call_soon_threadsafe(_lose_node, cp, name, why)

    provider = RayProvider(
        channel=f"tcp:{host}:{port}",
        server_url=f"{scheme}://{host}:{http_port}",
        join_token=join_token,
        on_node_lost=lost,
        share=share,
        required_resource=required,
        agent_home=str(settings.RAY_AGENT_HOME.get(env) or ""),
        env=forwarded_env(env),
        demand=lambda: pending_of(cp, wait),
        wait=wait,
    )
    bought = cp.fleet.supply  # the broker's: a node bought from a provider

    def supply(request: ContainerRequest, nonpreemptible: bool) -> bool:
        if bought is not None and bought(request, nonpreemptible):
            return True
        if request.provider not in (None, "ray"):
            return False
        joined = {  # a Ray node's agent answers its actor before it joins the fleet
            n.info.name
            for n in cp.fleet.nodes.values()
            if n.peer is not None and n.info.provider == "ray"
        }
        nodes = [sh for sh in provider.shapes if sh.name in joined]
        # none joined yet: the fleet says it waits for a worker agent
        return bool(nodes) and wait.waits(shape_of_request(request), nodes)

    cp.fleet.supply = supply
    cp.fleet.supply_note = lambda request: wait.why_not(shape_of_request(request))
    log.info(
        "Ray provider: agents of the Ray cluster's nodes join at %s:%d (%s)", host, port, scheme
    )
    provider.follow()
    return provider


def _lose_node(cp: ControlPlane, name: str, why: str) -> None:
    """On the control plane's loop: the strato node ``name`` is lost (if it is connected)."""
    for node_id, node in list(cp.fleet.nodes.items()):
        if node.info.provider == "ray" and node.info.name == name and node.peer is not None:
            cp.fleet.worker_gone(node_id, node.peer, why)
