"""Wire types of the cluster: a joined worker agent's relay of its containers' channels
(``RelayOpen``/``RelayData``/``RelayClose``) and nodes' details. Re-exported by
``strato.protocol.messages``."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from .messages_base import ChannelMsg, Index

# A worker agent on another machine relays its containers' channel connections over its
# one connection to the control plane: each container connection is a numbered stream of
# raw channel bytes (``RelayOpen``, ``RelayData`` both ways, ``RelayClose`` both ways).
# The control plane reads each stream exactly as it reads a direct channel connection.

RELAY_CHUNK = 256 << 10  # the most bytes of one stream a RelayData carries


class RelayOpen(ChannelMsg, tag="ropen"):
    conn: Index


class RelayData(ChannelMsg, tag="rdata"):
    conn: Index
    data: Annotated[bytes, Meta(max_length=RELAY_CHUNK)]


class RelayClose(ChannelMsg, tag="rclose"):
    conn: Index


class NodeDetail(msgspec.Struct):
    """A node as ``strato node list|describe`` shows it."""

    node_id: str
    name: str
    provider: str
    state: Literal["ready", "lost", "cordoned", "draining"]
    cpu: float
    cpu_reserved: float
    memory_mb: int
    memory_reserved_mb: int
    gpus: dict[str, int]
    labels: dict[str, str]
    region: str | None
    heartbeat_age_s: float
    containers: list[str]
    lost_reason: str = ""


class NodeDetailList(msgspec.Struct):
    nodes: list[NodeDetail]
