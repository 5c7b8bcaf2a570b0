"""Storing Dict entries: shared by the Dict's operations (``server/state/dicts.py``) and
by the store's journaled puts (``Store.accept_dict_put``, written again from the journal
after a crash), so both give new keys their ``seq`` from one counter."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from . import tables_state as ts
from .hot import Hot, insert_rows


class DictEntries:
    """Writer-thread only."""

    def __init__(self) -> None:
        e = ts.dict_entries.c
        where = and_(e.dict_id == bindparam("d"), e.key_hash == bindparam("h"))
        self._dict = Hot(select(ts.dicts.c.dict_id).where(ts.dicts.c.dict_id == bindparam("d")))
        self._has = Hot(select(e.accessed_at).where(where))
        self._set = Hot(
            update(ts.dict_entries)
            .where(where)
            .values(value=bindparam("v"), value_blob=bindparam("b"), accessed_at=bindparam("now"))
        )
        self._insert = Hot(ts.dict_entries.insert())
        self._upserts: dict[str, Hot] = {}  # per dialect (see put_run)
        self._seq: int | None = None  # the last entry seq given

    def _next_seq(self, c: Connection) -> int:
        if self._seq is None:
            self._seq = c.execute(select(func.max(ts.dict_entries.c.seq))).scalar() or 0
        self._seq += 1
        return self._seq

    def dict_exists(self, c: Connection, dict_id: str) -> bool:
        return self._dict(c, {"d": dict_id}).fetchone() is not None

    def put(
        self,
        c: Connection,
        dict_id: str,
        rows: list[Any],
        now: float,
        skip_fresh_since: float | None = None,
    ) -> int:
        """Store ``rows`` (``(key_hash, key, value, blob)`` each, in order: a later one of
        the same key wins); returns how many were stored. With ``skip_fresh_since``, a key
        whose entry was accessed since then is skipped (``skip_if_exists``: an older one
        has expired, so it is not there)."""
        stored = 0
        for kh, key, value, blob in rows:
            where = {"d": dict_id, "h": kh}
            had = self._has(c, where).fetchone()
            if had is not None:
                if skip_fresh_since is not None and had[0] >= skip_fresh_since:
                    continue
                self._set(c, {**where, "v": value, "b": blob, "now": now})
            else:
                self._insert(c, self._row(c, dict_id, kh, key, value, blob, now))
            stored += 1
        return stored

    def _row(
        self, c: Connection, dict_id: str, kh: bytes, key: bytes, value: Any, blob: Any, now: float
    ) -> dict[str, Any]:
        """A new entry's row (with the next seq)."""
        return {
            "dict_id": dict_id,
            "key_hash": kh,
            "seq": self._next_seq(c),
            "key": key,
            "value": value,
            "value_blob": blob,
            "accessed_at": now,
        }

    def _upsert(self, c: Connection) -> Hot:
        """An entry written whether its key is there or not (a new key gets its seq; a
        key there keeps its own, the seq given to it goes unused)."""
        name = c.dialect.name
        hot = self._upserts.get(name)
        if hot is None:
            insert = sqlite_insert if name == "sqlite" else pg_insert
            stmt = insert(ts.dict_entries)
            ex = stmt.excluded
            changed = {col: ex[col] for col in ("value", "value_blob", "accessed_at")}
            stmt = stmt.on_conflict_do_update(index_elements=["dict_id", "key_hash"], set_=changed)
            hot = self._upserts[name] = Hot(stmt)
        return hot

    def put_run(self, c: Connection, puts: list[tuple[str, list[Any], float]]) -> list[int]:
        """Journaled puts ``(dict_id, rows, now)``, in order, as `put` one after the other
        would store them (each into a Dict still there; a later entry of a key wins);
        returns how many entries each stored. One check per Dict and one statement for
        all the entries."""
        there: dict[str, bool] = {}
        params: list[dict] = []
        stored: list[int] = []
        for dict_id, rows, now in puts:
            ok = there.get(dict_id)
            if ok is None:
                ok = there[dict_id] = self.dict_exists(c, dict_id)
            if not ok:  # deleted after the put was accepted
                stored.append(0)
                continue
            params.extend(self._row(c, dict_id, kh, k, v, b, now) for kh, k, v, b in rows)
            stored.append(len(rows))
        if c.dialect.name == "sqlite":  # (as `_upsert`, in statements of many entries)
            insert_rows(c, ts.dict_entries, params, _SQLITE_UPSERT)
        elif params:
            self._upsert(c)(c, params)
        return stored


_SQLITE_UPSERT = (
    "ON CONFLICT (dict_id, key_hash) DO UPDATE SET value = excluded.value, "
    "value_blob = excluded.value_blob, accessed_at = excluded.accessed_at"
)
