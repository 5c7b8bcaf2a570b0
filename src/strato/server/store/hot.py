"""Hot statements: on SQLite run on the connection's DB-API cursor, compiled once."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection
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
        cur = c.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        if rows is not None:
            cur.executemany(sql, [[{**held, **p}[k] for k in order] for p in rows])
        else:
            values = {**held, **first} if held else first
            cur.execute(sql, [values[k] for k in order])
        return cur
