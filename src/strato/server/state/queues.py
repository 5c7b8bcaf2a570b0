"""Queue: FIFO partitions of pickled items, each item handed to exactly one consumer.

Every operation runs on the store's writer thread (``db.py``), one at a time: a ``get``
reads and deletes the first items of its partition in one transaction, so two consumers
never receive the same item, and the control plane answers only after the commit, so a
SIGKILL loses no acknowledged put and hands out no item twice. A ``get`` that finds its
partition empty waits on the partition's signal (``signals.py``), which a ``put`` pulses
as soon as its write is queued; a ``put`` into a full partition waits likewise for a
``get`` to make room. Partitions expire ``partition_ttl`` seconds after their last put.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from sqlalchemy import Connection, String, and_, bindparam, delete, func, select, update

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.server.store import tables_state as ts
from strato.server.store.hot import Hot

from .db import RESPONSE_BYTES, StateDb, fitting
from .names import check_id, check_partition
from .objects import NamedObjects
from .signals import Key, Signals

T = TypeVar("T")
MAX_WAIT_S = 55.0  # the longest one request waits (the client asks again for longer)
ITERATE_PAGE = 100
RECEIPT_S = 600.0  # how long a request id is remembered (a client retries for 30 s)

qp, qi, qr = ts.queue_partitions, ts.queue_items, ts.queue_receipts


class _Sql:
    """The hot statements, built once (building one costs more than running it)."""

    def __init__(self) -> None:
        q, p = bindparam("q", type_=String), bindparam("p", type_=String)
        part = and_(qp.c.queue_id == q, qp.c.partition == p)
        items = and_(qi.c.queue_id == q, qi.c.partition == p)
        self.partition = Hot(select(qp.c.n_items, qp.c.expires_at).where(part))
        self.receipt = Hot(
            select(qr.c.taken, qr.c.queue_id).where(qr.c.request_id == bindparam("r"))
        )
        self.insert_receipt = Hot(qr.insert())
        self.insert_items = Hot(qi.insert())
        self.insert_partition = Hot(qp.insert())
        self.set_partition = Hot(
            update(qp)
            .where(part)
            .values(n_items=bindparam("n"), expires_at=bindparam("expires_at"))
        )
        self.set_count = Hot(update(qp).where(part).values(n_items=bindparam("n")))
        self.first_items = Hot(
            select(qi.c.seq, qi.c.data).where(items).order_by(qi.c.seq).limit(bindparam("n"))
        )
        self.take_items = Hot(delete(qi).where(and_(items, qi.c.seq <= bindparam("last"))))
        self.items_after = Hot(
            select(qi.c.seq, qi.c.data)
            .where(and_(items, qi.c.seq > bindparam("after")))
            .order_by(qi.c.seq)
            .limit(bindparam("n"))
        )
        size = func.length(qi.c.data)
        self.sizes = Hot(
            select(qi.c.seq, size).where(items).order_by(qi.c.seq).limit(bindparam("n"))
        )
        self.sizes_after = Hot(
            select(qi.c.seq, size)
            .where(and_(items, qi.c.seq > bindparam("after")))
            .order_by(qi.c.seq)
            .limit(ITERATE_PAGE)
        )
        self.drop_items = Hot(delete(qi).where(items))
        self.drop_partition = Hot(delete(qp).where(part))
        self.n_partitions = Hot(select(func.count()).select_from(qp).where(qp.c.queue_id == q))
        self.total = Hot(
            select(func.sum(qp.c.n_items)).where(
                and_(qp.c.queue_id == q, qp.c.expires_at >= bindparam("now"))
            )
        )


def _shown(partition: str) -> str:
    return "the default partition" if partition == "" else f"partition {partition!r}"


class Queues:
    def __init__(self, db: StateDb) -> None:
        self.db = db
        self.objects = NamedObjects("Queue", db, ts.queues, [qi, qp, qr])
        self.signals = Signals()  # ("items" | "room", queue_id, partition)
        self._seq: int | None = None  # the last item seq given (writer thread only)
        self.sql = _Sql()

    # ------------------------------------------------------------------ writer-thread parts

    def _next_seqs(self, c: Connection, n: int) -> int:
        """Reserve ``n`` item seqs; returns the first."""
        if self._seq is None:
            self._seq = c.execute(select(func.max(qi.c.seq))).scalar() or 0
        first = self._seq + 1
        self._seq += n
        return first

    def _partition(self, c: Connection, key: dict, now: float) -> int | None:
        """The partition's item count, None when it is empty or gone (an expired partition
        is deleted here, before its expiry loop gets to it). ``key``: ``q`` and ``p``."""
        row = self.sql.partition(c, key).fetchone()
        if row is None:
            return None
        if row[1] < now:
            self._drop_partition(c, key)
            return None
        return row[0]

    def _receipt(self, c: Connection, qid: str, request_id: str) -> tuple[bool, bytes | None]:
        """Whether a request with this id was carried out already, and a get's items."""
        if not request_id:
            return False, None
        row = self.sql.receipt(c, {"r": request_id}).fetchone()
        if row is None:
            return False, None
        if row[1] != qid:
            raise exc.InvalidError(
                f"request id {request_id!r} was used for another Queue: send a new one"
            )
        return True, row[0]

    def _keep_receipt(self, c: Connection, qid: str, request_id: str, items: bytes | None) -> None:
        if request_id:
            self.sql.insert_receipt(
                c,
                {
                    "request_id": request_id,
                    "queue_id": qid,
                    "taken": items,
                    "created_at": time.time(),
                },
            )

    def _drop_partition(self, c: Connection, key: dict) -> None:
        self.sql.drop_items(c, key)
        self.sql.drop_partition(c, key)

    # ------------------------------------------------------------------ put / get

    async def put(self, qid: str, body: m.QueuePut) -> m.QueuePutResult:
        check_id("Queue", qid)
        part = check_partition(body.partition)
        items = body.items
        for item in items:
            if len(item) > m.QUEUE_ITEM_MAX_BYTES:
                raise exc.RequestSizeError(
                    f"a Queue item pickles to {len(item)} bytes, over the limit of 1 MiB "
                    f"({m.QUEUE_ITEM_MAX_BYTES} bytes) per item: put large data in a Dict "
                    "or a Volume and queue its key"
                )
        if not items:
            return m.QueuePutResult(True)
        ttl = body.partition_ttl
        rid = body.request_id
        key = {"q": qid, "p": part}

        def run(c: Connection) -> str | None:
            if self._receipt(c, qid, rid)[0]:
                return None  # this put was carried out; its answer was lost
            now = time.time()
            have = self._partition(c, key, now)
            if have is None:
                self.objects.exists(c, qid)
                n_parts = self.sql.n_partitions(c, {"q": qid}).fetchone()[0] or 0
                if n_parts >= m.QUEUE_MAX_PARTITIONS:
                    raise exc.InvalidError(
                        f"Queue {qid} has {n_parts} partitions, the limit of "
                        f"{m.QUEUE_MAX_PARTITIONS:,} partitions per Queue: a new partition "
                        "fits once one is emptied, cleared or expires"
                    )
            if (have or 0) + len(items) > m.QUEUE_PARTITION_MAX_ITEMS:
                return (
                    f"{_shown(part)} of Queue {qid} holds {have or 0} items: {len(items)} more "
                    f"would pass the limit of {m.QUEUE_PARTITION_MAX_ITEMS:,} items per partition"
                )
            first = self._next_seqs(c, len(items))
            self.sql.insert_items(
                c,
                [
                    {"seq": first + i, "queue_id": qid, "partition": part, "data": data}
                    for i, data in enumerate(items)
                ],
            )
            if have is None:
                self.sql.insert_partition(
                    c,
                    {
                        "queue_id": qid,
                        "partition": part,
                        "n_items": len(items),
                        "expires_at": now + ttl,
                    },
                )
            else:
                self.sql.set_partition(c, {**key, "n": have + len(items), "expires_at": now + ttl})
            self._keep_receipt(c, qid, rid, None)
            return None

        def attempt():
            w = self.db.submit("Queue put", run)
            # a get queued after this sees them: wake one waiting get per item, and readers
            self.signals.pulse(("items", qid, part), len(items))
            self.signals.pulse(("peek", qid, part))
            return w

        reason = await self._until(("room", qid, part), body.timeout, attempt, lambda r: r is None)
        return m.QueuePutResult(reason is None, reason or "")

    async def get(self, qid: str, body: m.QueueGet) -> m.QueueItems:
        check_id("Queue", qid)
        part = check_partition(body.partition)
        n = min(body.n, m.QUEUE_PARTITION_MAX_ITEMS)
        rid = body.request_id
        key = {"q": qid, "p": part}

        def run(c: Connection) -> tuple[list[bytes], int]:
            done, kept = self._receipt(c, qid, rid)
            if done:  # this get was carried out; its answer was lost: the same items
                return msgspec.msgpack.decode(kept or b"\x90", type=list[bytes]), 0
            have = self._partition(c, key, time.time())
            if have is None:
                self.objects.exists(c, qid)
                return [], 0
            take = n
            if take * m.QUEUE_ITEM_MAX_BYTES > RESPONSE_BYTES:  # may not fit in one answer
                take = fitting(self.sql.sizes(c, {**key, "n": n}).fetchall())
            rows = self.sql.first_items(c, {**key, "n": take}).fetchall()
            if rows:
                self.sql.take_items(c, {**key, "last": rows[-1][0]})
            left = have - len(rows)
            if left <= 0:
                self.sql.drop_partition(c, key)
            else:
                self.sql.set_count(c, {**key, "n": left})
            items = [r[1] for r in rows]
            if items:
                self._keep_receipt(c, qid, rid, msgspec.msgpack.encode(items))
            return items, max(left, 0)

        items, left = await self._until(
            ("items", qid, part),
            body.timeout,
            lambda: self.db.submit("Queue get", run),
            lambda r: bool(r[0]),
        )
        if items:
            self.signals.pulse(("room", qid, part))
            if left:
                self.signals.pulse(("items", qid, part), 1)  # items are left: the next
        return m.QueueItems(items)

    async def _until(
        self,
        key: Key,
        timeout: float,
        attempt: Callable[[], Awaitable[T]],
        done: Callable[[T], bool],
    ) -> T:
        """``await attempt()`` until ``done(result)``, waiting on the signal ``key`` between
        tries, for at most ``timeout`` seconds (``MAX_WAIT_S`` at most)."""
        deadline = time.monotonic() + min(timeout, MAX_WAIT_S)
        sig = self.signals.acquire(key)
        try:
            while True:
                version = sig.version
                result = await attempt()
                if done(result):
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    return result
                await sig.wait(version, left)
        finally:
            self.signals.release(key, sig)

    # ------------------------------------------------------------------ the rest

    async def length(self, qid: str, partition: str, total: bool) -> int:
        check_id("Queue", qid)
        part = check_partition(partition)

        def run(c: Connection) -> int:
            self.objects.exists(c, qid)
            now = time.time()
            if total:
                return int(self.sql.total(c, {"q": qid, "now": now}).fetchone()[0] or 0)
            return self._partition(c, {"q": qid, "p": part}, now) or 0

        return await self.db.run("Queue len", run)

    async def clear(self, qid: str, body: m.QueueClear) -> None:
        check_id("Queue", qid)
        part = check_partition(body.partition)

        def run(c: Connection) -> None:
            self.objects.exists(c, qid)
            if body.all:
                c.execute(delete(qi).where(qi.c.queue_id == qid))
                c.execute(delete(qp).where(qp.c.queue_id == qid))
            else:
                self._drop_partition(c, {"q": qid, "p": part})

        await self.db.run("Queue clear", run)
        self.signals.pulse_where(lambda k: k[0] == "room" and k[1] == qid)

    async def peek(self, qid: str, partition: str, after: int, timeout: float) -> m.QueueItems:
        """Items after seq ``after`` without removing them (``Queue.iterate``), waiting
        up to ``timeout`` for one when there are none."""
        check_id("Queue", qid)
        part = check_partition(partition)

        def run(c: Connection) -> tuple[list[bytes], int]:
            key = {"q": qid, "p": part}
            if self._partition(c, key, time.time()) is None:
                self.objects.exists(c, qid)
                return [], after
            sizes = self.sql.sizes_after(c, {**key, "after": after}).fetchall()
            take = fitting(sizes)
            rows = self.sql.items_after(c, {**key, "after": after, "n": take}).fetchall()
            return [r[1] for r in rows], (rows[-1][0] if rows else after)

        items, cursor = await self._until(
            ("peek", qid, part),
            timeout,
            lambda: self.db.submit("Queue iterate", run),
            lambda r: bool(r[0]),
        )
        return m.QueueItems(items, cursor)

    def deleted(self, qid: str) -> None:
        """Wake everyone waiting on a deleted queue (they find it gone)."""
        self.signals.pulse_where(lambda k: k[1] == qid)

    def expire_op(self, now: float):
        """An operation deleting partitions past their TTL (and old request receipts);
        returns how many partitions."""

        def run(c: Connection) -> int:
            c.execute(delete(qr).where(qr.c.created_at < now - RECEIPT_S))
            gone = c.execute(select(qp.c.queue_id, qp.c.partition).where(qp.c.expires_at < now))
            parts = gone.all()
            for qid, part in parts:
                self._drop_partition(c, {"q": qid, "p": part})
            return len(parts)

        return run
