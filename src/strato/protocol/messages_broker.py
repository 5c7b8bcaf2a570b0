"""Wire types of the broker: providers, instances, offers, its status and usage reports.
Re-exported by ``strato.protocol.messages``."""

from __future__ import annotations

import msgspec


class ProviderInfo(msgspec.Struct):
    name: str
    enabled: bool
    kind: str
    offers: int
    spot: bool
    regions: list[str]
    nodes: int  # instances held now
    max_nodes: int | None = None


class InstanceInfo(msgspec.Struct):
    instance_id: str
    provider: str
    offer_id: str
    instance_type: str
    gpu: str | None
    gpu_count: int
    spot: bool
    price_per_hour: float
    state: str  # provisioning | running | preempted | failed | terminated
    node_name: str
    reason: str = ""
    node_id: str | None = None
    for_function: str | None = None  # what it was bought for
    region: str = ""


class OfferInfo(msgspec.Struct):
    """An offer of a provider that sells nothing (joined hosts, Ray's nodes): capacity that
    is already there, at its declared price."""

    provider: str
    offer_id: str
    instance_type: str
    gpu: str | None
    gpu_count: int
    cpu: float
    memory_gib: float
    price_per_hour: float
    region: str = ""


class BrokerStatus(msgspec.Struct):
    configured: bool
    config_path: str
    providers: list[ProviderInfo]
    instances: list[InstanceInfo]  # held now, then the last ended ones
    blocked: list[str]  # "provider/region/gpu until +Ns"
    max_nodes: int
    budget_per_hour: float
    spend_per_hour: float
    failovers: int
    preemptions: int
    moves: int = 0  # nodes cordoned for a cheaper option (rebalance_margin)
    offers: list[OfferInfo] = []  # of the providers that sell nothing (hosts, ray)


class UsageRow(msgspec.Struct):
    key: str
    containers: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    memory_gib_s: float = 0.0
    gpu_s: float = 0.0
    cost: float = 0.0


class UsageReport(msgspec.Struct):
    by: str
    since: float  # unix time
    rows: list[UsageRow]
    total: UsageRow
