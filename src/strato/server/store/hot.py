"""Hot statements: on SQLite run on the connection's DB-API cursor, compiled once."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.sql.expression import Executable


class Hot:
    """A hot statement. On SQLite it runs on the connection's DB-API cursor, compiled once
    (per set of parameter names): SQLAlchemy's execution of an already compiled statement
    costs several times what SQLite takes to run it. Elsewhere it runs as usual. Either
    way it returns something with ``fetchone``, ``fetchall`` and ``rowcount``; ``params``
    is one dict, or a list of them (``executemany``). No Python-side defaults apply."""

    __slots__ = ("_compiled", "stmt")

    def __init__(self, stmt: Executable) -> None:
        self.stmt = stmt
        # names of the parameters -> (SQL, their order, the values the statement holds)
        self._compiled: dict[tuple[str, ...], tuple[str, tuple[str, ...], dict]] = {}

    def __call__(self, c: Connection, params: dict | list[dict] | None = None) -> Any:
        if c.dialect.name != "sqlite":
            return c.execute(self.stmt, params)
        rows = params if isinstance(params, list) else None
        first: dict = (rows[0] if rows else {}) if rows is not None else (params or {})  # type: ignore[assignment]
        names = tuple(first)
        compiled = self._compiled.get(names)
        if compiled is None:
            comp = self.stmt.compile(dialect=c.dialect, column_keys=list(names))  # type: ignore[attr-defined]
            order = tuple(comp.positiontup or ())
            held = {k: v for k, v in comp.params.items() if k not in names}  # (a limit)
            compiled = self._compiled[names] = (str(comp), order, held)
        sql, order, held = compiled
        cur = dbapi_cursor(c)
        if rows is not None:
            if held:
                rows = [{**held, **p} for p in rows]
            cur.executemany(sql, [[p[k] for k in order] for p in rows])
        else:
            values = {**held, **first} if held else first
            cur.execute(sql, [values[k] for k in order])
        return cur


CHUNKS = (128, 32, 8, 1)  # rows per multi-row statement (SQLite allows 32766 parameters)


def chunks(n: int) -> Iterator[tuple[int, int]]:
    """``(start, size)`` of the pieces ``n`` rows go in, for statements of many rows each
    on SQLite: few distinct sizes, so that each text is compiled once and then found in
    the driver's statement cache. A statement with many rows rather than one statement per
    row: the driver lets go of the GIL and takes it back around each statement it runs,
    and the event loop wants the GIL meanwhile."""
    at = 0
    for size in CHUNKS:
        while n - at >= size:
            yield at, size
            at += size


def dbapi_cursor(c: Connection) -> Any:
    return c.connection.dbapi_connection.cursor()  # type: ignore[union-attr]


def insert_rows(c: Connection, table: Table, rows: list[dict], suffix: str = "") -> None:
    """Insert ``rows`` (dicts with the same keys) into ``table``: on SQLite in a few
    statements of many rows each (`chunks`), with ``suffix`` (an ``ON CONFLICT`` clause)
    after the rows; elsewhere as one executemany of ``table.insert()`` (no suffix: pass an
    upsert of the dialect's own there)."""
    if not rows:
        return
    if c.dialect.name != "sqlite":
        assert not suffix, "a suffix is SQLite's text"
        c.execute(table.insert(), rows)
        return
    cols = tuple(rows[0])
    cur = dbapi_cursor(c)
    for at, size in chunks(len(rows)):
        flat = [r[k] for r in rows[at : at + size] for k in cols]
        cur.execute(_insert_sql(table.name, cols, size, suffix), flat)


@functools.lru_cache(maxsize=256)
def _insert_sql(table: str, cols: tuple[str, ...], rows: int, suffix: str) -> str:
    one = "(" + ", ".join("?" * len(cols)) + ")"
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES {', '.join([one] * rows)} {suffix}"


def with_defaults(table: Table) -> dict[str, Any]:
    """The scalar Python-side defaults of ``table``'s columns (a `Hot` insert applies
    none): a row is ``{**with_defaults(table), **row}``."""
    out: dict[str, Any] = {}
    for col in table.c:
        d = col.default
        if d is not None and d.is_scalar:  # type: ignore[attr-defined]
            out[col.name] = d.arg  # type: ignore[attr-defined]
    return out
