"""The ``ray`` provider's demand: the work no node can place now, as Ray's autoscaler hears it.

``pending_of`` reads the broker's demand (queued inputs, warm pools, the autoscaler's
wanted containers) as ``Pending`` shapes; ``demand_bundles`` turns them into the bundles
asked of Ray's autoscaler (``ray.autoscaler.sdk.request_resources``) at each poll of the
provider (``ray.py``) where they changed. Waiting for a node that fits no Ray node now is
``ray_wait.py``'s.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from strato.server.control import ControlPlane
    from strato.server.scheduler import ContainerRequest

    from .ray_wait import AutoscalerWait

log = logging.getLogger("strato.providers.ray")

MIB = 1024 * 1024
MAX_DEMAND_BUNDLES = 1000  # waiting containers reported to Ray's autoscaler at once
ACCELERATOR = "accelerator_type:"


@dataclass(frozen=True)
class Pending:
    """``count`` containers of one shape that no node can place now."""

    cpu: float
    memory_mb: int
    gpu_count: int = 0
    gpu_type: str | None = None
    count: int = 1


def demand_bundles(
    pending: Iterable[Pending],
    held: Iterable[Mapping[str, float]],
    share: float,
    required: str = "",
) -> list[dict[str, float]]:
    """What to ask Ray's autoscaler for: nothing while no work waits; else one bundle per
    Ray node strato holds (its total CPU, GPU and memory: Ray fits requested bundles into
    nodes' totals, not into what is free, so the nodes strato fills must be in the
    request) and one per waiting container, divided by ``share`` so that strato's share
    of a new node holds it (with its accelerator type and ``required``, the resource a
    node needs to get an agent). At most ``MAX_DEMAND_BUNDLES`` containers."""
    waiting = [p for p in pending if p.count > 0]
    if not waiting:
        return []
    out = [
        {k: float(v) for k, v in totals.items() if k in ("CPU", "GPU", "memory") and v > 0}
        for totals in held
    ]
    left = MAX_DEMAND_BUNDLES
    for p in waiting:
        bundle = {
            "CPU": math.ceil(p.cpu / share * 1000) / 1000,
            "memory": float(math.ceil(p.memory_mb * MIB / share)),
        }
        if p.gpu_count:
            bundle["GPU"] = float(math.ceil(p.gpu_count / share))
            if p.gpu_type:
                bundle[ACCELERATOR + p.gpu_type] = 0.001
        if required:
            bundle[required] = 0.001
        n = min(p.count, left)
        out += [dict(bundle) for _ in range(n)]
        left -= n
        if left <= 0:
            break
    return out


def shape_of_request(request: ContainerRequest) -> Pending:
    """One container of ``request`` (the first of its GPU fallbacks)."""
    gpu = request.gpu[0] if request.gpu else None
    return Pending(
        cpu=request.cpu,
        memory_mb=request.memory_mb,
        gpu_count=gpu.count if gpu is not None else 0,
        gpu_type=gpu.type if gpu is not None else None,
    )


def pending_of(cp: ControlPlane, wait: AutoscalerWait | None = None) -> list[Pending]:
    """On the control plane's loop: the containers no node can place now (the broker's
    demand), by shape; the apps of those that wait for Ray's autoscaler to add a node
    (``wait``) are told so, once per wait."""
    out = []
    for d in cp.broker.demands(time.monotonic()):
        shape = shape_of_request(d.request)
        out.append(replace(shape, count=d.count))
        fn = cp.calls.functions.get(d.key)
        told = (d.key, shape)
        if wait is None or fn is None or shape not in wait.since or told in wait.told:
            continue
        wait.told.add(told)
        text = wait.waiting_text(fn.name, shape)
        log.info("%s", text)
        cp.logs.system(fn.app_id, text)
    return out
