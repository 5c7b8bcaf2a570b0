"""Writing Queue items: shared by the Queue's operations (``server/state/queues.py``) and
by the store's journaled puts and takes (``Store.accept_queue_put``/``accept_queue_take``,
written again from the journal after a crash), so both give items their ``seq`` from one
counter and keep each partition's count the same way.

A journaled take says how many items it took from the head of a partition, not which:
the writer applies puts and takes in the order they were accepted, so the first ``n``
items it finds are the ones the control plane handed out."""

from __future__ import annotations

import functools
import time
from collections import deque
from typing import Any

import msgspec
from sqlalchemy import Connection, String, and_, bindparam, delete, exists, func, select, update

from . import tables_state as ts
from .hot import Hot, chunks, dbapi_cursor, insert_rows

qp, qi, qr = ts.queue_partitions, ts.queue_items, ts.queue_receipts


class _Part:
    """A partition as a run of journaled operations leaves it (`QueueEntries.apply_run`)."""

    __slots__ = ("db_left", "db_taken", "drop_rest", "expires_at", "had_row", "n", "new")

    def __init__(self, row: Any) -> None:
        self.had_row = row is not None
        self.n: int | None = row[0] if row is not None else None  # its row's count
        self.expires_at: float = row[1] if row is not None else 0.0
        self.db_left = self.n or 0  # items in the table before the run, not taken yet
        self.db_taken = 0  # items of those taken from the head (in order)
        self.drop_rest = False  # the rest of those are deleted (the partition expired)
        self.new: deque[tuple[int, bytes]] = deque()  # (seq, data) put in the run, left


