"""Tables of metering (on the shared schema metadata).

``usage``: one row per container: what it reserved (CPU, memory, GPUs by type), where it
ran (node, provider, the node's price per hour and the share of it the container is
charged), and when (``started_at``, ``ended_at``: unix seconds; ``ended_at`` is NULL while
it runs; ``seen_at`` is the last time the control plane saw it running, which ends it
after a crash of the control plane).
"""

from __future__ import annotations

from sqlalchemy import Column, Float, Index, Integer, String, Table

from .schema import metadata

usage = Table(
    "usage",
    metadata,
    Column("container_id", String(64), primary_key=True),
    Column("app_id", String(64), nullable=False),
    Column("function_id", String(64), nullable=False),
    Column("function_name", String(256), nullable=False),
    Column("node_id", String(64), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("gpu_type", String(64), nullable=True),
    Column("gpu_count", Integer, nullable=False),
    Column("cpu", Float, nullable=False),
    Column("memory_mb", Integer, nullable=False),
    Column("node_price_per_hour", Float, nullable=False),
    Column("share", Float, nullable=False),  # of the node's price charged to it
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float, nullable=True),
    Column("seen_at", Float, nullable=False),
    Index("ix_usage_app_started", "app_id", "started_at"),
    Index("ix_usage_ended", "ended_at"),
)
