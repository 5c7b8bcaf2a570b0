"""An indexed placer for large clusters: the decisions of ``scheduler.place`` (cheapest
node first, then best fit, then ``node_id``) without scanning every node per container.

Nodes are grouped by what makes them interchangeable for ranking and eligibility: price,
region, provider, CPU and memory totals, GPU types and health. Within a group the
best-fit rank of a node for any request is its free fraction ``cpu_free / cpu_total +
memory_free / memory_total`` (the request's own share is the same for every node of the
group), so each group keeps its nodes sorted by that fraction; a placement looks, per
group that may take the request, for the first node in that order with room (and GPUs),
and takes the best of the groups' candidates by ``(price, rank, node_id)``. With G
groups, a placement costs about G binary-search steps plus the nodes skipped for lack of
room, instead of one check of every node.

Pure and single-threaded like the scheduler; ``benchmarks/bench_placement.py`` checks
that it decides as ``place()`` does and measures both.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from strato.protocol.gpu import GpuRequest

from ..scheduler.placement import (
    _EPSILON,
    ContainerRequest,
    NodeView,
    Placement,
    _fallbacks,
    _pick_gpus,
    _provider_matches,
    _rank_key,
    _region_matches,
    release,
    reserve,
)

GroupKey = tuple


def _group_key(n: NodeView) -> GroupKey:
    return (
        n.price_per_hour,
        n.region,
        n.provider,
        n.cpu_total,
        n.memory_mb,
        tuple(sorted((t, len(ix)) for t, ix in n.gpus.items())),
        n.healthy,
    )


def _free(n: NodeView) -> float:
    cpu = n.cpu_free / n.cpu_total if n.cpu_total > 0 else 0.0
    mem = n.memory_free_mb / n.memory_mb if n.memory_mb > 0 else 0.0
    return cpu + mem


class _Group:
    __slots__ = ("key", "sample", "order", "keys")

    def __init__(self, key: GroupKey, sample: NodeView) -> None:
        self.key = key
        self.sample = sample  # any node of the group: its eligibility is the group's
        self.order: list[tuple[float, str]] = []  # (free fraction, node_id), ascending
        self.keys: dict[str, tuple[float, str]] = {}

    def add(self, n: NodeView) -> None:
        k = (_free(n), n.node_id)
        self.keys[n.node_id] = k
        bisect.insort(self.order, k)

    def remove(self, node_id: str) -> None:
        k = self.keys.pop(node_id)
        i = bisect.bisect_left(self.order, k)
        del self.order[i]


class Placer:
    """An index over ``nodes`` (kept in step with ``reserve``/``release`` made through
    it; a node changed elsewhere must be ``update``d)."""

    def __init__(self, nodes: Iterable[NodeView] = ()) -> None:
        self.nodes: dict[str, NodeView] = {}
        self._group_of: dict[str, _Group] = {}
        self.groups: dict[GroupKey, _Group] = {}
        # (region, provider, GPU need) -> the groups that may take it, by price tier
        self._eligible: dict[tuple, list[list[_Group]]] = {}
        for n in nodes:
            self.add(n)

    def add(self, n: NodeView) -> None:
        if n.node_id in self.nodes:
            self.remove(n.node_id)
        key = _group_key(n)
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = _Group(key, n)
            self._eligible.clear()
        g.add(n)
        self.nodes[n.node_id] = n
        self._group_of[n.node_id] = g

    def remove(self, node_id: str) -> None:
        g = self._group_of.pop(node_id)
        g.remove(node_id)
        del self.nodes[node_id]
        if not g.keys:
            del self.groups[g.key]
            self._eligible.clear()
        elif g.sample.node_id == node_id:
            g.sample = self.nodes[next(iter(g.keys))]

    def update(self, node_id: str) -> None:
        """The node's reservations changed: put it back in order."""
        g = self._group_of[node_id]
        n = self.nodes[node_id]
        if _group_key(n) != g.key:  # its health (or inventory) changed: another group
            self.add(n)
            return
        g.remove(node_id)
        g.add(n)

    def _tiers(self, request: ContainerRequest, gpu_req: GpuRequest | None) -> list[list[_Group]]:
        region = request.region if not isinstance(request.region, list) else tuple(request.region)
        ck = (region, request.provider, gpu_req)
        tiers = self._eligible.get(ck)
        if tiers is not None:
            return tiers
        by_price: dict[float, list[_Group]] = {}
        for g in self.groups.values():
            s = g.sample
            if not (
                s.healthy
                and _region_matches(s, request.region)
                and _provider_matches(s, request.provider)
            ):
                continue
            if gpu_req is not None:
                types = dict(g.key[5])
                have = (
                    types.get(gpu_req.type, 0) if gpu_req.type else max(types.values(), default=0)
                )
                if have < gpu_req.count:
                    continue
            by_price.setdefault(g.key[0], []).append(g)
        tiers = [by_price[p] for p in sorted(by_price)]
        self._eligible[ck] = tiers
        return tiers

    def place(self, request: ContainerRequest) -> Placement | None:
        cpu, mem = request.cpu - _EPSILON, request.memory_mb
        nodes = self.nodes
        for gpu_req in _fallbacks(request):
            for tier in self._tiers(request, gpu_req):  # the cheapest tier with room wins
                best: tuple | None = None
                for g in tier:
                    for _, node_id in g.order:
                        n = nodes[node_id]
                        if (
                            n.cpu_total - n.cpu_reserved < cpu
                            or n.memory_mb - n.memory_reserved_mb < mem
                        ):
                            continue
                        gpus = _pick_gpus(n, gpu_req)
                        if gpus is None:
                            continue
                        cand = (*_rank_key(n, request), node_id, gpus)
                        if best is None or cand[:3] < best[:3]:
                            best = cand
                        break
                if best is not None:
                    gpu_type, indices = best[3]
                    return Placement(node_id=best[2], gpu_type=gpu_type, gpu_indices=indices)
        return None

    def reserve(self, request: ContainerRequest, placement: Placement) -> None:
        reserve(self.nodes[placement.node_id], request, placement)
        self.update(placement.node_id)

    def release(self, request: ContainerRequest, placement: Placement) -> None:
        release(self.nodes[placement.node_id], request, placement)
        self.update(placement.node_id)


INDEX_FROM_NODES = 32  # below this many eligible nodes the scan is as fast


class FleetIndex:
    """The fleet's placer: the scan (``scheduler.place``) for small clusters, a ``Placer``
    over the same ``NodeView`` objects from ``INDEX_FROM_NODES`` eligible nodes on. The
    index is rebuilt when the eligible views change (a node joins, is lost, cordoned,
    removed: other objects); a reservation or release on a node must be reported with
    ``touched`` (its free fraction moved)."""

    def __init__(self, threshold: int = INDEX_FROM_NODES) -> None:
        self.threshold = threshold
        self.placer: Placer | None = None
        self._ids: tuple[int, ...] = ()
        self.rebuilds = 0

    def place(self, request: ContainerRequest, eligible: list[NodeView]) -> Placement | None:
        from ..scheduler.placement import place

        if len(eligible) < self.threshold:
            self.placer = None
            return place(request, eligible)
        ids = tuple(id(v) for v in eligible)
        if self.placer is None or ids != self._ids:
            self.placer = Placer(eligible)  # the fleet's own views, not copies
            self._ids = ids
            self.rebuilds += 1
        return self.placer.place(request)

    def touched(self, node_id: str) -> None:
        if self.placer is not None and node_id in self.placer.nodes:
            self.placer.update(node_id)
