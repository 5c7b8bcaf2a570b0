"""Writing Queue items: shared by the Queue's operations (``server/state/queues.py``) and
by the store's journaled puts and takes (``Store.accept_queue_put``/``accept_queue_take``,
written again from the journal after a crash), so both give items their ``seq`` from one
counter and keep each partition's count the same way.

A journaled take says how many items it took from the head of a partition, not which:
the writer applies puts and takes in the order they were accepted, so the first ``n``
items it finds are the ones the control plane handed out."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from sqlalchemy import Connection, String, and_, bindparam, delete, exists, func, select, update

from . import tables_state as ts
from .hot import Hot

qp, qi, qr = ts.queue_partitions, ts.queue_items, ts.queue_receipts


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
