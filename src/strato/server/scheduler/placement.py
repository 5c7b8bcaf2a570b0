"""Placement of one container on one node: filter feasible nodes, rank them, assign GPUs.

Pure logic over :class:`NodeView` snapshots; the caller loads nodes and persists the
result. Ranking: cheapest ``price_per_hour`` first, then best fit (least free CPU and
memory left after placement, each as a fraction of the node), then ``node_id``.
GPU fallbacks are tried in order; the first one that any node satisfies wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from strato.exceptions import InvalidError
from strato.protocol.gpu import GpuRequest, gpu_request_str

_EPSILON = 1e-9
_MAX_LISTED = 5

_T = TypeVar("_T")


@dataclass
class NodeView:
    """What the scheduler knows of one node's capacity and current reservations."""

    node_id: str
    provider: str
    region: str | None
    price_per_hour: float
    cpu_total: float
    memory_mb: int
    gpus: dict[str, list[int]]  # gpu type -> all device indices on the node
    cpu_reserved: float = 0.0
    memory_reserved_mb: int = 0
    gpus_in_use: set[int] = field(default_factory=set)  # device indices already assigned
    healthy: bool = True

    @property
    def cpu_free(self) -> float:
        return self.cpu_total - self.cpu_reserved

    @property
    def memory_free_mb(self) -> int:
        return self.memory_mb - self.memory_reserved_mb

    def free_gpu_indices(self, gpu_type: str) -> list[int]:
        return sorted(i for i in self.gpus.get(gpu_type, []) if i not in self.gpus_in_use)

    def copy(self) -> NodeView:
        """A copy whose reservations can change without touching this one."""
        return NodeView(
            self.node_id,
            self.provider,
            self.region,
            self.price_per_hour,
            self.cpu_total,
            self.memory_mb,
            self.gpus,
            self.cpu_reserved,
            self.memory_reserved_mb,
            set(self.gpus_in_use),
            self.healthy,
        )

    def emptied(self) -> NodeView:
        """The same node with nothing reserved: what could ever run on it."""
        return NodeView(
            self.node_id,
            self.provider,
            self.region,
            self.price_per_hour,
            self.cpu_total,
            self.memory_mb,
            self.gpus,
        )


@dataclass
class ContainerRequest:
    """The resources one container needs and where it may run."""

    cpu: float
    memory_mb: int
    gpu: list[GpuRequest]  # ordered fallbacks; [] = no GPU
    region: str | list[str] | None = None
    provider: str | None = None  # Modal's `cloud=`


@dataclass
class Placement:
    """Where a container goes and which GPU devices it gets."""

    node_id: str
    gpu_type: str | None
    gpu_indices: list[int]


def place(request: ContainerRequest, nodes: list[NodeView]) -> Placement | None:
    """Pick the best node for ``request``, or ``None`` when no node can take it now."""
    for gpu_req in _fallbacks(request):
        candidates = []
        for node in nodes:
            if not (_is_eligible(node, request) and _has_room(node, request)):
                continue
            gpus = _pick_gpus(node, gpu_req)
            if gpus is not None:
                candidates.append((node, gpus))
        if candidates:
            node, (gpu_type, indices) = min(
                candidates, key=lambda c: (*_rank_key(c[0], request), c[0].node_id)
            )
            return Placement(node_id=node.node_id, gpu_type=gpu_type, gpu_indices=indices)
    return None


def reserve(node: NodeView, request: ContainerRequest, placement: Placement) -> None:
    """Record ``placement`` on ``node``; refuses a GPU that is missing or already in use,
    and a request that is not a finite, positive amount (a negative one would leave the
    node's reservations wrong once released: :func:`release` clamps at zero)."""
    _check_node(node, placement)
    check_request(request)
    owned = set(node.gpus.get(placement.gpu_type, [])) if placement.gpu_type else set()
    for index in placement.gpu_indices:
        if index not in owned:
            raise InvalidError(
                f"GPU index {index} of type {placement.gpu_type} does not exist on node "
                f"{node.node_id}; place the container again."
            )
        if index in node.gpus_in_use:
            raise InvalidError(
                f"GPU index {index} on node {node.node_id} is already assigned to another "
                "container; place the container again."
            )
    node.cpu_reserved += request.cpu
    node.memory_reserved_mb += request.memory_mb
    node.gpus_in_use.update(placement.gpu_indices)


def check_request(request: ContainerRequest) -> None:
    """Raise ``InvalidError`` unless CPU and memory are finite and positive."""
    cpu, mem = request.cpu, request.memory_mb
    if not (isinstance(cpu, int | float) and math.isfinite(cpu) and cpu > 0):
        raise InvalidError(f"a container needs a finite, positive CPU request, not {cpu!r}")
    if not (isinstance(mem, int) and not isinstance(mem, bool) and mem > 0):
        raise InvalidError(f"a container needs a positive memory request (MiB), not {mem!r}")


def release(node: NodeView, request: ContainerRequest, placement: Placement) -> None:
    """Undo :func:`reserve`; counters never drop below zero."""
    _check_node(node, placement)
    cpu = node.cpu_reserved - request.cpu
    node.cpu_reserved = cpu if cpu > _EPSILON else 0.0
    node.memory_reserved_mb = max(0, node.memory_reserved_mb - request.memory_mb)
    node.gpus_in_use.difference_update(placement.gpu_indices)


