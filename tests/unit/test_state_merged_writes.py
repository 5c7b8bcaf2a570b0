"""The store's writer applies a run of journaled Queue puts and takes (and of Dict puts)
as one merged call (``QueueEntries.apply_run``, ``DictEntries.put_run``): the tables end
exactly as the same operations applied one by one leave them (items in order, partition
counts and expiries, request receipts with the items each get took, expired partitions
dropped, operations on a deleted Queue or with a used request id skipped), on SQLite and
PostgreSQL; and a batch the writer merged survives a crash through the journal with
nothing lost and nothing taken twice."""

from __future__ import annotations

import asyncio
import random
import shutil
import threading

import msgspec
import pytest
from sqlalchemy import insert, select

from strato.protocol import messages as m
from strato.server.state import Dicts, Queues
from strato.server.state.db import StateDb
from strato.server.store import Store
from strato.server.store import tables_state as ts
from strato.server.store.blobs import BlobStore

QUEUES = ["q1", "q2", "gone"]  # "gone" has no row: its operations are skipped
PARTS = ["", "p"]


def _dicts(store: Store, home) -> Dicts:
    blobs = BlobStore(home / "blobs")
    return Dicts(StateDb(store), blobs, blob_threshold=1000, max_payload=1 << 20, ttl_s=3600.0)


def _ops(rng: random.Random, n: int, t0: float, rids: list[str]) -> list[tuple]:
    """Random puts and takes, some into expired partitions, some request ids used twice."""
    out: list[tuple] = []
    now = t0
    for _ in range(n):
        now += rng.choice([0.0, 1.0, 5.0])
        key = {"q": rng.choice(QUEUES), "p": rng.choice(PARTS)}
        if rng.random() < 0.2 and rids:
            rid = rng.choice(rids)  # used before (maybe by another Queue)
        elif rng.random() < 0.15:
            rid = ""
        else:
            rid = f"r{len(rids)}-{rng.random():.6f}"
            rids.append(rid)
        if rng.random() < 0.5:
            items = [f"{now}-{i}-{rng.random():.4f}".encode() for i in range(rng.randint(1, 3))]
            ttl = rng.choice([2.0, 100.0])  # a short one expires before a later put
            out.append(("put", key, items, now, now + ttl, rid))
        else:
            out.append(("take", key, rng.randint(1, 4), rid))
    return out


def _prefixed(ops: list[tuple], pre: str) -> list[tuple]:
    """The same operations on Queues (and request ids) named with ``pre``."""
    out = []
    for op in ops:
        key = {"q": pre + op[1]["q"], "p": op[1]["p"]}
        rid = pre + op[-1] if op[-1] else ""
        out.append((op[0], key, *op[2:-1], rid))
    return out


def _one_by_one(entries, c, ops: list[tuple]) -> None:
    for op in ops:
        if op[0] == "put":
            entries.apply_put(c, *op[1:])
        else:
            entries.apply_take(c, *op[1:])


def _state(store: Store, pre: str) -> tuple:
    """Everything the Queues named with ``pre`` hold, without seqs and clocks."""

    def read(c):
        items: dict = {}
        rows = c.execute(
            select(ts.queue_items.c.queue_id, ts.queue_items.c.partition, ts.queue_items.c.data)
            .where(ts.queue_items.c.queue_id.startswith(pre))
            .order_by(ts.queue_items.c.seq)
        )
        for qid, part, data in rows:
            items.setdefault((qid[len(pre) :], part), []).append(data)
        qp = ts.queue_partitions.c
        parts = {
            (r[0][len(pre) :], r[1]): (r[2], r[3])
            for r in c.execute(
                select(qp.queue_id, qp.partition, qp.n_items, qp.expires_at).where(
                    qp.queue_id.startswith(pre)
                )
            )
        }
        qr = ts.queue_receipts.c
        receipts = {
            r[0][len(pre) :]: (
                r[1][len(pre) :],
                None if r[2] is None else msgspec.msgpack.decode(r[2]),
            )
            for r in c.execute(
                select(qr.request_id, qr.queue_id, qr.taken).where(qr.request_id.startswith(pre))
            )
        }
        return items, parts, receipts

    return store._write("read", read).wait()


@pytest.mark.parametrize(("seed", "n"), [*((s, 60) for s in range(12)), (99, 1500)])
def test_a_merged_run_leaves_the_queue_tables_as_one_by_one(db_url, seed, n):
    """(1,500 operations: runs longer than a batch; most end with their Queues drained.)"""
    rng = random.Random(seed)
    store = Store(db_url, journal=False)
    entries = store.queue_entries
    try:

        def setup(c):
            for pre in ("a-", "b-"):
                for q in QUEUES[:2]:
                    c.execute(insert(ts.queues).values(queue_id=pre + q, created_at=0.0))

        store._write("setup", setup).wait()
        rids: list[str] = []
        before = _ops(rng, 20, 1000.0, rids)  # items in the tables before the run
        run = _ops(rng, n, 1100.0, rids)
        for pre in ("a-", "b-"):
            ops = _prefixed(before, pre)
            store._write("before", lambda c, ops=ops: _one_by_one(entries, c, ops)).wait()
        a, b = _prefixed(run, "a-"), _prefixed(run, "b-")
        store._write("one by one", lambda c: _one_by_one(entries, c, a)).wait()
        assert store._write("merged", lambda c: entries.apply_run(c, b)).wait() == [None] * len(b)
        expected = _state(store, "a-")
        assert expected[2] and (expected[0] or n > 100)  # (there is something to compare)
        assert _state(store, "b-") == expected
    finally:
        store.close()


