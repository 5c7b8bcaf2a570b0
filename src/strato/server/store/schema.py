"""Tables of the control plane's state (SQLAlchemy Core; SQLite or PostgreSQL)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, nullable=False),
)

apps = Table(
    "apps",
    metadata,
    Column("app_id", String(64), primary_key=True),
    Column("name", String(255), nullable=True),
    Column("state", String(16), nullable=False),  # ephemeral | deployed | stopped
    Column("created_at", Float, nullable=False),
    Column("stopped_at", Float, nullable=True),
    Column("workspace", String(64), nullable=False, server_default="main"),
    Index("ix_apps_name_state", "name", "state"),
)

functions = Table(
    "functions",
    metadata,
    Column("function_id", String(64), primary_key=True),
    Column("app_id", String(64), nullable=False, index=True),
    Column("name", String(255), nullable=False),
    Column("spec", LargeBinary, nullable=False),  # msgpack FunctionSpec
    Column("created_at", Float, nullable=False),
)

mounts = Table(
    "mounts",
    metadata,
    Column("mount_id", String(80), primary_key=True),
    Column("manifest", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
)

calls = Table(
    "calls",
    metadata,
    Column("call_id", String(64), primary_key=True),
    Column("function_id", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("method", String(255), nullable=True),
    Column("n_inputs", Integer, nullable=False),
    Column("closed", Boolean, nullable=False),
    Column("cancelled", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False, index=True),
    # a call made from inside a container: the input that made it, and that app
    Column("parent_input_id", BigInteger, nullable=True, index=True),
    Column("caller_app_id", String(64), nullable=True),
)

inputs = Table(
    "inputs",
    metadata,
    Column("input_id", BigInteger, primary_key=True, autoincrement=False),
    Column("call_id", String(64), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("args", LargeBinary, nullable=True),
    Column("args_blob", String(64), nullable=True),
    Column("status", String(16), nullable=False),  # pending | done
    Column("attempts", Integer, nullable=False, default=0),
    Column("retry_at", Float, nullable=True),
    Column("out_status", String(16), nullable=True),
    Column("output", LargeBinary, nullable=True),
    Column("output_blob", String(64), nullable=True),
    Column("error", Text, nullable=True),
    Column("error_type", Text, nullable=True),  # the exception's type, apart from its text
    Column("traceback", Text, nullable=True),
    Column("done_seq", BigInteger, nullable=True),
    Column("done_at", Float, nullable=True),
    UniqueConstraint("call_id", "idx", name="uq_inputs_call_idx"),
    Index("ix_inputs_call_seq", "call_id", "done_seq"),
)

gen_items = Table(
    "gen_items",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("call_id", String(64), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("gen_index", Integer, nullable=False),
    Column("data", LargeBinary, nullable=True),
    Column("blob", String(64), nullable=True),
    Index("ix_gen_items_call_seq", "call_id", "seq"),
)

nodes = Table(
    "nodes",
    metadata,
    Column("node_id", String(64), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("info", LargeBinary, nullable=False),
    Column("state", String(16), nullable=False),
    Column("last_heartbeat", Float, nullable=False),
)

containers = Table(
    "containers",
    metadata,
    Column("container_id", String(64), primary_key=True),
    Column("app_id", String(64), nullable=False, index=True),
    Column("function_id", String(64), nullable=False),
    Column("node_id", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("stopped_at", Float, nullable=True),
    Column("exit_reason", Text, nullable=True),
)

logs = Table(
    "logs",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("app_id", String(64), nullable=False),
    Column("ts", Float, nullable=False),
    Column("container_id", String(64), nullable=False),
    Column("stream", String(8), nullable=False),
    Column("text", Text, nullable=False),
    Index("ix_logs_app_seq", "app_id", "seq"),
)

journal_applied = Table(
    "journal_applied",
    metadata,
    # the last intake-journal entry whose rows are in the database (one row)
    Column("seq", BigInteger, nullable=False),
)

# Tables of the shared-state objects, each in its own module on this metadata.
from . import (  # noqa: E402,F401
    tables_sandboxes,
    tables_schedules,
    tables_secrets,
    tables_state,
    tables_usage,
    tables_volumes,
    tables_workspaces,
)
