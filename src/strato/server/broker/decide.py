"""The broker's decisions, pure: which offers to provision for the work that waits.

Cost model: an option is an offer bought on demand or as spot. Its expected cost per hour
is its price; for spot, ``spot_price * (1 + rate * loss_h)``: ``rate`` is the expected
preemptions per instance-hour (from the availability traces: ``providers.traces``) and
``loss_h`` the hours each preemption costs (the work redone and the replacement's
provisioning). A demand (one function's containers that no node can take) is met node by
node: the option with the least expected cost per container it would hold (an 8-GPU node
holds up to 8 one-GPU containers: packing) among the feasible ones of the first GPU
fallback that has any; feasible means the GPU type and count, CPU and memory per
container, ``region=``, ``cloud=`` (provider), on-demand only for ``nonpreemptible=True``,
not blocked (a recent failure of that provider, region and GPU type), and within the
limits (``max_nodes``, the budget per hour).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from strato.protocol.gpu import GpuRequest
from strato.providers.base import Offer
from strato.providers.traces import PreemptionModel

from ..scheduler import ContainerRequest

BlockKey = tuple[str, str, str]  # (provider, region, GPU type or "cpu")


def block_key(offer: Offer) -> BlockKey:
    return (offer.provider, offer.region, offer.gpu or "cpu")


@dataclass(frozen=True, slots=True)
class Option:
    offer: Offer
    spot: bool
    hourly: float  # expected cost per hour (the price; for spot with its preemptions)
    price: float  # the price per hour billed

    @property
    def label(self) -> str:
        kind = "spot" if self.spot else "on-demand"
        return f"{self.offer.offer_id} ({kind}, ${self.price:.3f}/h)"


@dataclass(frozen=True)
class Demand:
    key: str  # the function id
    request: ContainerRequest
    count: int  # containers wanted
    nonpreemptible: bool = False


@dataclass
class Choice:
    key: str
    option: Option
    containers: int  # of the demand, packed on this node
    gpu: GpuRequest | None


@dataclass
class Decision:
    choices: list[Choice] = field(default_factory=list)
    waits: dict[str, str] = field(default_factory=dict)  # demand key -> why it waits
    infeasible: dict[str, str] = field(default_factory=dict)  # no offer could ever take it


class OfferIndex:
    """Options by GPU type (``None``: CPU-only offers), cheapest expected cost first; and
    by (type, GPU count) and (type, provider, GPU count), which a search walks with a
    bound (the cost per container no option further down can beat)."""

    def __init__(
        self,
        offers: Iterable[Offer],
        preemptions: PreemptionModel | None = None,
        *,
        loss_h: float = 0.25,
        spot: bool = True,
    ) -> None:
        self.buckets: dict[str | None, list[Option]] = {}
        for o in offers:
            if o.price is not None:
                self.buckets.setdefault(o.gpu, []).append(Option(o, False, o.price, o.price))
            if spot and o.spot_price is not None:
                rate = preemptions.rate(o.provider, o.gpu, o.region) if preemptions else 0.0
                hourly = o.spot_price * (1.0 + rate * loss_h)
                self.buckets.setdefault(o.gpu, []).append(Option(o, True, hourly, o.spot_price))
        for opts in self.buckets.values():
            opts.sort(key=lambda op: (op.hourly, op.offer.offer_id, op.spot))
        self.max_gpus = {t: max(op.offer.gpu_count for op in v) for t, v in self.buckets.items()}
        self.regions = {op.offer.region for opts in self.buckets.values() for op in opts}
        self._region_sets: dict[tuple[str, ...], frozenset[str]] = {}
        # type -> [(gpu count, options)], and (type, provider) -> the same
        self.by_count: dict[str | None, list[tuple[int, list[Option]]]] = {}
        self.by_provider: dict[tuple[str | None, str], list[tuple[int, list[Option]]]] = {}
        for t, opts in self.buckets.items():
            self.by_count[t] = _split(opts)
            for p in {op.offer.provider for op in opts}:
                self.by_provider[(t, p)] = _split([op for op in opts if op.offer.provider == p])

    def regions_for(self, wanted: str | list[str]) -> frozenset[str]:
        """The catalog's regions that ``region=`` matches (computed once per value)."""
        key = (wanted,) if isinstance(wanted, str) else tuple(wanted)
        hit = self._region_sets.get(key)
        if hit is None:
            hit = frozenset(r for r in self.regions if region_matches(r, wanted))
            self._region_sets[key] = hit
        return hit

    def __len__(self) -> int:
        return sum(len(v) for v in self.buckets.values())


def _split(opts: list[Option]) -> list[tuple[int, list[Option]]]:
    counts: dict[int, list[Option]] = {}
    for op in opts:  # keeps the cost order
        counts.setdefault(op.offer.gpu_count, []).append(op)
    return sorted(counts.items())