class QueueEntries:
    """Writer-thread only. ``key``: ``{"q": queue id, "p": partition}``."""

    def __init__(self) -> None:
        q, p = bindparam("q", type_=String), bindparam("p", type_=String)
        part = and_(qp.c.queue_id == q, qp.c.partition == p)
        items = and_(qi.c.queue_id == q, qi.c.partition == p)
        # a journaled operation's two checks in one statement (see _fresh)
        self._checks = Hot(
            select(
                exists().where(ts.queues.c.queue_id == q),
                exists().where(qr.c.request_id == bindparam("r")),
            )
        )
        self._partition = Hot(select(qp.c.n_items, qp.c.expires_at).where(part))
        self._queue_there = Hot(select(ts.queues.c.queue_id).where(ts.queues.c.queue_id == q))
        # (built once: SQLAlchemy expands the list of ids when it runs)
        self._used_of = select(qr.c.request_id).where(
            qr.c.request_id.in_(bindparam("rids", expanding=True))
        )
        self._receipt = Hot(
            select(qr.c.taken, qr.c.queue_id).where(qr.c.request_id == bindparam("r"))
        )
        self._insert_receipt = Hot(qr.insert())
        self._insert_items = Hot(qi.insert())
        self._insert_partition = Hot(qp.insert())
        self._set_partition = Hot(
            update(qp)
            .where(part)
            .values(n_items=bindparam("n"), expires_at=bindparam("expires_at"))
        )
        self._set_count = Hot(update(qp).where(part).values(n_items=bindparam("n")))
        first = select(qi.c.seq).where(items).order_by(qi.c.seq).limit(bindparam("n"))
        self._take_items = Hot(
            delete(qi).where(qi.c.seq.in_(first.scalar_subquery())).returning(qi.c.seq, qi.c.data)
        )
        # a take's count: the partition goes when it is left with none, else counts less
        self._drop_emptied = Hot(delete(qp).where(and_(part, qp.c.n_items <= bindparam("k"))))
        self._count_less = Hot(update(qp).where(part).values(n_items=qp.c.n_items - bindparam("k")))
        self._drop_items = Hot(delete(qi).where(items))
        self._drop_partition = Hot(delete(qp).where(part))
        self._seq: int | None = None  # the last item seq given

    def _next_seqs(self, c: Connection, n: int) -> int:
        """Reserve ``n`` item seqs; returns the first."""
        if self._seq is None:
            self._seq = c.execute(select(func.max(qi.c.seq))).scalar() or 0
        first = self._seq + 1
        self._seq += n
        return first

    def partition(self, c: Connection, key: dict, now: float, *, drop: bool = True) -> int | None:
        """The partition's item count, None when it is empty, gone or past its expiry (an
        expired partition is deleted here when ``drop``, before the expiry loop gets to
        it)."""
        row = self._partition(c, key).fetchone()
        if row is None:
            return None
        if row[1] < now:
            if drop:
                self.drop_partition(c, key)
            return None
        return row[0]

    def drop_partition(self, c: Connection, key: dict) -> None:
        self._drop_items(c, key)
        self._drop_partition(c, key)

    def receipt(self, c: Connection, request_id: str) -> Any:
        """``(taken, queue_id)`` of the request carried out with this id, or None."""
        return self._receipt(c, {"r": request_id}).fetchone()

    def keep_receipt(self, c: Connection, qid: str, request_id: str, taken: bytes | None) -> None:
        if request_id:
            row = {"request_id": request_id, "queue_id": qid, "taken": taken}
            self._insert_receipt(c, {**row, "created_at": time.time()})

    def put(
        self, c: Connection, key: dict, items: list[bytes], expires_at: float, have: int | None
    ) -> None:
        """Append ``items``; ``have``: the partition's count (None: it has no row)."""
        first = self._next_seqs(c, len(items))
        qid, part = key["q"], key["p"]
        self._insert_items(
            c,
            [
                {"seq": first + i, "queue_id": qid, "partition": part, "data": data}
                for i, data in enumerate(items)
            ],
        )
        if have is None:
            row = {"queue_id": qid, "partition": part, "n_items": len(items)}
            self._insert_partition(c, {**row, "expires_at": expires_at})
        else:
            self._set_partition(c, {**key, "n": have + len(items), "expires_at": expires_at})

    def _taken(self, c: Connection, key: dict, n: int) -> list[Any]:
        """Delete the first ``n`` items of a partition; returns their ``(seq, data)``."""
        return sorted(self._take_items(c, {**key, "n": n}).fetchall(), key=lambda r: r[0])

    def take(self, c: Connection, key: dict, n: int, have: int) -> tuple[list[bytes], int]:
        """Remove the first ``n`` items of a partition holding ``have``; returns them and
        how many are left."""
        rows = self._taken(c, key, n)
        left = have - len(rows)
        if left <= 0:
            self._drop_partition(c, key)
        else:
            self._set_count(c, {**key, "n": left})
        return [r[1] for r in rows], max(left, 0)

    # ------------------------------------------------------------------ journaled

    def _fresh(self, c: Connection, qid: str, request_id: str) -> bool:
        """Whether a journaled operation is to be applied: its Queue is still there (it
        may have been deleted after the operation was accepted) and its request id was
        not used before (by a request to another Queue, from before a restart)."""
        queue_there, used = self._checks(c, {"q": qid, "r": request_id}).fetchone()
        return bool(queue_there) and not used

    def apply_put(
        self,
        c: Connection,
        key: dict,
        items: list[bytes],
        now: float,
        expires_at: float,
        request_id: str,
    ) -> None:
        """A put the control plane accepted at ``now`` (it found the partition expired
        when ``now`` is past its expiry: so does this)."""
        if not self._fresh(c, key["q"], request_id):
            return
        self.put(c, key, items, expires_at, self.partition(c, key, now))
        self.keep_receipt(c, key["q"], request_id, None)

    def apply_take(self, c: Connection, key: dict, n: int, request_id: str) -> None:
        """A get that handed out the first ``n`` items of the partition."""
        if not self._fresh(c, key["q"], request_id):
            return
        rows = self._taken(c, key, n)
        k = len(rows)  # (as `take`: the partition goes when it has none left)
        if not self._drop_emptied(c, {**key, "k": k}).rowcount and k:
            self._count_less(c, {**key, "k": k})
        if rows:
            items = [r[1] for r in rows]
            self.keep_receipt(c, key["q"], request_id, msgspec.msgpack.encode(items))

    def _used(self, c: Connection, request_ids: list[str]) -> set[str]:
        """Those of the request ids a receipt holds already."""
        if not request_ids:
            return set()
        if c.dialect.name != "sqlite":
            return {r[0] for r in c.execute(self._used_of, {"rids": request_ids})}
        cur, used = dbapi_cursor(c), set[str]()
        for at, size in chunks(len(request_ids)):
            used.update(r[0] for r in cur.execute(_used_sql(size), request_ids[at : at + size]))
        return used

    def apply_run(self, c: Connection, ops: list[tuple]) -> list[None]:
        """Journaled puts (``("put", key, items, now, expires_at, request_id)``) and takes
        (``("take", key, n, request_id)``), in the order accepted: the tables end as
        `apply_put` and `apply_take` one after the other leave them, with one check of
        each Queue and of all the request ids, one read of each partition, and then one
        statement of each kind (a take of items put in the same run never writes
        them). Only consecutive operations of one batch come here: nothing else (a
        deletion, a clear) changes a Queue between them."""
        if len(ops) == 1:
            op = ops[0]
            if op[0] == "put":
                self.apply_put(c, *op[1:])
            else:
                self.apply_take(c, *op[1:])
            return [None]
        used = self._used(c, sorted({op[-1] for op in ops if op[-1]}))
        there: dict[str, bool] = {}
        parts: dict[tuple[str, str], _Part] = {}
        # (request id, queue id, the partition of a take or None, its head items taken
        # from the table: first and count, the items put in the run it took)
        receipts: list[tuple[str, str, _Part | None, int, int, list[bytes]]] = []
        for op in ops:
            key, rid = op[1], op[-1]
            qid = key["q"]
            ok = there.get(qid)
            if ok is None:
                ok = there[qid] = self._queue_there(c, {"q": qid}).fetchone() is not None
            if not ok or (rid and rid in used):  # (as `_fresh`)
                continue
            p = parts.get((qid, key["p"]))
            if p is None:
                p = parts[qid, key["p"]] = _Part(self._partition(c, key).fetchone())
            if op[0] == "put":
                _, _, items, now, expires_at, _ = op
                if p.n is not None and p.expires_at < now:  # expired: dropped (`partition`)
                    p.n, p.db_left, p.drop_rest = None, 0, True
                    p.new.clear()
                first = self._next_seqs(c, len(items))
                p.new.extend((first + i, data) for i, data in enumerate(items))
                p.n = (p.n or 0) + len(items)
                p.expires_at = expires_at
                if rid:
                    used.add(rid)
                    receipts.append((rid, qid, None, 0, 0, []))
                continue
            n = op[2]
            from_db = min(n, p.db_left)
            start = p.db_taken
            p.db_left -= from_db
            p.db_taken += from_db
            from_new = [p.new.popleft()[1] for _ in range(min(n - from_db, len(p.new)))]
            k = from_db + len(from_new)
            if p.n is not None and p.n <= k:  # (as `_drop_emptied`, `_count_less`)
                p.n = None
            elif p.n is not None and k:
                p.n -= k
            if k and rid:
                used.add(rid)
                receipts.append((rid, qid, p, start, from_db, from_new))
        taken: dict[int, list[bytes]] = {}  # id(partition) -> its head items taken
        inserts: list[dict] = []
        for (qid, name), p in parts.items():
            key = {"q": qid, "p": name}
            if p.db_taken:
                taken[id(p)] = [r[1] for r in self._taken(c, key, p.db_taken)]
            if p.drop_rest:
                self._drop_items(c, key)
            inserts += [
                {"seq": seq, "queue_id": qid, "partition": name, "data": data}
                for seq, data in p.new
            ]
            if p.n is None:
                if p.had_row:
                    self._drop_partition(c, key)
            elif p.had_row:
                self._set_partition(c, {**key, "n": p.n, "expires_at": p.expires_at})
            else:
                row = {"queue_id": qid, "partition": name, "n_items": p.n}
                self._insert_partition(c, {**row, "expires_at": p.expires_at})
        insert_rows(c, qi, inserts)
        if receipts:
            now = time.time()
            rows = []
            for rid, qid, tp, start, count, from_new in receipts:
                data = None
                if tp is not None:
                    items = taken.get(id(tp), [])[start : start + count] + from_new
                    data = msgspec.msgpack.encode(items)
                rows.append({"request_id": rid, "queue_id": qid, "taken": data, "created_at": now})
            insert_rows(c, qr, rows)
        return [None] * len(ops)


@functools.cache
def _used_sql(n: int) -> str:
    """`QueueEntries._used` for ``n`` request ids on SQLite (its text compiled once)."""
    return f"SELECT request_id FROM {qr.name} WHERE request_id IN ({', '.join('?' * n)})"
