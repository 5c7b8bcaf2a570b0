"""Queue: FIFO partitions of pickled items, each item handed to exactly one consumer.

Every operation that is not served from memory runs on the store's writer thread
(``db.py``), one at a time: a ``get`` reads and deletes the first items of its partition
in one transaction, so two consumers never receive the same item, and the control plane
answers only after the commit, so a SIGKILL loses no acknowledged put and hands out no
item twice. With the store's journal, a Queue in use is loaded into memory
(``queue_memory.py``) and its puts and gets are decided there, on the event loop (so one
at a time too), journaled before they are answered and applied by the writer behind
(``store/queue_entries.py``). A ``get`` that finds its partition empty waits on the
partition's signal (``signals.py``), which a ``put`` pulses as soon as its write is
queued; a ``put`` into a full partition waits likewise for a ``get`` to make room.
Partitions expire ``partition_ttl`` seconds after their last put.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from sqlalchemy import Connection, String, and_, bindparam, delete, func, select

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.server.store import tables_state as ts
from strato.server.store.hot import Hot

from .db import RESPONSE_BYTES, StateDb, fitting
from .names import check_id, check_partition
from .objects import NamedObjects
from .queue_memory import PART_BYTES, RECEIPT_MEMORY_S, Loaded, Part, QueueMemory
from .signals import Key, Signals

T = TypeVar("T")
MAX_WAIT_S = 55.0  # the longest one request waits (the client asks again for longer)
ITERATE_PAGE = 100
RECEIPT_S = 600.0  # how long a request id is remembered (a client retries for 30 s)

qp, qi, qr = ts.queue_partitions, ts.queue_items, ts.queue_receipts


class _Sql:
    """The hot reads, built once (building one costs more than running it)."""

    def __init__(self) -> None:
        q, p = bindparam("q", type_=String), bindparam("p", type_=String)
        items = and_(qi.c.queue_id == q, qi.c.partition == p)
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
        self.n_partitions = Hot(select(func.count()).select_from(qp).where(qp.c.queue_id == q))
        self.total = Hot(
            select(func.sum(qp.c.n_items)).where(
                and_(qp.c.queue_id == q, qp.c.expires_at >= bindparam("now"))
            )
        )


def _shown(partition: str) -> str:
    return "the default partition" if partition == "" else f"partition {partition!r}"


def _other_queue(request_id: str) -> exc.InvalidError:
    return exc.InvalidError(f"request id {request_id!r} was used for another Queue: send a new one")


def _too_many_partitions(qid: str, n_parts: int) -> exc.InvalidError:
    return exc.InvalidError(
        f"Queue {qid} has {n_parts} partitions, the limit of {m.QUEUE_MAX_PARTITIONS:,} "
        "partitions per Queue: a new partition fits once one is emptied, cleared or expires"
    )


def _full(qid: str, part: str, have: int, more: int) -> str:
    return (
        f"{_shown(part)} of Queue {qid} holds {have} items: {more} more would pass the "
        f"limit of {m.QUEUE_PARTITION_MAX_ITEMS:,} items per partition"
    )


class _Store:
    """A put the memory cannot take (``_put_memory``): the store serves it."""


_STORE = _Store()


class Queues:
    def __init__(self, db: StateDb) -> None:
        self.db = db
        self.objects = NamedObjects("Queue", db, ts.queues, [qi, qp, qr])
        self.signals = Signals()  # ("items" | "room", queue_id, partition)
        self.sql = _Sql()
        self.entries = db.store.queue_entries
        self.memory = QueueMemory()
        self.objects.changing = self.memory.unload_all  # a deletion is being queued
        self._loading: dict[str, asyncio.Future[None]] = {}

    # ------------------------------------------------------------------ writer-thread parts

    def _receipt(self, c: Connection, qid: str, request_id: str) -> tuple[bool, bytes | None]:
        """Whether a request with this id was carried out already, and a get's items."""
        if not request_id:
            return False, None
        row = self.entries.receipt(c, request_id)
        if row is None:
            return False, None
        if row[1] != qid:
            raise _other_queue(request_id)
        return True, row[0]

    def _read_all(self, c: Connection, qid: str) -> tuple[list, list, list] | None:
        """A Queue's partitions, items and recent request ids (None: too big to load)."""
        self.objects.exists(c, qid)
        where = qi.c.queue_id == qid
        size = c.execute(select(func.sum(func.length(qi.c.data))).where(where)).scalar()
        if (size or 0) > self.memory.budget:
            return None
        parts = c.execute(select(qp.c.partition, qp.c.expires_at).where(qp.c.queue_id == qid))
        items = c.execute(select(qi.c.partition, qi.c.data).where(where).order_by(qi.c.seq))
        since = time.time() - RECEIPT_MEMORY_S
        receipts = c.execute(
            select(qr.c.request_id, qr.c.created_at).where(
                qr.c.queue_id == qid, qr.c.created_at >= since
            )
        )
        return [tuple(r) for r in parts], [tuple(r) for r in items], [tuple(r) for r in receipts]

    # ------------------------------------------------------------------ memory

    async def _hot(self, qid: str) -> Loaded | None:
        """The Queue in memory, loaded first if need be; None: the store serves it."""
        if not self.db.store.journaled:
            return None
        mem = self.memory
        while True:
            q = mem.queues.get(qid)
            if q is not None:
                return q
            loading = self._loading.get(qid)
            if loading is None:
                break
            await asyncio.shield(loading)
        if not mem.may_load(qid):
            return None
        done = self._loading[qid] = asyncio.get_running_loop().create_future()
        changes = mem.changes
        try:
            got = await self.db.read("Queue load", lambda c: self._read_all(c, qid))
        finally:
            del self._loading[qid]
            done.set_result(None)
        if got is None:
            mem.cold(qid)
            return None
        if mem.changes != changes:  # it changed meanwhile: the next operation loads it
            return None
        return mem.load(qid, *got)

    def _live(self, q: Loaded, qid: str, part: str, now: float) -> Part | None:
        """A partition in memory, None when it is empty; one past its expiry is dropped
        here, and in the store behind (as the store's operations drop one they find)."""
        p = q.parts.get(part)
        if p is not None and p.expires_at < now:
            self.db.store.accept_queue_take(qid, part, len(p.items), "")
            self.memory.taken(q, part, p, len(p.items))
            return None
        return p

    def _put_memory(
        self, q: Loaded, qid: str, part: str, items: list[bytes], ttl: float, rid: str
    ) -> str | None | _Store:
        mem = self.memory
        if rid and (seen := mem.receipt(rid)) is not None:
            if seen != qid:
                raise _other_queue(rid)
            return None  # this put was carried out; its answer was lost
        now = time.time()
        p = self._live(q, qid, part, now)
        if p is None and len(q.parts) >= m.QUEUE_MAX_PARTITIONS:
            raise _too_many_partitions(qid, len(q.parts))
        have = len(p.items) if p is not None else 0
        if have + len(items) > m.QUEUE_PARTITION_MAX_ITEMS:
            return _full(qid, part, have, len(items))
        if not mem.fits(sum(map(len, items)) + PART_BYTES):
            mem.cold(qid)
            return _STORE
        self.db.store.accept_queue_put(qid, part, items, now, now + ttl, rid)
        if p is None:
            p = q.parts[part] = Part(now + ttl)
        p.expires_at = now + ttl
        mem.added(q, p, items)
        mem.keep_receipt(rid, qid)
        return None

    async def _get_memory(
        self, q: Loaded, qid: str, part: str, n: int, rid: str
    ) -> tuple[list[bytes], int]:
        mem = self.memory
        if rid and (seen := mem.receipt(rid)) is not None:
            if seen != qid:
                raise _other_queue(rid)
            row = await self.db.read("Queue receipt", lambda c: self.entries.receipt(c, rid))
            kept = row[0] if row is not None else None
            return msgspec.msgpack.decode(kept or b"\x90", type=list[bytes]), 0
        p = self._live(q, qid, part, time.time())
        if p is None:
            return [], 0
        return self._take_memory(q, qid, part, p, n, rid)

    def _take_memory(
        self, q: Loaded, qid: str, part: str, p: Part, n: int, rid: str
    ) -> tuple[list[bytes], int]:
        """Take up to ``n`` items of a live partition in memory (journaled)."""
        mem = self.memory
        k = total = 0
        for data in p.items:  # what fits in one answer (at least one item)
            total += len(data)
            if k == n or (total > RESPONSE_BYTES and k > 0):
                break
            k += 1
        self.db.store.accept_queue_take(qid, part, k, rid)
        items = mem.taken(q, part, p, k)
        mem.keep_receipt(rid, qid)
        return items, len(p.items)

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
        entries = self.entries

        def run(c: Connection) -> str | None:
            if self._receipt(c, qid, rid)[0]:
                return None  # this put was carried out; its answer was lost
            now = time.time()
            have = entries.partition(c, key, now)
            if have is None:
                self.objects.exists(c, qid)
                n_parts = self.sql.n_partitions(c, {"q": qid}).fetchone()[0] or 0
                if n_parts >= m.QUEUE_MAX_PARTITIONS:
                    raise _too_many_partitions(qid, n_parts)
            if (have or 0) + len(items) > m.QUEUE_PARTITION_MAX_ITEMS:
                return _full(qid, part, have or 0, len(items))
            entries.put(c, key, items, now + ttl, have)
            entries.keep_receipt(c, qid, rid, None)
            return None

        q = self.memory.queues.get(qid)
        if q is not None:  # loaded: decided here at once unless it must wait for room
            got = self._put_memory(q, qid, part, items, ttl, rid)
            if got is None:
                self._put_made(qid, part, len(items))
                return m.QueuePutResult(True)
            if not isinstance(got, _Store) and body.timeout <= 0:
                return m.QueuePutResult(False, got)

        async def attempt() -> str | None:
            q = await self._hot(qid)
            got = self._put_memory(q, qid, part, items, ttl, rid) if q is not None else _STORE
            if isinstance(got, _Store):
                w = self.db.submit("Queue put", run)
                self._put_made(qid, part, len(items))
                return await w
            self._put_made(qid, part, len(items))
            return got

        reason = await self._until(("room", qid, part), body.timeout, attempt, lambda r: r is None)
        return m.QueuePutResult(reason is None, reason or "")

    async def get(self, qid: str, body: m.QueueGet) -> m.QueueItems:
        check_id("Queue", qid)
        part = check_partition(body.partition)
        n = min(body.n, m.QUEUE_PARTITION_MAX_ITEMS)
        rid = body.request_id
        key = {"q": qid, "p": part}
        entries = self.entries

        def run(c: Connection) -> tuple[list[bytes], int]:
            done, kept = self._receipt(c, qid, rid)
            if done:  # this get was carried out; its answer was lost: the same items
                return msgspec.msgpack.decode(kept or b"\x90", type=list[bytes]), 0
            have = entries.partition(c, key, time.time())
            if have is None:
                self.objects.exists(c, qid)
                return [], 0
            take = n
            if take * m.QUEUE_ITEM_MAX_BYTES > RESPONSE_BYTES:  # may not fit in one answer
                take = fitting(self.sql.sizes(c, {**key, "n": n}).fetchall())
            items, left = entries.take(c, key, take, have)
            if items:
                entries.keep_receipt(c, qid, rid, msgspec.msgpack.encode(items))
            return items, left

        async def attempt() -> tuple[list[bytes], int]:
            q = await self._hot(qid)
            if q is not None:
                return await self._get_memory(q, qid, part, n, rid)
            return await self.db.submit("Queue get", run)

        q = self.memory.queues.get(qid)
        p = None
        if q is not None and not (rid and self.memory.receipt(rid)):
            p = self._live(q, qid, part, time.time())
        if q is not None and p is not None and p.items:
            # loaded, with items (and not sent before): taken here at once, no wait
            items, left = self._take_memory(q, qid, part, p, n, rid)
        else:
            items, left = await self._until(
                ("items", qid, part), body.timeout, attempt, lambda r: bool(r[0])
            )
        if items:
            self.signals.pulse(("room", qid, part))
            if left:
                self.signals.pulse(("items", qid, part), 1)  # items are left: the next
        return m.QueueItems(items)

    def _put_made(self, qid: str, part: str, n: int) -> None:
        """A put is queued: a get queued after it sees its items. Wake one waiting get
        per item, and the readers."""
        self.signals.pulse(("items", qid, part), n)
        self.signals.pulse(("peek", qid, part))

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

        now = time.time()
        q = self.memory.queues.get(qid)
        if q is not None:
            if total:
                return sum(len(p.items) for p in q.parts.values() if p.expires_at >= now)
            p = self._live(q, qid, part, now)
            return len(p.items) if p is not None else 0
        # (with the journal, a Queue may be loaded meanwhile: only its put and get drop
        # an expired partition, in the order the memory saw)
        drop = not self.db.store.journaled

        def run(c: Connection) -> int:
            self.objects.exists(c, qid)
            if total:
                return int(self.sql.total(c, {"q": qid, "now": now}).fetchone()[0] or 0)
            return self.entries.partition(c, {"q": qid, "p": part}, now, drop=drop) or 0

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
                self.entries.drop_partition(c, {"q": qid, "p": part})

        self.memory.unload(qid)  # loaded again after the clear
        await self.db.run("Queue clear", run)
        self.signals.pulse_where(lambda k: k[0] == "room" and k[1] == qid)

    async def peek(self, qid: str, partition: str, after: int, timeout: float) -> m.QueueItems:
        """Items after seq ``after`` without removing them (``Queue.iterate``), waiting
        up to ``timeout`` for one when there are none."""
        check_id("Queue", qid)
        part = check_partition(partition)

        drop = not self.db.store.journaled  # (see ``length``)

        def run(c: Connection) -> tuple[list[bytes], int]:
            key = {"q": qid, "p": part}
            if self.entries.partition(c, key, time.time(), drop=drop) is None:
                self.objects.exists(c, qid)
                return [], after
            sizes = self.sql.sizes_after(c, {**key, "after": after}).fetchall()
            take = fitting(sizes)
            rows = self.sql.items_after(c, {**key, "after": after, "n": take}).fetchall()
            return [r[1] for r in rows], (rows[-1][0] if rows else after)

        items, cursor = await self._until(
            ("peek", qid, part),
            timeout,
            lambda: self._peek_attempt(qid, part, run),
            lambda r: bool(r[0]),
        )
        return m.QueueItems(items, cursor)

    def _peek_attempt(self, qid: str, part: str, run: Callable[[Connection], T]) -> Awaitable[T]:
        q = self.memory.queues.get(qid)
        if q is not None:  # an expired partition is dropped in the memory's order
            self._live(q, qid, part, time.time())
        return self.db.submit("Queue iterate", run)

    def deleted(self, qid: str) -> None:
        """Wake everyone waiting on a deleted queue (they find it gone)."""
        self.signals.pulse_where(lambda k: k[1] == qid)

    def expire_op(self, now: float):
        """An operation deleting partitions past their TTL (and old request receipts);
        returns how many partitions. Queues in memory are loaded again after it."""
        self.memory.unload_all()

        def run(c: Connection) -> int:
            c.execute(delete(qr).where(qr.c.created_at < now - RECEIPT_S))
            gone = c.execute(select(qp.c.queue_id, qp.c.partition).where(qp.c.expires_at < now))
            parts = gone.all()
            for qid, part in parts:
                self.entries.drop_partition(c, {"q": qid, "p": part})
            return len(parts)

        return run
