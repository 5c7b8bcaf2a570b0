"""The broker at run time: buys nodes from providers for work no node can take.

On each scaling tick it reads the providers file again if it changed, then:

- demand: each function with queued inputs, a warm pool (``min_containers``) short of
  containers, or containers the autoscaler wanted this tick and no node took
  (``buffer_containers``, a web endpoint's requests: ``Scaler.unmet``) that no live node
  can place (its GPU type, CPU, memory, ``region=``, ``cloud=``) wants containers for
  them (up to ``max_containers``), less those the nodes it is already provisioning will
  hold;
- it chooses offers (``decide.choose``) within ``max_nodes`` (the broker's and each
  provider's) and the budget per hour, and provisions them; a provisioning that fails
  blocks its (provider, region, GPU type) for ``cooldown_s`` and the next choice is
  provisioned at once (no wait but the scheduler's);
- a node the broker bought that has held no container for ``keep_alive_s`` is given back;
- a node it bought that costs more per container than the best option now by over
  ``rebalance_margin`` (bought in a shortage, or as a replacement while the cheapest
  places were out of capacity: ``decide.cheaper_option``) is cordoned: its containers
  finish there, new ones go to a cheaper node, and it is given back once idle;
- a preempted node: its agent is gone, so the fleet counts its node lost and the inputs
  its containers held go back to the front of the queue (``Fleet.worker_gone``); the next
  tick buys the capacity again;
- work that waits (limits, cool-downs) is told why in the app's logs.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from strato.protocol import messages as m
from strato.providers.base import FINAL, Instance, InstanceState, Offer, Provider, StateChange
from strato.providers.catalog import load_offers
from strato.providers.config import BrokerConfig, ConfigWatch
from strato.providers.hosts import JOINED, HostNode, HostsProvider
from strato.providers.sim import SimProvider
from strato.providers.traces import PreemptionModel, load_traces

from ..calls.state import AppState
from ..scheduler import ContainerRequest, place
from .decide import (
    BlockKey,
    Demand,
    OfferIndex,
    Option,
    block_key,
    cheaper_option,
    choose,
)

if TYPE_CHECKING:
    from ..calls.manager import CallManager, FunctionQueue
    from ..fleet import Fleet

log = logging.getLogger("strato.broker")

WAIT_REPORT_EVERY_S = 30.0
MAX_FAILOVERS_PER_TICK = 16
DRAIN_GRACE_S = 300.0  # a drained node's containers: time to finish their running inputs
# an ended instance's node name is watched this long for an agent that registers late (one
# that was still starting when its instance ended): a node of that name is dropped from the
# fleet whenever it has no agent; one with an agent is watched until it has none
ENDED_NODE_WATCH_S = 300.0


@dataclass
class Held:
    """An instance the broker bought, and what it was bought for."""

    instance: Instance
    provider: str
    earmark: dict[str, int] = field(default_factory=dict)  # function id -> containers
    idle_since: float | None = None
    bought_for: str | None = None
    option: Option | None = None  # as chosen: its expected cost per hour


class Broker:
    def __init__(
        self,
        watch: ConfigWatch,
        fleet: Fleet,
        calls: CallManager,
        *,
        home: Path,
        channel: str,
        token: str,
        tell: Callable[[str, str], None],
        offers: list[Offer] | None = None,
        unmet: Mapping[str, int] | None = None,
    ) -> None:
        self.watch = watch
        self.fleet = fleet
        self.calls = calls
        self.home, self.channel, self.token = home, channel, token
        self._tell = tell
        self._catalog = offers
        self.unmet: Mapping[str, int] = unmet if unmet is not None else {}
        self.config = BrokerConfig()
        self.providers: dict[str, Provider] = {}
        self.index = OfferIndex([])
        self.held: dict[str, Held] = {}  # instance id -> held
        self.blocked: dict[BlockKey, float] = {}  # -> until (monotonic)
        self.events: list[StateChange] = []
        self._told: dict[str, tuple[str, float]] = {}  # function id -> (why, when)
        self.failovers = 0
        self.preemptions = 0
        self.moves = 0  # nodes cordoned for a cheaper option
        # providers that sell nothing, their nodes already there: the joined machines, and
        # the Ray cluster's nodes where the control plane runs on Ray (``attach``)
        self.fixed: dict[str, Provider] = {
            "hosts": HostsProvider(self._joined, self._drain, self._on_fixed_change)
        }
        self.history: collections.deque[Held] = collections.deque(maxlen=200)
        # node names of ended instances -> until when to watch for them (monotonic)
        self._ended_nodes: dict[str, float] = {}

    # ------------------------------------------------------------------ configuration

    def reload(self) -> None:
        if not self.watch.poll():
            return
        cfg = self.watch.config or BrokerConfig()
        self.config = cfg
        catalog = self._catalog if self._catalog is not None else load_offers()
        for name in cfg.enabled:
            if name not in self.providers:
                pc = cfg.providers[name]
                self.providers[name] = SimProvider(
                    name,
                    catalog,
                    home=self.home,
                    channel=self.channel,
                    token=self.token,
                    on_change=self._on_change,
                    faults=lambda: self.config.faults,
                    provisioning_delay_s=cfg.provisioning_delay_s,
                    regions=pc.regions,
                )
        for name in list(self.providers):  # disabled: nothing new; what it holds stays
            if name not in cfg.enabled and not self.providers[name].instances():
                del self.providers[name]
        for p in self.providers.values():
            if isinstance(p, SimProvider):
                p.delay_s = cfg.provisioning_delay_s
        offers = [o for p in self.providers.values() for o in p.offers()]
        self.index = OfferIndex(
            offers,
            PreemptionModel(load_traces()),
            loss_h=cfg.preemption_loss_h,
            spot=cfg.spot,
        )
        log.info(
            "broker: providers %s, %d options, max_nodes %d, $%.2f/h",
            ", ".join(sorted(self.providers)) or "none",
            len(self.index),
            cfg.max_nodes,
            cfg.budget_per_hour,
        )

    def _reload_safely(self) -> None:
        try:
            self.reload()
        except Exception as e:  # noqa: BLE001 - a bad file: keep the last good one
            log.error("broker: the providers file is not valid (%s); keeping the last one", e)

    # ------------------------------------------------------------------ nodes already there

    def attach(self, provider: Provider) -> None:
        """A provider whose nodes are already there (``ray``): listed, never bought from."""
        self.fixed[provider.name] = provider

    def _joined(self) -> list[HostNode]:
        return [
            HostNode(nid, n.info, not self.fleet.registry.on_node(nid))
            for nid, n in self.fleet.nodes.items()
            if n.peer is not None and n.info.provider == JOINED
        ]

    def _drain(self, node_id: str, reason: str) -> None:
        """No new containers on the node; its containers stop once their inputs finish."""
        log.info("broker: draining node %s (%s)", node_id, reason)
        self.fleet.cordoned.add(node_id)
        for s in self.fleet.registry.on_node(node_id):
            self.fleet.stop(s.container_id, DRAIN_GRACE_S)

    def _on_fixed_change(self, ev: StateChange) -> None:
        log.info(
            "broker: %s node %s %s", ev.instance.offer.provider, ev.instance.node_name, ev.state
        )

    # ------------------------------------------------------------------ what the fleet asks

    def can_supply(self, request: ContainerRequest, spec_nonpreemptible: bool = False) -> bool:
        """True when some enabled offer could ever hold a container of ``request``."""
        self._reload_safely()
        if not self.providers:
            return False
        d = Demand("?", request, 1, spec_nonpreemptible)
        return not choose([d], self.index).infeasible

    def why_waiting(self, function_id: str) -> str | None:
        told = self._told.get(function_id)
        return told[0] if told else None

    # ------------------------------------------------------------------ the tick

    def tick(self, now: float) -> None:
        self._reload_safely()
        self._events(now)
        self._drop_ended_nodes(now)
        if not self.providers:
            return
        self.blocked = {k: u for k, u in self.blocked.items() if u > now}
        self._move_dear()
        for _ in range(MAX_FAILOVERS_PER_TICK):
            if not self._buy(now):
                break
        self._release_idle(now)

    def _events(self, now: float) -> None:
        events, self.events = self.events, []
        for ev in events:
            h = self.held.get(ev.instance.instance_id)
            if h is None:
                continue
            if ev.state == InstanceState.FAILED:
                key = block_key(ev.instance.offer)
                self.blocked[key] = now + self.config.cooldown_s
                self.failovers += 1
                log.warning(
                    "broker: %s failed (%s); %s blocked for %gs, trying the next offer",
                    ev.instance.offer.offer_id,
                    ev.reason,
                    "/".join(key),
                    self.config.cooldown_s,
                )
                for fn_id in h.earmark:
                    self._say(
                        fn_id,
                        f"provisioning {ev.instance.offer.offer_id} failed "
                        f"({ev.reason}); trying the next offer",
                        now,
                        force=True,
                    )
                self.history.append(self.held.pop(ev.instance.instance_id))
            elif ev.state in (InstanceState.PREEMPTED, InstanceState.TERMINATED):
                if ev.state == InstanceState.PREEMPTED:
                    self.preemptions += 1
                self._forget_node(h, now)
                self.history.append(self.held.pop(ev.instance.instance_id))

    def _on_change(self, ev: StateChange) -> None:
        """From a provider (on the loop): handled at the next tick; a preemption is told
        now, while the fleet still knows the node's containers."""
        self.events.append(ev)
        h = self.held.get(ev.instance.instance_id)
        if h is not None and ev.state == InstanceState.PREEMPTED:
            self._tell_preempted(h)

    def _forget_node(self, h: Held, now: float) -> None:
        """A node that will not come back: dropped from the fleet once its agent is gone
        (its agent may still be closing its channel, or, ended while it started, not have
        registered yet: then at a later tick)."""
        self._ended_nodes[h.instance.node_name] = now + ENDED_NODE_WATCH_S
        self._drop_ended_nodes(now)

    def _drop_ended_nodes(self, now: float) -> None:
        if not self._ended_nodes:
            return
        named: dict[str, list[str]] = {}
        for node_id, node in self.fleet.nodes.items():
            if node.info.name in self._ended_nodes:
                named.setdefault(node.info.name, []).append(node_id)
        for name, until in list(self._ended_nodes.items()):
            live = False
            for node_id in named.get(name, []):
                if self.fleet.nodes[node_id].peer is not None:
                    live = True
                    continue
                self.fleet.nodes.pop(node_id)
                self.fleet.preempted.discard(node_id)
                self.fleet.cordoned.discard(node_id)
            if not live and now >= until:
                del self._ended_nodes[name]

    def node_of(self, h: Held) -> str | None:
        for node_id, node in self.fleet.nodes.items():
            if node.info.name == h.instance.node_name:
                return node_id
        return None

    def demands(self, now: float) -> list[Demand]:
        """Containers that no live node can place now, per function (what to buy nodes
        for; the ``ray`` provider asks Ray's autoscaler for them)."""
        views = self.fleet.live_views()
        pending: dict[str, int] = {}
        for h in self.held.values():
            if h.instance.state == InstanceState.PROVISIONING or (
                h.instance.state == InstanceState.RUNNING and self.node_of(h) is None
            ):
                for fn_id, k in h.earmark.items():
                    pending[fn_id] = pending.get(fn_id, 0) + k
        out = []
        for fn in list(self.calls.functions.values()):
            if fn.app_state == AppState.STOPPED or fn.spec.sandbox is not None:
                continue
            unmet = self.unmet.get(fn.function_id, 0)
            if (
                not fn.queue
                and not unmet
                and fn.spec.scaling.min_containers
                <= len(self.fleet.registry.live_of(fn.function_id))
            ):
                continue  # no work waits, its warm pool is whole, the autoscaler has all
            request = self.fleet.request_for(fn.spec)
            mine = [v for v in views if v.node_id not in self.fleet.cordoned]  # as the fleet
            if fn.spec.nonpreemptible:  # spot nodes are not for it
                mine = [v for v in views if not self.fleet.is_spot(v.node_id)]
            if place(request, mine) is not None:
                continue  # a node can take it now: the fleet places it
            want = self._wanted(fn, unmet) - pending.get(fn.function_id, 0)
            if want > 0:
                out.append(Demand(fn.function_id, request, want, _nonpreemptible(fn)))
        return out

    def _wanted(self, fn: FunctionQueue, unmet: int = 0) -> int:
        """Containers to buy nodes for: its queued inputs, its warm pool, and what the
        autoscaler wanted this tick and no node took (``unmet``: ``buffer_containers``, a
        web endpoint's requests)."""
        per = max(1, self.calls.target_inputs(fn))
        want = max(math.ceil(len(fn.queue) / per), unmet)
        cap = fn.spec.scaling.max_containers
        live = len(self.fleet.registry.live_of(fn.function_id))
        want = max(want, fn.spec.scaling.min_containers - live)  # its warm pool
        if cap is not None:
            want = min(want, cap - live)
        return max(0, want)

    def _limits(self) -> tuple[int, float, set[str]]:
        cfg = self.config
        live = [h for h in self.held.values() if h.instance.state not in FINAL]
        nodes_left = cfg.max_nodes - len(live)
        spent = sum(h.instance.price_per_hour for h in live)
        usable = set()
        for name in self.providers:
            pc = cfg.providers.get(name)
            if pc is None or not pc.enabled:
                continue
            mine = sum(1 for h in live if h.provider == name)
            if pc.max_nodes is None or mine < pc.max_nodes:
                usable.add(name)
        return nodes_left, cfg.budget_per_hour - spent, usable

    def _buy(self, now: float) -> bool:
        """One round of choices; True when a provisioning failed at once (try again)."""
        demands = self.demands(now)
        if not demands:
            return False
        nodes_left, budget_left, usable = self._limits()
        decision = choose(
            demands,
            self.index,
            blocked=set(self.blocked),
            nodes_left=nodes_left,
            budget_left=budget_left,
            providers=usable,
        )
        for key, why in decision.waits.items():
            self._say(key, f"waits for a node: {why}", now)
        failed = False
        for c in decision.choices:
            provider = self.providers[c.option.offer.provider]
            try:
                inst = provider.provision(c.option.offer, spot=c.option.spot)
            except Exception as e:  # noqa: BLE001 - a provider's error: fail over
                self.blocked[block_key(c.option.offer)] = now + self.config.cooldown_s
                self.failovers += 1
                log.warning("broker: provisioning %s failed: %s", c.option.label, e)
                failed = True
                break
            self.held[inst.instance_id] = Held(
                inst, provider.name, {c.key: c.containers}, bought_for=c.key, option=c.option
            )
            log.info(
                "broker: provisioning %s for %d container(s) of %s",
                c.option.label,
                c.containers,
                c.key,
            )
            self._say(
                c.key,
                f"provisioning {c.option.label} for {c.containers} container(s)",
                now,
                force=True,
            )
        return failed

    def _move_dear(self) -> None:
        """Cordon the running nodes it bought whose containers (of one function) a cheaper
        option would hold for less per container by over ``rebalance_margin``."""
        _, _, usable = self._limits()
        for h in self.held.values():
            if h.instance.state != InstanceState.RUNNING:
                continue
            node_id = self.node_of(h)
            if node_id is None or node_id in self.fleet.cordoned:
                continue
            residents = self.fleet.registry.on_node(node_id)
            fns = {c.function_id for c in residents}
            fn = self.calls.functions.get(next(iter(fns))) if len(fns) == 1 else None
            held = h.option
            if fn is None or held is None:
                continue
            demand = Demand(
                fn.function_id, self.fleet.request_for(fn.spec), len(residents), _nonpreemptible(fn)
            )
            better = cheaper_option(
                held,
                demand,
                self.index,
                margin=self.config.rebalance_margin,
                blocked=set(self.blocked),
                providers=usable,
            )
            if better is not None:
                self.fleet.cordoned.add(node_id)
                self.moves += 1
                log.info(
                    "broker: cordoning %s (%s): %s holds its %d container(s) for less; "
                    "given back once idle",
                    node_id,
                    held.label,
                    better.label,
                    len(residents),
                )
                self._say(
                    fn.function_id,
                    f"{held.label} costs more than {better.label}: new containers go to a "
                    "cheaper node",
                    time.monotonic(),
                    force=True,
                )

    def _release_idle(self, now: float) -> None:
        for iid, h in list(self.held.items()):
            if h.instance.state != InstanceState.RUNNING:
                continue
            node_id = self.node_of(h)
            if node_id is None:
                continue
            h.earmark.clear()  # registered: the fleet places on it now
            if self.fleet.registry.on_node(node_id):
                h.idle_since = None
                continue
            if h.idle_since is None:
                h.idle_since = now
            elif now - h.idle_since >= self.config.keep_alive_s:
                log.info("broker: releasing idle %s (%s)", iid, h.instance.offer.offer_id)
                self.providers[h.provider].terminate(iid, "idle past the keep-alive")

    def _say(self, function_id: str, text: str, now: float, force: bool = False) -> None:
        prior = self._told.get(function_id)
        if (
            not force
            and prior is not None
            and prior[0] == text
            and now - prior[1] < WAIT_REPORT_EVERY_S
        ):
            return
        self._told[function_id] = (text, now)
        fn = self.calls.functions.get(function_id)
        if fn is not None:
            self._tell(fn.app_id, f"{fn.name}: {text}")

    def _tell_preempted(self, h: Held) -> None:
        node_id = self.node_of(h)
        if node_id is not None:
            self.fleet.preempted.add(node_id)  # its inputs' losses are not their fault
        told = set()
        for s in self.fleet.registry.on_node(node_id) if node_id else []:
            if s.app_id not in told:
                told.add(s.app_id)
                self._tell(
                    s.app_id,
                    f"spot node {h.instance.offer.offer_id} ({node_id}) was preempted: the "
                    "inputs its containers held go back to the queue; the broker replaces it",
                )

    def close(self) -> None:
        for p in self.providers.values():
            p.close()

    # ------------------------------------------------------------------ status

    def status(self) -> m.BrokerStatus:
        cfg = self.config
        live = [h for h in self.held.values() if h.instance.state not in FINAL]
        now = time.monotonic()
        providers = []
        for name, pc in sorted(cfg.providers.items()):
            p = self.providers.get(name)
            providers.append(
                m.ProviderInfo(
                    name=name,
                    enabled=pc.enabled,
                    kind=pc.kind,
                    offers=len(p.offers()) if p else 0,
                    spot=bool(p and p.capabilities.spot),
                    regions=list(p.capabilities.regions) if p else [],
                    nodes=sum(1 for h in live if h.provider == name),
                    max_nodes=pc.max_nodes,
                )
            )
        fixed_offers = []
        for name, p in self.fixed.items():
            offers = p.offers()
            fixed_offers += [_offer_info(o) for o in offers]
            providers.append(
                m.ProviderInfo(
                    name=name,
                    enabled=True,
                    kind=name,
                    offers=len(offers),
                    spot=p.capabilities.spot,
                    regions=sorted({o.region for o in offers if o.region}),
                    nodes=len(p.instances()),
                )
            )
        return m.BrokerStatus(
            configured=self.watch.config is not None,
            config_path=str(self.watch.path),
            providers=providers,
            instances=[self._info(h) for h in [*self.held.values(), *reversed(self.history)]],
            blocked=[
                f"{'/'.join(k)} for {u - now:.0f}s" for k, u in self.blocked.items() if u > now
            ],
            max_nodes=cfg.max_nodes,
            budget_per_hour=cfg.budget_per_hour,
            spend_per_hour=sum(h.instance.price_per_hour for h in live),
            failovers=self.failovers,
            preemptions=self.preemptions,
            moves=self.moves,
            offers=fixed_offers,
        )

    def _info(self, h: Held) -> m.InstanceInfo:
        i, o = h.instance, h.instance.offer
        return m.InstanceInfo(
            instance_id=i.instance_id,
            provider=h.provider,
            offer_id=o.offer_id,
            instance_type=o.instance_type,
            gpu=o.gpu,
            gpu_count=o.gpu_count,
            spot=i.spot,
            price_per_hour=i.price_per_hour,
            state=str(i.state),
            node_name=i.node_name,
            reason=i.reason,
            node_id=self.node_of(h),
            for_function=h.bought_for,
            region=o.region,
        )


def _offer_info(o: Offer) -> m.OfferInfo:
    return m.OfferInfo(
        provider=o.provider,
        offer_id=o.offer_id,
        instance_type=o.instance_type,
        gpu=o.gpu,
        gpu_count=o.gpu_count,
        cpu=o.cpu,
        memory_gib=o.memory_gib,
        price_per_hour=o.price or 0.0,
        region=o.region,
    )


def _nonpreemptible(fn: FunctionQueue) -> bool:
    return bool(getattr(fn.spec, "nonpreemptible", False))
