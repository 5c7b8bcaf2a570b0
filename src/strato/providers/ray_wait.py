"""Work bigger than any Ray node waits for Ray's autoscaler (``STRATO_RAY_AUTOSCALER_WAIT_S``).

Ray does not tell a driver which node types its autoscaler can launch (they live in the
autoscaler's own config), so waiting is the operator's choice: with
``STRATO_RAY_AUTOSCALER_WAIT_S`` above 0, a container that fits no current Ray node's share
(a GPU type none has, more CPU or memory than any) waits up to that long from the first
time it could not be placed: it is in the bundles asked of Ray's autoscaler
(``demand_bundles``), the app's logs say what it waits for, and a node that fits, once its
agent joins, runs it. It fails with ResourceUnavailableError when the wait ends, or at once
where Ray's autoscaler (v2, which reports it in the GCS) finds strato's request infeasible:
no node type it can launch fits it. A shape's wait starts again once no work of it waits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from .ray import RayNodeShape, gpu_type
from .ray_demand import Pending, demand_bundles

log = logging.getLogger("strato.providers.ray")

GCS_TIMEOUT_S = 5


def fits(shape: Pending, node: RayNodeShape) -> bool:
    """Whether strato's share of ``node`` holds one container of ``shape``, empty."""
    if node.cpu < shape.cpu or node.memory_mb < shape.memory_mb:
        return False
    if not shape.gpu_count:
        return True
    if node.gpu_count < shape.gpu_count:
        return False
    return shape.gpu_type is None or gpu_type(node.accelerator) == shape.gpu_type


def what_fits(shape: Pending) -> str:
    """The node a shape waits for, in words (``GPU H100``, ``2 CPU and 4096 MiB``)."""
    if shape.gpu_count:
        kind = f"GPU {shape.gpu_type}" if shape.gpu_type else "GPU"
        return kind if shape.gpu_count == 1 else f"{shape.gpu_count} x {kind}"
    return f"{shape.cpu:g} CPU and {shape.memory_mb} MiB for strato"


def _same(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-3 for k in a)


class AutoscalerWait:
    """Which shapes no Ray node fits wait for Ray's autoscaler, and why one stops waiting."""

    def __init__(
        self,
        wait_s: float,
        share: float = 1.0,
        required: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.wait_s = wait_s
        self.share = share
        self.required = required
        self.clock = clock
        self.since: dict[Pending, float] = {}  # shape -> when it first could not be placed
        self.infeasible: set[Pending] = set()  # shapes Ray's autoscaler cannot launch for
        self.told: set[tuple[str, Pending]] = set()  # (function id, shape) told it waits
        self.ended: set[Pending] = set()  # shapes whose wait ended (logged once)

    def waits(self, shape: Pending, nodes: Iterable[RayNodeShape]) -> bool:
        """True while ``shape``, which no Ray node can place now, waits for a new node:
        it fits none of the Ray nodes, its wait has not ended and Ray's autoscaler has not
        said it is infeasible. False: the fleet waits for room (it fits a node) or fails."""
        if self.wait_s <= 0 or any(fits(shape, n) for n in nodes):
            return False
        since = self.since.setdefault(shape, self.clock())
        if shape not in self.infeasible and self.clock() - since < self.wait_s:
            return True
        if shape not in self.ended and shape not in self.infeasible:  # (that one was said)
            self.ended.add(shape)
            log.warning("%s", self.why_not(shape))
        return False

    def why_not(self, shape: Pending) -> str | None:
        """Why ``shape`` stopped waiting (for the ResourceUnavailableError), or None."""
        if shape in self.infeasible:
            return (
                f"Ray's autoscaler reports strato's request for a node with {what_fits(shape)} "
                "infeasible: none of the node types it can launch fits it (add one to the "
                "Ray cluster's config)"
            )
        since = self.since.get(shape)
        if since is None or self.clock() - since < self.wait_s:
            return None
        return (
            f"Ray's autoscaler added no node with {what_fits(shape)} in {self.wait_s:g}s "
            "(STRATO_RAY_AUTOSCALER_WAIT_S)"
        )

    def waiting_text(self, name: str, shape: Pending) -> str:
        left = max(0.0, self.since.get(shape, self.clock()) + self.wait_s - self.clock())
        return (
            f"{name} fits no node of the Ray cluster: waiting up to {left:.0f}s for Ray's "
            f"autoscaler to add a node with {what_fits(shape)}"
        )

    def keep(self, waiting: Iterable[Pending]) -> None:
        """Forget the shapes no work waits for any more (their next wait starts afresh)."""
        now_waiting = set(waiting)
        for shape in list(self.since):
            if shape not in now_waiting:
                del self.since[shape]
                self.infeasible.discard(shape)
                self.ended.discard(shape)
        self.told = {(f, s) for f, s in self.told if s in self.since}

    def saw_infeasible(self, bundles: Iterable[Mapping[str, float]]) -> None:
        """The bundles of the requests Ray's autoscaler found infeasible: the waiting
        shapes among them cannot get a node (Ray judges strato's request as a whole, and
        the nodes strato holds fit by definition, so the waiting shapes are the cause)."""
        infeasible = list(bundles)
        for shape in self.since:
            mine = demand_bundles([shape], [], self.share, self.required)[0]
            if shape not in self.infeasible and any(_same(mine, b) for b in infeasible):
                self.infeasible.add(shape)
                log.warning("%s", self.why_not(shape))


def infeasible_bundles() -> list[dict[str, float]]:
    """The bundles of the cluster resource requests (``request_resources``) Ray's
    autoscaler reported infeasible to the GCS (autoscaler v2; none where no v2 autoscaler
    runs). Call where this process is a Ray driver."""
    from ray.experimental.internal_kv import internal_kv_get_gcs_client

    return infeasible_in(internal_kv_get_gcs_client().get_cluster_status(timeout_s=GCS_TIMEOUT_S))


def infeasible_in(cluster_status: bytes) -> list[dict[str, float]]:
    """The infeasible cluster resource requests' bundles in a ``GetClusterStatusReply``."""
    from ray.core.generated.autoscaler_pb2 import (  # type: ignore[attr-defined]
        GetClusterStatusReply,
    )

    reply = GetClusterStatusReply()
    reply.ParseFromString(cluster_status)
    return [
        dict(r.request.resources_bundle)
        for c in reply.autoscaling_state.infeasible_cluster_resource_constraints
        for r in c.resource_requests
    ]
