"""With the store's journal, a Queue in use is kept in memory and its puts and gets are
journaled and answered before the database has them (``Store.accept_queue_put`` /
``accept_queue_take``): read back while the writer is held, replayed from the journal
after a crash with nothing lost and nothing handed out twice, request ids honoured, and
Modal's limits, FIFO order, long-poll wake-ups and the memory budget kept."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import pytest

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.server.state import Queues
from strato.server.state.db import StateDb
from strato.server.store import Store


def _store(path, url: str | None = None) -> tuple[Store, Queues]:
    """A journaled store: a SQLite file (its journal beside it) or ``url`` (PostgreSQL:
    its journal in ``path``, as the control plane keeps it in STRATO_HOME)."""
    if url is None:
        store = Store(f"sqlite:///{path}/db.sqlite")
    else:
        store = Store(url, journal=path / "store.intake")
    assert store.journaled
    return store, Queues(StateDb(store))


def _run(tmp_path, body, url: str | None = None):
    store, q = _store(tmp_path, url)
    try:
        return asyncio.run(body(q))
    finally:
        store.close()


async def _get(q: Queues, qid: str, n: int = 1, part: str = "", rid: str = "") -> list[bytes]:
    return (await q.get(qid, m.QueueGet(n, part, 0.0, rid))).items


def _hold_writer(q: Queues) -> threading.Event:
    held, release = threading.Event(), threading.Event()

    def hold(_c) -> None:
        held.set()
        release.wait(30)

    q.db.submit("hold the writer", hold)
    assert held.wait(30)
    return release


def test_put_and_get_answered_while_the_writer_is_held_and_replayed_after_a_crash(tmp_path):
    live, copy = tmp_path / "live", tmp_path / "copy"
    live.mkdir()
    store, q = _store(live)

    async def body() -> str:
        qid = (await q.objects.lookup("jobs", True)).object_id
        assert (await q.put(qid, m.QueuePut([b"a"]))).ok  # loads the Queue
        assert qid in q.memory.queues
        release = _hold_writer(q)
        try:
            # the writer is busy: these are answered from memory and the journal
            put = q.put(qid, m.QueuePut([b"b", b"c"], request_id="put-1"))
            assert (await asyncio.wait_for(put, 5)).ok
            again = q.put(qid, m.QueuePut([b"b", b"c"], request_id="put-1"))  # resent
            assert (await asyncio.wait_for(again, 5)).ok
            got = await asyncio.wait_for(_get(q, qid, rid="get-1"), 5)
            assert got == [b"a"]
            assert await q.length(qid, "", False) == 2
            shutil.copytree(live, copy)  # what a SIGKILL now would leave
        finally:
            release.set()
        assert await _get(q, qid, rid="get-1") == [b"a"]  # resent: the same item
        assert await _get(q, qid, 10) == [b"b", b"c"]
        return qid

    try:
        qid = asyncio.run(body())
    finally:
        store.close()

    async def after_crash(q2: Queues) -> None:
        # the journal is replayed: "a" was taken, "b" and "c" put once
        assert await _get(q2, qid, rid="get-1") == [b"a"]  # its answer was lost: again
        assert (await q2.put(qid, m.QueuePut([b"b", b"c"], request_id="put-1"))).ok
        assert await _get(q2, qid, 10) == [b"b", b"c"]
        assert await _get(q2, qid, 10) == []

    _run(copy, after_crash)


def test_journaled_limits_are_refused(tmp_path, db_url, monkeypatch):
    monkeypatch.setattr(m, "QUEUE_MAX_PARTITIONS", 2)

    async def body(q: Queues) -> None:
        qid = (await q.objects.lookup("limits", True)).object_id
        assert (await q.put(qid, m.QueuePut([b"x"] * m.QUEUE_PARTITION_MAX_ITEMS))).ok
        assert qid in q.memory.queues
        full = await q.put(qid, m.QueuePut([b"y"], timeout=0.0))
        assert not full.ok and "5,000 items per partition" in full.reason
        assert (await q.put(qid, m.QueuePut([b"z"], "p1"))).ok
        with pytest.raises(exc.InvalidError, match="limit of 2 partitions"):
            await q.put(qid, m.QueuePut([b"z"], "p2"))
        with pytest.raises(exc.RequestSizeError, match="1 MiB"):
            await q.put(qid, m.QueuePut([b"x" * (m.QUEUE_ITEM_MAX_BYTES + 1)], "p1"))
        with pytest.raises(exc.InvalidError, match="another Queue"):
            other = (await q.objects.lookup("other", True)).object_id
            await q.put(qid, m.QueuePut([b"z"], "p1", request_id="r"))
            await q.put(other, m.QueuePut([b"z"], request_id="r"))
        assert await q.length(qid, "", True) == m.QUEUE_PARTITION_MAX_ITEMS + 2

    _run(tmp_path, body, None if db_url.startswith("sqlite") else db_url)


def test_consumers_get_each_item_once_and_a_put_wakes_a_waiting_get(tmp_path, db_url):
    async def body(q: Queues) -> None:
        qid = (await q.objects.lookup("work", True)).object_id
        await q.put(qid, m.QueuePut([b"first"]))
        assert await _get(q, qid) == [b"first"]
        waiting = asyncio.ensure_future(q.get(qid, m.QueueGet(1, "", 10.0, "")))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await q.put(qid, m.QueuePut([b"woken"]))
        assert (await asyncio.wait_for(waiting, 5)).items == [b"woken"]

        items = [str(i).encode() for i in range(300)]
        got: list[bytes] = []

        async def consumer() -> None:
            while True:
                one = (await q.get(qid, m.QueueGet(1, "", 0.5, ""))).items
                if not one:
                    return
                got.extend(one)

        consumers = [asyncio.ensure_future(consumer()) for _ in range(4)]
        for i in range(0, 300, 10):
            await q.put(qid, m.QueuePut(items[i : i + 10]))
            await asyncio.sleep(0)
        await asyncio.gather(*consumers)
        assert sorted(got) == sorted(items) and len(got) == len(items)
        assert got == items  # one loop, one memory: taken in FIFO order
        await q.db.store.aflush()
        assert await q.length(qid, "", True) == 0

    _run(tmp_path, body, None if db_url.startswith("sqlite") else db_url)


def test_past_the_memory_budget_the_store_serves_in_the_same_order(tmp_path, db_url):
    async def body(q: Queues) -> None:
        qid = (await q.objects.lookup("big", True)).object_id
        q.memory.budget = 2000
        items = [bytes([i]) * 300 for i in range(10)]
        for item in items:
            assert (await q.put(qid, m.QueuePut([item]))).ok
        assert qid not in q.memory.queues  # past the budget: unloaded, the store serves it
        assert await _get(q, qid, 3) == items[:3]
        q.memory.budget = 1 << 20
        q.memory._cold.clear()  # (it would be loaded again after COLD_S)
        assert await _get(q, qid, 3) == items[3:6]
        assert qid in q.memory.queues
        await q.put(qid, m.QueuePut([b"last"]))
        assert await _get(q, qid, 10) == [*items[6:], b"last"]

    _run(tmp_path, body, None if db_url.startswith("sqlite") else db_url)


def test_clear_and_delete_unload_the_queue(tmp_path, db_url):
    async def body(q: Queues) -> None:
        qid = (await q.objects.lookup("gone", True)).object_id
        await q.put(qid, m.QueuePut([b"a", b"b"]))
        await q.clear(qid, m.QueueClear(""))
        assert await _get(q, qid) == []
        await q.put(qid, m.QueuePut([b"c"]))
        await q.objects.delete_name("gone")
        q.deleted(qid)
        with pytest.raises(exc.NotFoundError):
            await _get(q, qid)
        with pytest.raises(exc.NotFoundError):
            await q.put(qid, m.QueuePut([b"d"]))

    _run(tmp_path, body, None if db_url.startswith("sqlite") else db_url)


def test_an_expired_partition_is_dropped_in_memory_and_store(tmp_path, db_url):
    async def body(q: Queues) -> None:
        qid = (await q.objects.lookup("ttl", True)).object_id
        await q.put(qid, m.QueuePut([b"x"], "short", partition_ttl=0.2))
        await q.put(qid, m.QueuePut([b"y"], "long"))
        await asyncio.sleep(0.4)  # past the short partition's TTL
        assert await q.length(qid, "short", False) == 0
        assert await q.length(qid, "", True) == 1
        assert await q.db.run("expiry", q.expire_op(time.time())) == 0
        await q.put(qid, m.QueuePut([b"z"], "short"))
        assert await _get(q, qid, 5, "short") == [b"z"]

    _run(tmp_path, body, None if db_url.startswith("sqlite") else db_url)
