"""Queue in the control plane's store, on SQLite and on PostgreSQL: FIFO partitions,
each item to exactly one consumer, blocked gets woken by puts, Modal's limits, partition
TTLs, and a store reopened (as after a SIGKILL) keeps every committed change."""

from __future__ import annotations

import asyncio
import time

import pytest

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.server.state import Queues
from strato.server.state.db import StateDb
from strato.server.store import Store


def _queues(url: str) -> tuple[Store, Queues]:
    store = Store(url, journal=False)
    return store, Queues(StateDb(store))


def run(url: str, body) -> None:
    store, queues = _queues(url)
    try:
        asyncio.run(body(queues))
    finally:
        store.close()


def test_fifo_partitions_len_clear_and_peek(db_url):
    async def body(q: Queues):
        qid = (await q.objects.lookup("jobs", True)).object_id
        assert (await q.objects.lookup("jobs", False)).object_id == qid
        assert (await q.put(qid, m.QueuePut([b"a", b"b", b"c"]))).ok
        assert (await q.put(qid, m.QueuePut([b"x"], "p1"))).ok
        assert await q.length(qid, "", False) == 3
        assert await q.length(qid, "", True) == 4
        peeked = await q.peek(qid, "", 0, 0.0)
        assert peeked.items == [b"a", b"b", b"c"]
        assert (await q.peek(qid, "", peeked.cursor, 0.0)).items == []
        assert (await q.get(qid, m.QueueGet(2))).items == [b"a", b"b"]
        assert (await q.get(qid, m.QueueGet(5))).items == [b"c"]
        assert (await q.get(qid, m.QueueGet(1))).items == []
        assert (await q.get(qid, m.QueueGet(1, "p1"))).items == [b"x"]
        await q.put(qid, m.QueuePut([b"1", b"2"], "p2"))
        await q.clear(qid, m.QueueClear("p2"))
        assert await q.length(qid, "p2", False) == 0
        await q.put(qid, m.QueuePut([b"1"], "p3"))
        await q.clear(qid, m.QueueClear(all=True))
        assert await q.length(qid, "", True) == 0

    run(db_url, body)


def test_each_item_goes_to_exactly_one_consumer(db_url):
    n = 600

    async def body(q: Queues):
        qid = (await q.objects.ephemeral()).object_id
        got: list[bytes] = []

        async def consumer():
            while len(got) < n:
                items = (await q.get(qid, m.QueueGet(7, "", 5.0))).items
                got.extend(items)

        consumers = [asyncio.create_task(consumer()) for _ in range(8)]
        for i in range(0, n, 20):
            await q.put(qid, m.QueuePut([b"%d" % j for j in range(i, i + 20)]))
        await asyncio.wait_for(asyncio.gather(*consumers), 60)
        assert sorted(int(x) for x in got) == list(range(n))

    run(db_url, body)


def test_a_blocked_get_is_woken_by_a_put(db_url):
    async def body(q: Queues):
        qid = (await q.objects.lookup("wake", True)).object_id
        waiter = asyncio.create_task(q.get(qid, m.QueueGet(1, "p", 50.0)))
        await asyncio.sleep(0.2)  # let it block (it must still be waiting)
        assert not waiter.done()
        await q.put(qid, m.QueuePut([b"now"], "p"))
        # woken by the put, far before its 50 s timeout
        assert (await asyncio.wait_for(waiter, 10)).items == [b"now"]

    run(db_url, body)


def test_a_full_partition_refuses_then_a_blocked_put_waits_for_room(db_url):
    async def body(q: Queues):
        qid = (await q.objects.lookup("full", True)).object_id
        full = [b"i"] * m.QUEUE_PARTITION_MAX_ITEMS
        assert (await q.put(qid, m.QueuePut(full))).ok
        refused = await q.put(qid, m.QueuePut([b"one more"]))
        assert not refused.ok and "5,000 items per partition" in refused.reason
        assert await q.length(qid, "", False) == m.QUEUE_PARTITION_MAX_ITEMS
        blocked = asyncio.create_task(q.put(qid, m.QueuePut([b"late"], "", timeout=50.0)))
        await asyncio.sleep(0.2)
        assert not blocked.done()
        await q.get(qid, m.QueueGet(1))
        assert (await asyncio.wait_for(blocked, 10)).ok

    run(db_url, body)


