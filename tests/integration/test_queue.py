"""strato.Queue end to end, with the real control plane: FIFO partitions, Modal's
blocking semantics (``queue.Empty``/``queue.Full``), several consumers each getting an
item exactly once, a blocked get woken by a put, Modal's limits, ephemeral Queues,
``.aio`` twins, and bad input refused with a clear error and no change."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest

import strato
from strato import exceptions as exc
from strato.client import session


@pytest.fixture
def q(server, request):
    name = "t-" + request.node.name.replace("[", "-").replace("]", "")[:50]
    yield strato.Queue.from_name(name, create_if_missing=True)
    try:
        strato.Queue.delete(name)
    except exc.NotFoundError:
        pass


def test_fifo_partitions_and_nonblocking_calls(q):
    q.put(1)
    q.put_many([2, {"three": 3}, (4,)])
    q.put("p", partition="user-1")
    assert q.len() == 4 and q.len(partition="user-1") == 1 and q.len(total=True) == 5
    assert list(q.iterate()) == [1, 2, {"three": 3}, (4,)]  # iterate removes nothing
    assert q.get() == 1
    assert q.get_many(2) == [2, {"three": 3}]
    assert q.get_many(10, block=False) == [(4,)]
    assert q.get(block=False) is None
    assert q.get_many(3, block=False) == []
    with pytest.raises(queue.Empty):
        q.get(timeout=0.1)
    with pytest.raises(queue.Empty):
        q.get_many(2, timeout=0)
    assert q.get(partition="user-1") == "p"
    q.put_many(list(range(5)), partition="x")
    q.clear(partition="x")
    assert q.len(partition="x") == 0
    q.put(9)
    q.put(9, partition="y")
    q.clear(all=True)
    assert q.len(total=True) == 0
    with pytest.raises(exc.InvalidError, match="not both"):
        q.len(partition="a", total=True)
    with pytest.raises(exc.InvalidError, match="not both"):
        q.clear(partition="a", all=True)


def test_several_consumers_each_get_an_item_exactly_once(q):
    n, consumers = 2000, 6
    got: list[list[int]] = [[] for _ in range(consumers)]

    def consume(mine: list[int]) -> None:
        while True:
            try:
                mine.extend(q.get_many(25, timeout=5.0))
            except queue.Empty:
                return  # nothing for 5 s: the producer is done

    threads = [threading.Thread(target=consume, args=(g,)) for g in got]
    for t in threads:
        t.start()
    for i in range(0, n, 100):
        q.put_many(list(range(i, i + 100)))
    for t in threads:
        t.join(60)
    everything = [x for g in got for x in g]
    assert sorted(everything) == list(range(n))  # none lost, none twice
    assert sum(1 for g in got if g) >= 2  # the work was shared


def test_a_blocked_get_is_woken_by_a_put(q):
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(q.get(timeout=60)))
    waiter.start()
    time.sleep(0.3)  # give the get time to block on the control plane
    assert waiter.is_alive()
    put_at = time.monotonic()
    q.put("wake up")
    waiter.join(30)
    # woken by the put itself, not by its 60 s timeout running out
    assert result == ["wake up"] and time.monotonic() - put_at < 30


def test_a_full_partition(q):
    q.put_many(list(range(5000)), partition="full")
    with pytest.raises(queue.Full, match="5,000 items per partition"):
        q.put("more", block=False, partition="full")
    with pytest.raises(queue.Full):
        q.put("more", timeout=0.2, partition="full")
    with pytest.raises(exc.InvalidError, match="at most 5,000 items"):
        q.put_many(list(range(5001)), partition="other")
    done = threading.Event()
    t = threading.Thread(target=lambda: (q.put("late", partition="full"), done.set()))
    t.start()
    time.sleep(0.3)
    assert not done.is_set()  # blocked: waiting for room
    assert q.get(partition="full") == 0
    t.join(30)
    assert done.is_set() and q.len(partition="full") == 5000


def test_partition_ttl(q):
    q.put("short-lived", partition="p", partition_ttl=1)
    q.put("stays")
    time.sleep(1.5)  # past the partition's TTL (the behaviour under test is time)
    assert q.len(partition="p") == 0 and q.get(block=False, partition="p") is None
    assert q.get() == "stays"


def test_bad_input_is_refused_and_changes_nothing(q):
    q.put("keep")
    with pytest.raises(exc.SerializationError, match="cannot be pickled"):
        q.put(threading.Lock())
    with pytest.raises(exc.SerializationError):
        q.put_many(["fine", threading.Lock()])
    with pytest.raises(exc.RequestSizeError, match="1 MiB"):
        q.put(b"x" * (1 << 20))
    for bad in ("", "p" * 65, "é" * 33):
        with pytest.raises(exc.InvalidError, match="1 to 64 bytes"):
            q.put(1, partition=bad)
    with pytest.raises(exc.InvalidError, match="must be a str"):
        q.put(1, partition=5)  # type: ignore[arg-type]
    with pytest.raises(exc.InvalidError):
        q.get(timeout=-1)
    with pytest.raises(exc.InvalidError, match="n_values"):
        q.get_many(0)
    assert q.len(total=True) == 1 and q.get() == "keep"
    for bad_name in ("", "a b", "../up", "x" * 65):
        with pytest.raises(exc.InvalidError, match="invalid Queue name"):
            strato.Queue.from_name(bad_name)
    with pytest.raises(exc.NotFoundError, match="no Queue named"):
        strato.Queue.from_name("never-made-q").put(1)


def test_deleting_a_queue_ends_a_blocked_get(server, request):
    name = "t-del-" + request.node.name[:40]
    q = strato.Queue.from_name(name, create_if_missing=True)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            q.get(timeout=60)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)
    strato.Queue.delete(name)
    t.join(30)
    assert len(errors) == 1 and isinstance(errors[0], exc.NotFoundError)


def test_ephemeral_and_aio(server):
    async def body():
        async with strato.Queue.ephemeral() as q:
            await q.put.aio(1)
            await q.put_many.aio([2, 3], partition="p")
            assert await q.get.aio() == 1
            assert await q.len.aio(partition="p") == 2
            assert [x async for x in q.iterate.aio(partition="p")] == [2, 3]
            assert await q.get_many.aio(5, partition="p") == [2, 3]
            waiter = asyncio.ensure_future(q.get.aio(timeout=60))
            await asyncio.sleep(0.2)
            await q.put.aio("woken")
            assert await asyncio.wait_for(waiter, 30) == "woken"
            await q.clear.aio(all=True)
        return q

    q = asyncio.run(body())
    with pytest.raises(exc.NotFoundError):
        q.len()
    from strato.queue import Queue  # Modal's module path

    assert Queue is strato.Queue


def test_cli(q):
    from click.testing import CliRunner

    from strato.cli.main import main as cli

    q.put_many([1, 2, 3])
    q.put("x", partition="p")
    run = CliRunner().invoke
    assert q.name in run(cli, ["queue", "list"]).output
    assert run(cli, ["queue", "len", q.name]).output.strip() == "3"
    assert run(cli, ["queue", "len", q.name, "--total"]).output.strip() == "4"
    assert run(cli, ["queue", "peek", q.name, "2"]).output.split() == ["1", "2"]
    assert run(cli, ["queue", "peek", q.name, "--partition", "p"]).output.strip() == "'x'"
    assert run(cli, ["queue", "clear", q.name, "--all", "--yes"]).exit_code == 0
    assert q.len(total=True) == 0
    assert run(cli, ["queue", "delete", q.name, "--yes"]).exit_code == 0
    with pytest.raises(exc.NotFoundError):
        q.len()


def test_put_many_over_the_request_limit(q):
    from strato.sdk.dict import limits

    client = session.api()
    saved = limits(client)
    client.health = {**saved, "max_payload_bytes": 10_000}  # as a control plane with a low limit
    try:
        with pytest.raises(exc.RequestSizeError, match="put fewer items at once"):
            q.put_many([b"x" * 1000] * 20)
    finally:
        client.health = saved
    assert q.len() == 0