def per_node(offer: Offer, request: ContainerRequest, gpus: int) -> int:
    """How many such containers one node of ``offer`` holds (0: none)."""
    k = int(offer.cpu / request.cpu + 1e-9) if request.cpu > 0 else 1 << 20
    k = min(k, offer.memory_mb // request.memory_mb if request.memory_mb > 0 else k)
    if gpus:
        k = min(k, offer.gpu_count // gpus)
    return max(0, k)


def region_matches(region: str, wanted: str | list[str] | None) -> bool:
    if wanted is None:
        return True
    have = region.lower()
    names = [wanted] if isinstance(wanted, str) else wanted
    return any(have == w.lower() or have.startswith(w.lower() + "-") for w in names)


def _fallbacks(request: ContainerRequest) -> list[GpuRequest | None]:
    return list(request.gpu) if request.gpu else [None]


def _types(index: OfferIndex, g: GpuRequest | None) -> list[str | None]:
    if g is None:
        return [None]
    if g.type is None:
        return [t for t in index.buckets if t is not None]
    return [g.type]


def best_option(
    index: OfferIndex,
    demand: Demand,
    g: GpuRequest | None,
    n: int,
    *,
    blocked: set[BlockKey] | frozenset[BlockKey] = frozenset(),
    max_hourly: float = math.inf,
    providers: set[str] | None = None,
) -> tuple[Option, int] | None:
    """The option of least expected cost per container for ``n`` more containers, with how
    many it holds."""
    req = demand.request
    gpus = g.count if g is not None else 0
    best: tuple[float, Option, int] | None = None
    cloud = req.provider.lower() if req.provider is not None else None
    regions = index.regions_for(req.region) if req.region is not None else None
    for t in _types(index, g):
        groups = (
            index.by_provider.get((t, cloud), [])
            if cloud is not None
            else index.by_count.get(t, [])
        )
        for count, opts in groups:
            if count < gpus:
                continue
            # no option of this group holds more than this many of the n containers
            cap = min(n, count // gpus) if gpus else n
            for op in opts:
                if best is not None and op.hourly / cap >= best[0]:
                    break  # sorted: none further in this group can beat it
                o = op.offer
                if op.spot and demand.nonpreemptible:
                    continue
                if op.price > max_hourly:
                    continue
                if providers is not None and o.provider not in providers:
                    continue
                if regions is not None and o.region not in regions:
                    continue
                if blocked and block_key(o) in blocked:
                    continue
                k = per_node(o, req, gpus)
                if k <= 0:
                    continue
                eff = op.hourly / min(k, n)
                if best is None or eff < best[0]:
                    best = (eff, op, k)
    return None if best is None else (best[1], best[2])


def choose(
    demands: Iterable[Demand],
    index: OfferIndex,
    *,
    blocked: set[BlockKey] | frozenset[BlockKey] = frozenset(),
    nodes_left: int | None = None,
    budget_left: float = math.inf,
    providers: set[str] | None = None,
) -> Decision:
    """Nodes to provision for ``demands`` (in order), within ``nodes_left`` more nodes and
    ``budget_left`` dollars per hour more."""
    out = Decision()
    # identical requests find the same option (while the budget does not bind)
    memo: dict[tuple, tuple[Option, int, GpuRequest | None] | None] = {}
    why_memo: dict[tuple, tuple[str, str]] = {}
    for d in demands:
        n = d.count
        while n > 0:
            if nodes_left is not None and nodes_left <= 0:
                out.waits[d.key] = "the broker's max_nodes is reached"
                break
            key = _shape(d, n) if budget_left == math.inf else None
            if key is not None and key in memo:
                found = memo[key]
            else:
                found = None
                for g in _fallbacks(d.request):
                    hit = best_option(
                        index, d, g, n, blocked=blocked, max_hourly=budget_left, providers=providers
                    )
                    if hit is not None:
                        found = (hit[0], hit[1], g)
                        break
                if key is not None:
                    memo[key] = found
            if found is None:
                if key is not None and key in why_memo:
                    kind, why = why_memo[key]
                    (out.waits if kind == "wait" else out.infeasible)[d.key] = why
                else:
                    _why_not(index, d, blocked, budget_left, providers, out)
                    if key is not None:
                        w = out.waits.get(d.key)
                        why_memo[key] = ("wait", w) if w else ("never", out.infeasible[d.key])
                break
            op, k, g = found
            while n > 0 and (nodes_left is None or nodes_left > 0) and op.price <= budget_left:
                take = min(k, n)
                out.choices.append(Choice(d.key, op, take, g))
                n -= take
                budget_left -= op.price
                if nodes_left is not None:
                    nodes_left -= 1
                if take < k or n < k:
                    break  # the rest may fit a smaller node better
    return out


def _shape(d: Demand, n: int) -> tuple:
    r = d.request
    region = tuple(r.region) if isinstance(r.region, list) else r.region
    return (r.cpu, r.memory_mb, tuple(r.gpu), region, r.provider, d.nonpreemptible, n)


def _why_not(
    index: OfferIndex,
    d: Demand,
    blocked: set[BlockKey] | frozenset[BlockKey],
    budget_left: float,
    providers: set[str] | None,
    out: Decision,
) -> None:
    """Say why no option was found: never (no offer fits), blocked, or the budget."""
    for g in _fallbacks(d.request):
        if best_option(index, d, g, 1, providers=providers) is not None:
            if best_option(index, d, g, 1, blocked=blocked, providers=providers) is None:
                out.waits[d.key] = "every offer that fits failed recently (cool-down)"
            else:
                out.waits[d.key] = (
                    f"the budget per hour is spent (${max(0.0, budget_left):.2f}/h left)"
                )
            return
    out.infeasible[d.key] = "no offer of the enabled providers fits it"


def cheaper_option(
    held: Option,
    demand: Demand,
    index: OfferIndex,
    *,
    margin: float,
    blocked: set[BlockKey] | frozenset[BlockKey] = frozenset(),
    providers: set[str] | None = None,
) -> Option | None:
    """The option to move a node's work to: ``held`` is a node holding ``demand.count``
    containers of ``demand``; when the best option for them now costs less per container
    than ``held`` by more than ``margin`` (a share: 0.02 is 2%; it pays for the move), that
    option, else None. A node bought in a shortage, or as a replacement while the cheapest
    places were out of capacity, is moved back this way once they are sold again."""
    if demand.count <= 0:
        return None
    decision = choose([demand], index, blocked=blocked, providers=providers)
    if not decision.choices:
        return None
    best = decision.choices[0]
    if held.hourly / demand.count > best.option.hourly / best.containers * (1.0 + margin):
        return best.option
    return None
