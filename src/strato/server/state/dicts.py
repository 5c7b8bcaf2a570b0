"""Dict: entries keyed by the sha256 of their pickled key, durable before the API answers
(committed; or, for a put into a Dict an operation has found, in the store's journal, the
writer storing it behind: ``Store.accept_dict_put``), large values in the blob store,
paged iteration, and expiry of entries not accessed for ``STRATO_DICT_TTL``."""

from __future__ import annotations

import hashlib
import time
from typing import Literal

from sqlalchemy import Connection, and_, bindparam, delete, func, select, update

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.server.store import tables_state as ts
from strato.server.store.blobs import BlobStore
from strato.server.store.hot import Hot

from .cache import DictCache
from .db import StateDb, fitting
from .names import check_id
from .objects import NamedObjects

PAGE_MAX = 1000
LIVE_MAX = 100_000  # Dicts remembered as found (forgotten all at once past this)
What = Literal["keys", "values", "items"]


def key_hash(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


class Dicts:
    def __init__(
        self,
        db: StateDb,
        blobs: BlobStore,
        *,
        blob_threshold: int,
        max_payload: int,
        ttl_s: float,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.blob_threshold = blob_threshold
        self.max_payload = max_payload
        self.ttl_s = ttl_s
        # an access refreshes an entry's clock only when it is this old (a read of a hot
        # key does not write each time); far below the TTL
        self.touch_after_s = min(ttl_s / 100.0, 3600.0)
        self.objects = NamedObjects("Dict", db, ts.dicts, [ts.dict_entries])
        self.cache = DictCache()
        self.objects.changing = self._deleting
        self.objects.deleted = self.cache.forget_dicts
        self.entries = db.store.dict_entries
        # Dicts an operation found, with no deletion queued since: a put into one of them
        # is journaled and answered at once (``Store.accept_dict_put``)
        self._live: set[str] = set()
        self._deletions = 0  # deletions queued so far
        e = ts.dict_entries.c
        where = and_(e.dict_id == bindparam("d"), e.key_hash == bindparam("h"))
        # the hot statements, built once (building one costs more than running it)
        self._entry = Hot(select(e.value, e.value_blob, e.accessed_at).where(where))
        self._touch = Hot(update(ts.dict_entries).where(where).values(accessed_at=bindparam("now")))
        self._delete = Hot(delete(ts.dict_entries).where(where))

    # ------------------------------------------------------------------ helpers

    def _deleting(self) -> None:
        """A deletion of Dicts is being queued: no put skips the check that its Dict is
        there until an operation has found it again."""
        self._deletions += 1
        self._live.clear()
        self.cache.changing()

    def _found(self, object_id: str, deletions_then: int) -> None:
        if deletions_then == self._deletions:
            if len(self._live) >= LIVE_MAX:
                self._live.clear()
            self._live.add(object_id)

    def _check_key(self, key: bytes) -> str:
        if len(key) > m.DICT_KEY_MAX_BYTES:
            raise exc.RequestSizeError(
                f"a Dict key pickles to {len(key)} bytes, over the limit of "
                f"{m.DICT_KEY_MAX_BYTES} bytes for keys: use a smaller key (a hash, an id)"
            )
        return key_hash(key)

    # ------------------------------------------------------------------ operations

    async def get(self, object_id: str, key: bytes, *, touch: bool = True) -> m.DictValue:
        check_id("Dict", object_id)
        kh = self._check_key(key)
        where = {"d": object_id, "h": kh}
        now = time.time()
        cached = self.cache.get(object_id, kh)
        if cached is not None and cached.accessed_at >= now - self.ttl_s:
            if touch and cached.accessed_at < now - self.touch_after_s:
                cached.accessed_at = now  # refreshed in the store too (not waited for)
                self.db.submit("Dict touch", lambda c: self._touch(c, {**where, "now": now}))
            return m.DictValue(True, cached.value, cached.blob)

        def run(c: Connection) -> tuple[m.DictValue, float]:
            row = self._entry(c, where).fetchone()
            if row is None:
                self.objects.exists(c, object_id)
                return m.DictValue(False), 0.0
            now = time.time()
            if row[2] < now - self.ttl_s:  # expired; the expiry loop has not got to it
                self._delete(c, where)
                return m.DictValue(False), 0.0
            if touch and row[2] < now - self.touch_after_s:
                self._touch(c, {**where, "now": now})
                return m.DictValue(True, row[0], row[1]), now
            return m.DictValue(True, row[0], row[1]), row[2]

        writes = self.cache.writes
        got, accessed_at = await self.db.run("Dict get", run)
        if got.found:
            self.cache.fill(object_id, kh, writes, got.value, got.blob, accessed_at)
        return got

    async def put(self, object_id: str, body: m.DictPut) -> int:
        """Store the entries (in order; a later one of the same key wins); returns how
        many were stored (``skip_if_exists`` skips keys present)."""
        check_id("Dict", object_id)
        rows: list[tuple[str, bytes, bytes | None, str | None]] = []
        for entry in body.entries:
            kh = self._check_key(entry.key)
            value, blob = entry.value, entry.blob
            if blob is not None:
                if not self.blobs.has(blob):
                    raise exc.InvalidError(
                        f"the value's blob {blob} is not in the blob store: upload it first"
                    )
                value = None
            elif value is None:
                raise exc.InvalidError("a Dict entry needs a value (or its blob key)")
            elif len(value) > self.max_payload:
                raise exc.RequestSizeError(
                    f"a Dict value of {len(value)} bytes is over the limit of "
                    f"{self.max_payload} bytes (STRATO_MAX_PAYLOAD)"
                )
            elif len(value) > self.blob_threshold:
                blob, value = await self.blobs.aput(value), None
            rows.append((kh, entry.key, value, blob))
        skip = body.skip_if_exists
        self.cache.changing(object_id, [r[0] for r in rows])
        writes = self.cache.writes
        now = time.time()
        store = self.db.store
        if not skip and object_id in self._live and store.journaled:
            # durable in the store's journal when this returns; the writer stores the
            # entries behind it, in queue order (a read queued later sees them)
            store.accept_dict_put(object_id, [list(r) for r in rows], now)
            stored = len(rows)
        else:
            since = now - self.ttl_s if skip else None  # (an expired entry is not there)

            def run(c: Connection) -> int:
                self.objects.exists(c, object_id)
                return self.entries.put(c, object_id, rows, now, since)

            deletions = self._deletions
            stored = await self.db.run("Dict put", run)
            self._found(object_id, deletions)
        if not skip:  # committed: what a read would find now (unless a change came between)
            for kh, _, value, blob in rows:
                self.cache.fill(object_id, kh, writes, value, blob, now)
        return stored

    async def pop(self, object_id: str, key: bytes) -> m.DictValue:
        check_id("Dict", object_id)
        where = {"d": object_id, "h": self._check_key(key)}

        def run(c: Connection) -> m.DictValue:
            row = self._entry(c, where).fetchone()
            if row is None:
                self.objects.exists(c, object_id)
                return m.DictValue(False)
            self._delete(c, where)
            if row[2] < time.time() - self.ttl_s:  # expired
                return m.DictValue(False)
            return m.DictValue(True, row[0], row[1])

        self.cache.changing(object_id, [where["h"]])
        return await self.db.run("Dict pop", run)

    async def delete_key(self, object_id: str, key: bytes) -> bool:
        return (await self.pop(object_id, key)).found

    async def length(self, object_id: str) -> int:
        check_id("Dict", object_id)

        def run(c: Connection) -> int:
            self.objects.exists(c, object_id)
            e = ts.dict_entries.c
            q = select(func.count()).select_from(ts.dict_entries)
            q = q.where(e.dict_id == object_id, e.accessed_at >= time.time() - self.ttl_s)
            return c.execute(q).scalar() or 0

        return await self.db.read("Dict len", run)

    async def clear(self, object_id: str) -> None:
        check_id("Dict", object_id)

        def run(c: Connection) -> None:
            self.objects.exists(c, object_id)
            c.execute(delete(ts.dict_entries).where(ts.dict_entries.c.dict_id == object_id))

        self.cache.changing(object_id)
        await self.db.run("Dict clear", run)

    async def page(self, object_id: str, after: int, limit: int, what: What) -> m.DictPage:
        """Entries after ``after`` in insertion order (the first put of each key), at most
        ``limit``; ``what`` says which halves to send."""
        check_id("Dict", object_id)
        limit = max(1, min(limit, PAGE_MAX))
        e = ts.dict_entries.c
        cols = [e.seq, e.key, e.value, e.value_blob]

        def run(c: Connection) -> m.DictPage:
            live = and_(
                e.dict_id == object_id, e.seq > after, e.accessed_at >= time.time() - self.ttl_s
            )
            size = func.length(e.key) + func.coalesce(func.length(e.value), 0)
            sizes = c.execute(select(e.seq, size).where(live).order_by(e.seq).limit(limit)).all()
            take = fitting(sizes)
            rows = c.execute(select(*cols).where(live).order_by(e.seq).limit(take)).all()
            if not rows:
                self.objects.exists(c, object_id)
            entries = [
                m.DictEntry(
                    r[1] if what != "values" else b"",
                    r[2] if what != "keys" else None,
                    r[3] if what != "keys" else None,
                )
                for r in rows
            ]
            done = len(sizes) < limit and take == len(sizes)
            return m.DictPage(entries, rows[-1][0] if rows else after, done)

        return await self.db.read("Dict page", run)

    def expire_op(self, now: float):
        """An operation deleting entries not accessed for the TTL; returns how many."""
        cutoff = now - self.ttl_s
        self.cache.changing()  # (cached entries past the TTL are never served)

        def run(c: Connection) -> int:
            res = c.execute(delete(ts.dict_entries).where(ts.dict_entries.c.accessed_at < cutoff))
            return res.rowcount or 0

        return run
