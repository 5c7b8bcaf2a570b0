"""Tables of Dict and Queue (on the shared schema metadata).

A Dict or Queue is a row of ``dicts`` / ``queues`` (``name`` is NULL for an ephemeral
one, which lives while its ``heartbeat_at`` is recent). A Dict's entries are keyed by the
sha256 of their pickled key; ``seq`` orders them for paged iteration and ``accessed_at``
drives their expiry. A Queue's items are ordered by ``seq`` within their partition (``""``
is the default partition); ``queue_partitions`` holds each non-empty partition's item
count and expiry, so that a put checks the limits with one primary-key lookup.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, LargeBinary, String, Table

from .schema import metadata

dicts = Table(
    "dicts",
    metadata,
    Column("dict_id", String(64), primary_key=True),
    Column("name", String(64), nullable=True),  # NULL: ephemeral
    Column("created_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=True),  # ephemeral ones: the last heartbeat
    # a name is unique within its workspace (NULLs never collide)
    Column("workspace", String(64), nullable=False, server_default="main"),
    Index("uq_dicts_workspace_name", "workspace", "name", unique=True),
)

dict_entries = Table(
    "dict_entries",
    metadata,
    Column("dict_id", String(64), primary_key=True),
    Column("key_hash", String(64), primary_key=True),  # sha256 of the pickled key
    Column("seq", BigInteger, nullable=False),
    Column("key", LargeBinary, nullable=False),
    Column("value", LargeBinary, nullable=True),
    Column("value_blob", String(64), nullable=True),  # a large value's blob key
    Column("accessed_at", Float, nullable=False),
    Index("ix_dict_entries_dict_seq", "dict_id", "seq"),
    Index("ix_dict_entries_accessed_at", "accessed_at"),
)

queues = Table(
    "queues",
    metadata,
    Column("queue_id", String(64), primary_key=True),
    Column("name", String(64), nullable=True),  # NULL: ephemeral
    Column("created_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=True),
    # a name is unique within its workspace (NULLs never collide)
    Column("workspace", String(64), nullable=False, server_default="main"),
    Index("uq_queues_workspace_name", "workspace", "name", unique=True),
)

queue_partitions = Table(
    "queue_partitions",
    metadata,
    Column("queue_id", String(64), primary_key=True),
    Column("partition", String(64), primary_key=True),  # "": the default partition
    Column("n_items", Integer, nullable=False),
    Column("expires_at", Float, nullable=False, index=True),
)

queue_items = Table(
    "queue_items",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("queue_id", String(64), nullable=False),
    Column("partition", String(64), nullable=False),
    Column("data", LargeBinary, nullable=False),
    Index("ix_queue_items_queue_partition_seq", "queue_id", "partition", "seq"),
)

queue_receipts = Table(
    "queue_receipts",
    metadata,
    # what a put or get with this request id did, so that a request sent again (its
    # answer was lost: the control plane was killed) neither adds nor takes items twice
    Column("request_id", String(64), primary_key=True),
    Column("queue_id", String(64), nullable=False),
    Column("taken", LargeBinary, nullable=True),  # a get's items (msgpack); NULL: a put
    Column("created_at", Float, nullable=False, index=True),
)
