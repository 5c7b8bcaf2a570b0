"""Hot statements of Dict and Queue (``store/hot.py``): on SQLite they run on the
DB-API cursor, inside the same transaction as the rest (a rollback takes them back), with
the values a statement holds (a LIMIT) and with many rows at once."""

from __future__ import annotations

from sqlalchemy import and_, bindparam, select

from strato.server.store import Store
from strato.server.store import tables_state as ts
from strato.server.store.hot import Hot


def test_hot_statements_run_in_the_transaction(db_url):
    store = Store(db_url, journal=False)
    e = ts.dict_entries.c
    insert = Hot(ts.dict_entries.insert())
    where = and_(e.dict_id == bindparam("d"), e.key_hash == bindparam("h"))
    one = Hot(select(e.value, e.seq).where(where))
    first_two = Hot(select(e.seq).where(e.dict_id == bindparam("d")).order_by(e.seq).limit(2))

    def row(i: int, did: str = "di-hot") -> dict:
        return {
            "dict_id": did,
            "key_hash": f"h{i}",
            "seq": i,
            "key": b"k%d" % i,
            "value": b"v%d" % i,
            "value_blob": None,
            "accessed_at": 1.0,
        }

    try:
        with store.engine.connect() as c:
            with c.begin():
                insert(c, row(1))
                insert(c, [row(2), row(3), row(4)])
            assert tuple(one(c, {"d": "di-hot", "h": "h3"}).fetchone()) == (b"v3", 3)
            assert [r[0] for r in first_two(c, {"d": "di-hot"}).fetchall()] == [1, 2]
            c.rollback()  # (PostgreSQL: the reads began one)
            tx = c.begin()
            insert(c, row(5, "di-gone"))
            tx.rollback()
            assert one(c, {"d": "di-gone", "h": "h5"}).fetchone() is None
            c.rollback()
    finally:
        store.close()