def test_limits_and_bad_input_change_nothing(db_url):
    async def body(q: Queues):
        qid = (await q.objects.lookup("limits", True)).object_id
        with pytest.raises(exc.RequestSizeError, match="1 MiB"):
            await q.put(qid, m.QueuePut([b"x" * (m.QUEUE_ITEM_MAX_BYTES + 1)]))
        with pytest.raises(exc.InvalidError, match="1 to 64 bytes"):
            await q.put(qid, m.QueuePut([b"x"], "p" * 65))
        with pytest.raises(exc.InvalidError, match="invalid Queue name"):
            await q.objects.lookup("no/slashes", True)
        with pytest.raises(exc.InvalidError, match="invalid Queue name"):
            await q.objects.lookup("x" * 65, True)
        with pytest.raises(exc.NotFoundError, match="no Queue named"):
            await q.objects.lookup("missing", False)
        with pytest.raises(exc.NotFoundError):
            await q.put("qu-" + "0" * 24, m.QueuePut([b"x"]))
        assert await q.length(qid, "", True) == 0
        assert [r.name for r in (await q.objects.list_all()).objects] == ["limits"]

    run(db_url, body)


def test_partition_limit(db_url, monkeypatch):
    monkeypatch.setattr(m, "QUEUE_MAX_PARTITIONS", 3)

    async def body(q: Queues):
        qid = (await q.objects.lookup("parts", True)).object_id
        for p in ("a", "b", "c"):
            await q.put(qid, m.QueuePut([b"x"], p))
        with pytest.raises(exc.InvalidError, match="partitions per Queue"):
            await q.put(qid, m.QueuePut([b"x"], "d"))
        await q.get(qid, m.QueueGet(1, "a"))  # an emptied partition is gone
        assert (await q.put(qid, m.QueuePut([b"x"], "d"))).ok

    run(db_url, body)


def test_partition_ttl(db_url):
    async def body(q: Queues):
        qid = (await q.objects.lookup("ttl", True)).object_id
        await q.put(qid, m.QueuePut([b"x"], "short", partition_ttl=0.3))
        await q.put(qid, m.QueuePut([b"y"], "long"))
        await asyncio.sleep(0.5)  # past the short partition's TTL
        assert await q.length(qid, "short", False) == 0
        assert await q.db.run("expiry", q.expire_op(time.time())) == 0  # dropped already
        await q.put(qid, m.QueuePut([b"z"], "short2", partition_ttl=0.1))
        await asyncio.sleep(0.3)
        assert await q.db.run("expiry", q.expire_op(time.time())) == 1
        assert await q.length(qid, "", True) == 1

    run(db_url, body)


def test_deleting_wakes_blocked_gets_and_removes_items(db_url):
    async def body(q: Queues):
        qid = (await q.objects.lookup("doomed", True)).object_id
        waiter = asyncio.create_task(q.get(qid, m.QueueGet(1, "", 50.0)))
        await asyncio.sleep(0.1)
        assert await q.objects.delete_name("doomed") == qid
        q.deleted(qid)
        with pytest.raises(exc.NotFoundError):
            await asyncio.wait_for(waiter, 10)
        # a new queue of that name starts empty
        qid2 = (await q.objects.lookup("doomed", True)).object_id
        assert qid2 != qid and await q.length(qid2, "", True) == 0

    run(db_url, body)


def test_reopened_store_keeps_what_was_committed(db_url):
    async def put(q: Queues) -> None:
        qid = (await q.objects.lookup("durable", True)).object_id
        await q.put(qid, m.QueuePut([b"%d" % i for i in range(10)]))
        await q.get(qid, m.QueueGet(4))

    async def rest(q: Queues) -> None:
        qid = (await q.objects.lookup("durable", False)).object_id
        assert (await q.get(qid, m.QueueGet(100))).items == [b"%d" % i for i in range(4, 10)]
        await q.put(qid, m.QueuePut([b"after"]))  # seqs continue after the old ones
        assert (await q.get(qid, m.QueueGet(100))).items == [b"after"]

    run(db_url, put)
    run(db_url, rest)


