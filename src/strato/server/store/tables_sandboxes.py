"""Tables of sandboxes (on the shared schema metadata).

A sandbox is a row of ``sandboxes``: its app, its optional name, its tags (msgpack), its
status (``messages.SandboxStatus``), and once it has ended its return code and the reason.
Its processes and their output live in the control plane's memory only
(``server/sandboxes``): a sandbox does not outlive the control plane (one that restarts
marks those it had as ``terminated``, with the reason).

``snapshot_layers``: the blob of every ``sb.snapshot_filesystem()`` layer. Its image lives
with the client (``SnapshotImage``) until a sandbox or function names it, so the blob
collector (``server/blob_gc.py``) keeps every layer recorded here.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
)

from .schema import metadata

sandboxes = Table(
    "sandboxes",
    metadata,
    Column("sandbox_id", String(64), primary_key=True),
    Column("app_id", String(64), nullable=False),
    Column("name", String(64), nullable=True),
    Column("tags", LargeBinary, nullable=False),  # msgpack dict[str, str]
    Column("status", String(16), nullable=False),
    Column("returncode", Integer, nullable=True),
    Column("reason", Text, nullable=False, default=""),
    Column("runtime", String(16), nullable=False, default=""),
    Column("container_id", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("ended_at", Float, nullable=True),
    Index("ix_sandboxes_app_status", "app_id", "status"),
)

snapshot_layers = Table(
    "snapshot_layers",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
)
