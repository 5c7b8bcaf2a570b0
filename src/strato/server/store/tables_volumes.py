"""Tables of Volume (on the shared schema metadata).

``volumes``: one row per volume (named, or ephemeral with no name), with the version its
latest commit made and the bytes and files it holds. ``volume_files``: the latest
manifest, one row per file (its blocks are content-addressed blobs, space-separated; a
file of at most 4 KiB is kept inline instead).
A commit rewrites the rows of the files it changes and bumps the version, in one
transaction.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, LargeBinary, String, Table, Text

from .schema import metadata

volumes = Table(
    "volumes",
    metadata,
    Column("volume_id", String(64), primary_key=True),
    Column("name", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("version", BigInteger, nullable=False, default=0),
    Column("size", BigInteger, nullable=False, default=0),
    Column("n_files", BigInteger, nullable=False, default=0),
    # a name is unique within its workspace (NULLs never collide)
    Column("workspace", String(64), nullable=False, server_default="main"),
    Index("uq_volumes_workspace_name", "workspace", "name", unique=True),
)

volume_files = Table(
    "volume_files",
    metadata,
    Column("volume_id", String(64), primary_key=True),
    Column("path", String(4096), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("mode", Integer, nullable=False),
    Column("mtime", Float, nullable=False),
    Column("blocks", Text, nullable=False),  # sha256 keys, space-separated, in order
    Column("data", LargeBinary, nullable=True),  # the content of a small file, inline
    Column("version", BigInteger, nullable=False),  # the commit that wrote it
)
