"""Tables of workspaces and their API tokens (on the shared schema metadata).

``workspaces``: one row per workspace; ``main`` is made by the migration that brought
workspaces in (every earlier row belongs to it), and is the embedded default's only one.
``api_tokens``: one row per token of a workspace (``st_<token_id>_<secret>``), with its
role and the sha256 of its secret, never the secret itself (``server/workspaces.py``).
The installation's own token (``$STRATO_HOME/token``) is not a row: it is the operator's.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Float, LargeBinary, String, Table

from .schema import metadata

DEFAULT_WORKSPACE = "main"

workspaces = Table(
    "workspaces",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("token_id", String(32), primary_key=True),
    Column("workspace", String(64), nullable=False, index=True),
    Column("role", String(16), nullable=False),  # admin | developer | read-only
    Column("name", String(64), nullable=False),
    Column("secret_sha256", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
)