def test_a_request_sent_again_is_carried_out_once(db_url):
    async def body(q: Queues):
        qid = (await q.objects.lookup("retry", True)).object_id
        put = m.QueuePut([b"a", b"b", b"c"], request_id="put-1")
        assert (await q.put(qid, put)).ok
        assert (await q.put(qid, put)).ok  # its answer was lost: sent again
        assert await q.length(qid, "", False) == 3
        get = m.QueueGet(2, request_id="get-1")
        assert (await q.get(qid, get)).items == [b"a", b"b"]
        assert (await q.get(qid, get)).items == [b"a", b"b"]  # the same items again
        assert (await q.get(qid, m.QueueGet(5, request_id="get-2"))).items == [b"c"]
        other = (await q.objects.lookup("retry-other", True)).object_id
        with pytest.raises(exc.InvalidError, match="another Queue"):
            await q.put(other, put)
        assert await q.db.run("expiry", q.expire_op(time.time() + 3600)) == 0
        assert (await q.get(qid, get)).items == []  # forgotten after RECEIPT_S

    run(db_url, body)


def test_refused_requests_are_not_failed_writes(db_url, caplog, monkeypatch):
    monkeypatch.setattr(m, "QUEUE_MAX_PARTITIONS", 1)
    store, q = _queues(db_url)

    async def body() -> None:
        qid = (await q.objects.lookup("refusals", True)).object_id
        await q.put(qid, m.QueuePut([b"x"], "a"))
        with pytest.raises(exc.InvalidError, match="partitions per Queue"):
            await q.put(qid, m.QueuePut([b"x"], "b"))
        with pytest.raises(exc.NotFoundError):
            await q.get("qu-" + "1" * 24, m.QueueGet(1))
        with pytest.raises(exc.NotFoundError):
            await q.objects.lookup("nothing-here", False)

    try:
        with caplog.at_level("WARNING", logger="strato.store"):
            asyncio.run(body())
            store.flush()  # raises WriteFailed if any of those counted as a failed write
        assert not caplog.records, [r.getMessage() for r in caplog.records]
    finally:
        store.close()


def test_one_answer_carries_at_most_8_mib(db_url):
    async def body(q: Queues):
        qid = (await q.objects.lookup("big", True)).object_id
        item = b"x" * m.QUEUE_ITEM_MAX_BYTES
        await q.put(qid, m.QueuePut([item] * 20))
        first = await q.peek(qid, "", 0, 0.0)
        assert len(first.items) == 8  # 8 MiB
        assert len((await q.peek(qid, "", first.cursor, 0.0)).items) == 8
        assert len((await q.get(qid, m.QueueGet(20))).items) == 8
        assert len((await q.get(qid, m.QueueGet(20))).items) == 8
        assert len((await q.get(qid, m.QueueGet(20))).items) == 4
        await q.put(qid, m.QueuePut([b"small"] * 3000))
        assert len((await q.get(qid, m.QueueGet(5000))).items) == 3000

    run(db_url, body)


def test_a_put_wakes_one_waiting_get_per_item(db_url):
    async def body(q: Queues):
        qid = (await q.objects.lookup("herd", True)).object_id
        looks: list[str] = []
        submit = q.db.submit

        def counting(name, run):
            looks.append(name)
            return submit(name, run)

        q.db.submit = counting  # type: ignore[method-assign]
        waiters = [asyncio.create_task(q.get(qid, m.QueueGet(1, "", 30.0))) for _ in range(10)]
        await asyncio.sleep(0.3)  # each looked once and waits
        assert looks.count("Queue get") == 10
        await q.put(qid, m.QueuePut([b"one"]))
        done, _ = await asyncio.wait(waiters, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.2)
        assert len(done) == 1 and looks.count("Queue get") == 11  # one woken, not ten
        pending = [w for w in waiters if not w.done()]
        # a put of several items wakes as many; a get that leaves items wakes the next
        await q.put(qid, m.QueuePut([b"x"] * 9))
        got = await asyncio.wait_for(asyncio.gather(*pending), 10)
        assert sum(len(g.items) for g in got) == 9 and await q.length(qid, "", False) == 0

    run(db_url, body)


def test_a_woken_waiter_that_is_cancelled_passes_its_wake_on():
    from strato.server.state.signals import Signal

    async def body() -> None:
        sig = Signal()
        a = asyncio.create_task(sig.wait(0, 30.0))
        b = asyncio.create_task(sig.wait(0, 30.0))
        await asyncio.sleep(0.01)  # both wait, a first
        sig.pulse(1)  # wakes a ...
        a.cancel()  # ... which goes away before it runs: b gets the wake
        await asyncio.wait_for(b, 5)
        assert a.cancelled()
        c = asyncio.create_task(sig.wait(sig.version, 0.05))
        await asyncio.wait_for(c, 5)  # nobody pulses: it returns after its timeout

    asyncio.run(body())