def test_a_merged_run_of_dict_puts_stores_as_one_by_one(db_url):
    store = Store(db_url, journal=False)
    entries = store.dict_entries
    try:

        def setup(c):
            for d in ("d1", "d2"):
                c.execute(insert(ts.dicts).values(dict_id=d, created_at=0.0))
            entries.put(c, "d1", [["h1", b"k1", b"old", None]], 1.0)

        store._write("setup", setup).wait()
        puts = [
            ("d1", [["h1", b"k1", b"v1", None], ["h2", b"k2", None, "blobkey"]], 2.0),
            ("gone", [["h1", b"k1", b"x", None]], 3.0),  # deleted meanwhile: not stored
            ("d2", [["h1", b"k1", b"w", None]], 4.0),
            ("d1", [["h2", b"k2", b"v2", None], ["h2", b"k2", b"v3", None]], 5.0),
        ]
        assert store._write("merged", lambda c: entries.put_run(c, puts)).wait() == [2, 0, 1, 2]

        def read(c):
            e = ts.dict_entries.c
            rows = c.execute(
                select(e.dict_id, e.key, e.value, e.value_blob, e.accessed_at).order_by(e.seq)
            )
            return [tuple(r) for r in rows]

        # the first put of a key orders it; a later one of the key wins
        assert store._write("read", read).wait() == [
            ("d1", b"k1", b"v1", None, 2.0),
            ("d1", b"k2", b"v3", None, 5.0),
            ("d2", b"k1", b"w", None, 4.0),
        ]
    finally:
        store.close()


def _state_of(store: Store, queues: Queues, dicts: Dicts, qid: str, did: str) -> tuple:
    async def read() -> tuple:
        items = {}
        for part in PARTS:
            got = await queues.get(qid, m.QueueGet(1000, part, 0.0, f"read-{part}"))
            items[part] = got.items
        values = {k: (await dicts.get(did, k, touch=False)).value for k in (b"k0", b"k1", b"k2")}
        return items, values

    dicts.cache.changing()  # (read from the store, not from the cache)
    queues.memory.unload_all()
    return asyncio.run(read())


def test_a_merged_batch_is_replayed_after_a_crash_with_nothing_lost_or_taken_twice(tmp_path):
    """Puts and gets journaled while the writer is held reach it as one batch (merged
    runs); a copy of the files taken then (what a SIGKILL leaves: the journal has them,
    the database not) opens to the same Queue and Dict as the live store once it
    committed them, and each get's request id still answers with the items it took."""
    live, copy = tmp_path / "live", tmp_path / "copy"
    live.mkdir()
    store = Store(f"sqlite:///{live}/db.sqlite")
    queues, dicts = Queues(StateDb(store)), _dicts(store, live)
    rng = random.Random(7)
    taken: dict[str, list[bytes]] = {}
    answered: dict[str, list[bytes]] = {}

    async def body() -> tuple[str, str]:
        qid = (await queues.objects.lookup("jobs", True)).object_id
        did = (await dicts.objects.lookup("results", True)).object_id
        await queues.put(qid, m.QueuePut([b"before"]))  # (loads the Queue)
        await dicts.put(did, m.DictPut([m.DictEntry(b"k0", b"before")]))  # (found: journaled)
        batches = store._writer.batches
        held, release = threading.Event(), threading.Event()
        store._write("hold the writer", lambda _c: (held.set(), release.wait(30)))
        assert held.wait(30)
        try:
            for i in range(80):
                part = rng.choice(PARTS)
                if rng.random() < 0.55:
                    items = [f"{i}-{j}".encode() for j in range(rng.randint(1, 3))]
                    put = m.QueuePut(items, part, request_id=f"put-{i}")
                    assert (await queues.put(qid, put)).ok
                else:
                    get = m.QueueGet(rng.randint(1, 3), part, 0.0, f"get-{i}")
                    taken[f"get-{i}"] = (await queues.get(qid, get)).items
                if i % 7 == 0:
                    entry = m.DictEntry(f"k{i % 3}".encode(), f"v{i}".encode())
                    await dicts.put(did, m.DictPut([entry]))
            assert store._writer.batches == batches  # nothing committed yet
            loaded = queues.memory.queues[qid].parts  # what the answers said it holds
            answered.update({part: list(loaded[part].items) for part in loaded})
            shutil.copytree(live, copy)  # what a SIGKILL now would leave
        finally:
            release.set()
        await store.aflush()
        return qid, did

    try:
        qid, did = asyncio.run(body())
        assert any(taken.values())
        expected = _state_of(store, queues, dicts, qid, did)
        assert expected[0] == {part: answered.get(part, []) for part in PARTS}
    finally:
        store.close()
    again = Store(f"sqlite:///{copy}/db.sqlite")
    try:
        queues2, dicts2 = Queues(StateDb(again)), _dicts(again, copy)

        async def resent() -> None:  # each get's answer was lost: sent again, the same items
            for rid, items in taken.items():
                if not items:  # (a get that found none took nothing to answer again)
                    continue
                get = m.QueueGet(3, "", 0.0, rid)
                assert (await queues2.get(qid, get)).items == items

        asyncio.run(resent())
        assert _state_of(again, queues2, dicts2, qid, did) == expected
    finally:
        again.close()