def explain_unplaceable(request: ContainerRequest, nodes: list[NodeView]) -> str:
    """Say in one sentence why :func:`place` finds no node for ``request``."""
    if not nodes:
        return "no nodes are registered"
    healthy = [n for n in nodes if n.healthy]
    if not healthy:
        return f"no healthy node ({_count(len(nodes), 'node')} unhealthy)"
    in_region = [n for n in healthy if _region_matches(n, request.region)]
    if not in_region:
        where = _listing(healthy, lambda n: f"{n.region or 'no region'} on {n.node_id}")
        return f"no healthy node in region {_region_str(request.region)} (nodes are in: {where})"
    eligible = [n for n in in_region if _provider_matches(n, request.provider)]
    if not eligible:
        where = _listing(in_region, lambda n: f"{n.provider} on {n.node_id}")
        return f"no healthy node from provider {request.provider} (nodes are from: {where})"
    reasons = [_explain_fallback(request, g, eligible) for g in _fallbacks(request)]
    if len(reasons) == 1:
        return reasons[0]
    return "no GPU fallback fits: " + "; ".join(reasons)


def _explain_fallback(
    request: ContainerRequest, gpu_req: GpuRequest | None, nodes: list[NodeView]
) -> str:
    label = gpu_request_str(gpu_req) if gpu_req else ""
    prefix = f"{label}: " if label else ""
    if gpu_req is not None:
        reason = _explain_gpu(gpu_req, nodes)
        if reason:
            return prefix + reason
        nodes = [n for n in nodes if _pick_gpus(n, gpu_req) is not None]
    roomy = [n for n in nodes if _has_room(n, request)]
    if roomy:
        return f"{prefix}it fits on node {min(roomy, key=lambda n: n.node_id).node_id}"
    largest = max(nodes, key=lambda n: (n.cpu_free, n.memory_free_mb, n.node_id))
    return (
        f"{prefix}needs {request.cpu:.1f} CPU and {request.memory_mb} MiB; the largest free "
        f"node has {largest.cpu_free:.1f} CPU and {largest.memory_free_mb} MiB"
    )


def _explain_gpu(gpu_req: GpuRequest, nodes: list[NodeView]) -> str | None:
    """Why no node has the GPUs free, or ``None`` when some node does."""
    wanted = f"GPU {gpu_req.type}" if gpu_req.type else "any GPU"
    offers = [(n, t, idx) for n in nodes for t, idx in sorted(n.gpus.items()) if idx]
    matching = [o for o in offers if gpu_req.type in (None, o[1])]
    if not matching:
        listed = _listing(offers, lambda o: f"{o[1]} x{len(o[2])} on {o[0].node_id}")
        return f"no node has {wanted} (nodes offer: {listed or 'no GPUs'})"
    if max(len(idx) for _, _, idx in matching) < gpu_req.count:
        listed = _listing(matching, lambda o: f"{o[1]} x{len(o[2])} on {o[0].node_id}")
        return f"no node has {gpu_req.count} x {wanted} (largest: {listed})"
    if all(_pick_gpus(n, gpu_req) is None for n in nodes):
        listed = _listing(
            matching,
            lambda o: f"{o[0].node_id} {len(o[0].free_gpu_indices(o[1]))} of {len(o[2])} free",
        )
        return f"not enough {wanted} free for {gpu_req.count} ({listed})"
    return None


def _fallbacks(request: ContainerRequest) -> list[GpuRequest | None]:
    return list(request.gpu) if request.gpu else [None]


def _is_eligible(node: NodeView, request: ContainerRequest) -> bool:
    return (
        node.healthy
        and _region_matches(node, request.region)
        and _provider_matches(node, request.provider)
    )


def _region_matches(node: NodeView, region: str | list[str] | None) -> bool:
    """A requested region matches itself and its sub-regions: "us" matches "us-east-1"."""
    if region is None:
        return True
    if node.region is None:
        return False
    have = node.region.lower()
    wanted = [region] if isinstance(region, str) else region
    return any(have == w.lower() or have.startswith(w.lower() + "-") for w in wanted)


def _provider_matches(node: NodeView, provider: str | None) -> bool:
    return provider is None or node.provider.lower() == provider.lower()


def _has_room(node: NodeView, request: ContainerRequest) -> bool:
    return node.cpu_free + _EPSILON >= request.cpu and node.memory_free_mb >= request.memory_mb


def _pick_gpus(node: NodeView, gpu_req: GpuRequest | None) -> tuple[str | None, list[int]] | None:
    """The GPU type and lowest free indices ``node`` would give, or ``None`` if it can't."""
    if gpu_req is None:
        return None, []
    types = [gpu_req.type] if gpu_req.type else sorted(node.gpus)
    options = []
    for gpu_type in types:
        free = node.free_gpu_indices(gpu_type)
        if len(free) >= gpu_req.count:
            # Best fit across types: leave the larger pools whole.
            options.append((len(free), gpu_type, free[: gpu_req.count]))
    if not options:
        return None
    _, gpu_type, indices = min(options)
    return gpu_type, indices


def _rank_key(node: NodeView, request: ContainerRequest) -> tuple[float, float]:
    cpu_left = (node.cpu_free - request.cpu) / node.cpu_total if node.cpu_total > 0 else 0.0
    mem_left = (
        (node.memory_free_mb - request.memory_mb) / node.memory_mb if node.memory_mb > 0 else 0.0
    )
    return node.price_per_hour, cpu_left + mem_left


def _check_node(node: NodeView, placement: Placement) -> None:
    if node.node_id != placement.node_id:
        raise InvalidError(
            f"placement is for node {placement.node_id}, not {node.node_id}; "
            "pass the node the placement names."
        )


def _region_str(region: str | list[str] | None) -> str:
    return region if isinstance(region, str) else " or ".join(region or [])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _listing(items: Iterable[_T], describe: Callable[[_T], str]) -> str:
    described = [describe(item) for item in items]
    shown = ", ".join(described[:_MAX_LISTED])
    hidden = len(described) - _MAX_LISTED
    return f"{shown} and {hidden} more" if hidden > 0 else shown
