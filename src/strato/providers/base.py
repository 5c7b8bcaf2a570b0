"""The ``Provider`` interface: where nodes come from.

A provider lists the offers it sells (an instance type in a region or zone, with its CPUs,
memory, GPUs and on-demand and spot prices per hour), provisions one as an
:class:`Instance` (whose worker agent then registers with the control plane as a node),
terminates it, and reports each change of an instance's state (provisioning, running,
preempted, failed, terminated) to the callback it was given. ``Capabilities`` say what it
can do (spot instances, provisioning at all: ``local`` has one fixed node).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Offer:
    """One thing a provider sells: an instance type in a region (and zone)."""

    provider: str
    instance_type: str
    gpu: str | None  # canonical type where strato knows it (H100, A100-40GB...), else as listed
    gpu_count: int
    cpu: float
    memory_gib: float
    price: float | None  # on-demand USD per hour; None: not sold on demand
    spot_price: float | None  # USD per hour; None: no spot
    region: str
    zone: str = ""
    gpu_memory_gib: float | None = None

    @property
    def offer_id(self) -> str:
        where = self.zone or self.region or "-"
        return f"{self.provider}/{self.instance_type}/{where}"

    @property
    def memory_mb(self) -> int:
        return int(self.memory_gib * 1024)

    def price_for(self, spot: bool) -> float | None:
        return self.spot_price if spot else self.price


@dataclass(frozen=True)
class Capabilities:
    provisions: bool = True  # False: a fixed set of nodes (local)
    spot: bool = False
    regions: tuple[str, ...] = ()


class InstanceState(enum.StrEnum):
    PROVISIONING = "provisioning"
    RUNNING = "running"  # its worker agent was started (it registers as a node)
    PREEMPTED = "preempted"  # a spot instance taken back by the provider
    FAILED = "failed"  # provisioning failed (out of capacity, an error)
    TERMINATED = "terminated"


FINAL = (InstanceState.PREEMPTED, InstanceState.FAILED, InstanceState.TERMINATED)


@dataclass(eq=False)
class Instance:
    """One provisioned (or provisioning) offer."""

    instance_id: str
    offer: Offer
    spot: bool
    state: InstanceState = InstanceState.PROVISIONING
    node_name: str = ""  # the name its worker agent registers with (NodeInfo.name)
    requested_at: float = field(default_factory=time.monotonic)
    running_at: float | None = None
    ended_at: float | None = None
    reason: str = ""  # why it failed / was preempted / was terminated

    @property
    def price_per_hour(self) -> float:
        return self.offer.price_for(self.spot) or 0.0


@dataclass(frozen=True)
class StateChange:
    instance: Instance
    state: InstanceState
    reason: str = ""


class ProvisionError(Exception):
    """Provisioning an offer failed. ``capacity``: the provider is out of it (try another
    region or provider), else an error of the provider's."""

    def __init__(self, message: str, *, capacity: bool = False) -> None:
        super().__init__(message)
        self.capacity = capacity


OnStateChange = Callable[[StateChange], None]


@runtime_checkable
class Provider(Protocol):
    name: str
    capabilities: Capabilities

    def offers(self) -> list[Offer]:
        """What it sells now, with prices."""
        ...

    def provision(self, offer: Offer, *, spot: bool) -> Instance:
        """Start provisioning ``offer``; the instance's states arrive through the callback
        given at construction (``RUNNING`` once its agent was started, or ``FAILED``)."""
        ...

    def terminate(self, instance_id: str, reason: str = "released") -> None:
        """Give the instance back (its agent stops; its node is lost)."""
        ...

    def instances(self) -> list[Instance]:
        """Its instances not yet ended."""
        ...

    def close(self) -> None:
        """Terminate every instance (the control plane is stopping)."""
        ...
