"""Schema migrations: an ordered list of steps, each run once, recorded in schema_version.

A new step is appended, never edited. Steps take a SQLAlchemy connection inside a
transaction and must work on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Connection, inspect, select, text

from . import schema


def _v1_initial(conn: Connection) -> None:
    tables = [t for name, t in schema.metadata.tables.items() if name != "schema_version"]
    schema.metadata.create_all(conn, tables=tables)


def _v2_error_type(conn: Connection) -> None:
    """A failure's exception type, kept apart from its message (databases made by v1;
    newer ones have the column from the start)."""
    if "error_type" not in {c["name"] for c in inspect(conn).get_columns("inputs")}:
        conn.execute(text("ALTER TABLE inputs ADD COLUMN error_type TEXT"))


def _v3_journal_applied(conn: Connection) -> None:
    """Where the intake journal's replay starts (databases made before it)."""
    schema.journal_applied.create(conn, checkfirst=True)
    if conn.execute(select(schema.journal_applied.c.seq)).first() is None:
        conn.execute(schema.journal_applied.insert().values(seq=0))


def _v4_call_parents(conn: Connection) -> None:
    """Calls made from inside containers record their parent input and caller app."""
    have = {c["name"] for c in inspect(conn).get_columns("calls")}
    if "parent_input_id" not in have:
        conn.execute(text("ALTER TABLE calls ADD COLUMN parent_input_id BIGINT"))
        conn.execute(text("CREATE INDEX ix_calls_parent_input_id ON calls (parent_input_id)"))
    if "caller_app_id" not in have:
        conn.execute(text("ALTER TABLE calls ADD COLUMN caller_app_id VARCHAR(64)"))


def _v5_shared_state(conn: Connection) -> None:
    """The tables of Dict, Queue, Secret, Volume and schedules (databases made before)."""
    schema.metadata.create_all(conn, checkfirst=True)


# tables whose names were unique across the installation and are now unique per workspace
_NAMED = ("dicts", "queues", "volumes", "secrets")


def _v6_workspaces(conn: Connection) -> None:
    """Workspaces: every existing app, Dict, Queue, Volume and Secret moves to the
    default workspace ``main``, and those names become unique per workspace."""
    from .tables_workspaces import DEFAULT_WORKSPACE, workspaces

    schema.metadata.create_all(conn, tables=[workspaces, schema.metadata.tables["api_tokens"]])
    if conn.execute(select(workspaces.c.name)).first() is None:
        conn.execute(workspaces.insert().values(name=DEFAULT_WORKSPACE, created_at=time.time()))
    add = "ADD COLUMN workspace VARCHAR(64) NOT NULL DEFAULT 'main'"
    if "workspace" not in {c["name"] for c in inspect(conn).get_columns("apps")}:
        conn.execute(text(f"ALTER TABLE apps {add}"))
    for name in _NAMED:
        if "workspace" in {c["name"] for c in inspect(conn).get_columns(name)}:
            continue  # made with the column (and its per-workspace index) from the start
        table = schema.metadata.tables[name]
        if conn.dialect.name == "postgresql":
            conn.execute(text(f"ALTER TABLE {name} {add}"))
            for uc in inspect(conn).get_unique_constraints(name):
                if uc["column_names"] == ["name"]:
                    conn.execute(text(f'ALTER TABLE {name} DROP CONSTRAINT "{uc["name"]}"'))
            for index in table.indexes:
                if index.unique:
                    index.create(conn)
        else:  # SQLite cannot drop a column's UNIQUE: the table is made again
            cols = ", ".join(c.name for c in table.columns if c.name != "workspace")
            conn.execute(text(f"ALTER TABLE {name} RENAME TO {name}_v5"))
            for old in inspect(conn).get_indexes(f"{name}_v5"):
                conn.execute(text(f'DROP INDEX "{old["name"]}"'))
            table.create(conn)
            conn.execute(
                text(f"INSERT INTO {name} ({cols}, workspace) SELECT {cols}, 'main' FROM {name}_v5")
            )
            conn.execute(text(f"DROP TABLE {name}_v5"))


def _v7_snapshot_layers(conn: Connection) -> None:
    """Sandbox snapshots' layers, kept by the blob collector (databases made before)."""
    from .tables_sandboxes import snapshot_layers

    snapshot_layers.create(conn, checkfirst=True)


MIGRATIONS: list[Callable[[Connection], None]] = [
    _v1_initial,
    _v2_error_type,
    _v3_journal_applied,
    _v4_call_parents,
    _v5_shared_state,
    _v6_workspaces,
    _v7_snapshot_layers,
]
LATEST = len(MIGRATIONS)


def current_version(conn: Connection) -> int:
    if not inspect(conn).has_table("schema_version"):
        return 0
    row = conn.execute(select(schema.schema_version.c.version)).first()
    return row[0] if row else 0


def migrate(conn: Connection) -> int:
    """Bring the schema to ``LATEST``; returns the version it started from."""
    schema.schema_version.create(conn, checkfirst=True)
    start = current_version(conn)
    if start > LATEST:
        raise RuntimeError(
            f"the database schema is version {start}, newer than this strato ({LATEST}); "
            "upgrade strato or point STRATO_DATABASE_URL at another database"
        )
    for version in range(start, LATEST):
        MIGRATIONS[version](conn)
    if start == 0:
        conn.execute(schema.schema_version.insert().values(version=LATEST))
    elif start < LATEST:
        conn.execute(schema.schema_version.update().values(version=LATEST))
    return start
