"""Autoscaling policy as a pure function: (stats, config) -> how many to start, which to stop.

Follows Modal's semantics: enough containers to carry the queued and running inputs at
``target_inputs`` each, plus ``buffer_containers`` while there is work, clamped to
``[min_containers, max_containers]``. Idle containers are stopped once idle for
``scaledown_window`` seconds, longest-idle first; busy containers are never stopped.
The clock is ``stats.now``; nothing here reads time or does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

# a container as the autoscaler sees it: leaving ones (stopping or killed) are "stopping"
ContainerPhase = Literal["starting", "ready", "stopping"]
STARTING: Final = "starting"
READY: Final = "ready"
STOPPING: Final = "stopping"
# which keep-alive policy stops idle containers (see ``AutoscalerConfig.keepalive``)
Keepalive = Literal["fixed", "hybrid", "adaptive"]


@dataclass
class AutoscalerConfig:
    """One function's scaling settings (validated where they are accepted, not here)."""

    min_containers: int = 0
    max_containers: int | None = None
    buffer_containers: int = 0
    scaledown_window: float = 60.0
    target_inputs: int = 1  # inputs one container should carry at once
    # Which keep-alive policy stops idle containers: "fixed" (decide(), scaledown_window),
    # "adaptive" (strato's default) or "hybrid" (the paper's); see autoscaler.adaptive.
    keepalive: Keepalive = "fixed"
    # The memory one container holds (Resources.memory_mb): the adaptive policy weighs the
    # idle memory a warm container costs against the cold starts it saves.
    memory_mb: float = 128.0


@dataclass
class ContainerStat:
    """One container of the function, as the autoscaler sees it."""

    container_id: str
    state: ContainerPhase
    inflight: int
    idle_since: float | None  # None while busy or starting
    started_at: float


@dataclass
class FunctionStats:
    """A snapshot of one function's load and containers at time ``now``."""

    now: float
    queued: int
    inflight: int
    containers: list[ContainerStat]


@dataclass
class ScalingDecision:
    """Start ``start`` new containers and stop the containers named in ``stop``."""

    start: int
    stop: list[str]


def desired_containers(stats: FunctionStats, config: AutoscalerConfig) -> int:
    """How many live containers the function should have now."""
    work = stats.queued + stats.inflight
    desired = 0
    if work > 0:
        desired = math.ceil(work / max(1, config.target_inputs)) + config.buffer_containers
    desired = max(desired, config.min_containers)
    if config.max_containers is not None:
        desired = min(desired, config.max_containers)
    return max(0, desired)


def decide(stats: FunctionStats, config: AutoscalerConfig) -> ScalingDecision:
    """How many containers to start and which idle ones to stop."""
    desired = desired_containers(stats, config)
    live = [c for c in stats.containers if c.state != STOPPING]
    # Longest idle first; container_id breaks ties so the decision is deterministic.
    idle = sorted(
        (c.idle_since, c.container_id) for c in live if c.inflight == 0 and c.idle_since is not None
    )
    over_max = 0 if config.max_containers is None else len(live) - config.max_containers
    stop = [cid for _, cid in idle[: max(0, over_max)]]
    surplus = len(live) - len(stop) - desired
    expired = [
        cid for since, cid in idle[len(stop) :] if stats.now - since >= config.scaledown_window
    ]
    stop += expired[: max(0, surplus)]
    return ScalingDecision(start=max(0, desired - len(live)), stop=stop)
