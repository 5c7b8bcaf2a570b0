"""The store's writer thread, on SQLite and on PostgreSQL (the local server): writes are
committed in queue order, in batches; reads see the writes queued before them; close
commits what is queued; a failed batch loses only the write that failed, and says so."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from conftest import postgres_database
from sqlalchemy import text

from strato.server.store import Store, StoreClosed, StoreTimeout, WriteFailed
from strato.server.store import store as store_module
from strato.server.store import writer as writer_module
from strato.server.store.writer import Write


@pytest.fixture
def open_store(db_url):
    made: list[Store] = []

    def make(**kw) -> Store:
        s = Store(db_url, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _log(seq: int, app_id: str = "ap-1") -> dict:
    return {
        "seq": seq,
        "app_id": app_id,
        "ts": 1.0,
        "container_id": "ct-1",
        "stream": "stdout",
        "text": f"line {seq}",
    }


def _hold(store: Store) -> threading.Event:
    """Queue a write that keeps the writer busy until the returned event is set, so
    that what is queued next waits, and is committed together."""
    release, holding = threading.Event(), threading.Event()

    def hold(_c) -> None:
        holding.set()
        release.wait(30)

    store._write("hold", hold)
    # the writer has taken the hold (alone): what is queued now waits behind it
    assert holding.wait(30)
    return release


def _seqs(store: Store, app_id: str = "ap-1") -> list[int]:
    return [r["seq"] for r in store.logs_after(app_id, 0, 10_000)]


def test_writes_return_at_once_and_commit_in_order(open_store):
    store = open_store()
    release = _hold(store)
    w1 = store.queue_create_app("ap-1", "svc", "deployed", [("fu-1", "f", b"s")], None, True)
    w2 = store.set_app_state("ap-1", "stopped")
    w3 = store.set_app_state("ap-1", "deployed")
    writes = [store.add_logs([_log(i)]) for i in range(1, 51)]
    assert not any(w.done() for w in [w1, w2, w3, *writes])  # queued, not yet run
    release.set()
    assert w1.wait() == []
    assert writes[-1].wait() is None
    assert store.apps(["ap-1"])[0]["state"] == "deployed"  # the last of the three
    assert _seqs(store) == list(range(1, 51))


def test_queued_writes_share_one_transaction(open_store):
    store = open_store()
    release = _hold(store)
    before = store.batches
    for i in range(1, 101):
        store.add_logs([_log(i)])
        store.set_node_state("no-1", "ready")  # another statement, interleaved
    release.set()
    store.flush()
    # the held write's transaction, then one for all 200 queued behind it (one per
    # write, 201, without group commit)
    assert store.batches - before == 2
    assert _seqs(store) == list(range(1, 101))


def test_a_read_waits_for_the_writes_queued_before_it(open_store):
    store = open_store(wait_s=0.3)
    release = _hold(store)
    store.add_logs([_log(1)])
    # the write is queued but not committed: a read must not answer without it
    with pytest.raises(StoreTimeout):
        store.logs_after("ap-1", 0)
    release.set()
    assert _seqs(store) == [1]


def test_a_read_from_another_thread_sees_the_writes_queued_before_it(open_store):
    store = open_store()
    release = _hold(store)
    store.add_logs([_log(1), _log(2)])
    seen: list[list[int]] = []
    reader = threading.Thread(target=lambda: seen.append(_seqs(store)))
    reader.start()
    release.set()
    reader.join(30)
    assert seen == [[1, 2]]


def test_aread_and_awaited_writes_do_not_block_the_loop(open_store):
    store = open_store()

    async def main() -> tuple[list[int], int]:
        release = _hold(store)
        ticks = 0
        write = store.add_logs([_log(1)])
        read = asyncio.ensure_future(store.aread(store.logs_after, "ap-1", 0))
        # the loop keeps running while the writer is held
        while ticks < 5:
            await asyncio.sleep(0)
            ticks += 1
        assert not read.done()
        release.set()
        await write
        await store.aflush()
        return [r["seq"] for r in await read], ticks

    seqs, ticks = asyncio.run(main())
    assert seqs == [1] and ticks == 5


def test_close_commits_what_is_queued(open_store, db_url):
    store = open_store()
    release = _hold(store)
    for i in range(1, 21):
        store.add_logs([_log(i)])
    store.add_function("ap-1", "fu-9", "g", b"spec")
    threading.Timer(0.05, release.set).start()
    store.close()
    with pytest.raises(StoreClosed):
        store.add_logs([_log(99)])
    again = open_store()
    assert _seqs(again) == list(range(1, 21))
    assert [f["function_id"] for f in again.functions_of("ap-1")] == ["fu-9"]


def test_a_failed_write_is_reported_and_the_rest_of_its_batch_committed(open_store, caplog):
    store = open_store()
    store.add_logs([_log(1)]).wait()
    release = _hold(store)
    good1 = store.add_logs([_log(2)])
    bad = store.add_logs([_log(1)])  # the same primary key again
    good2 = store.add_logs([_log(3)])
    release.set()
    with pytest.raises(WriteFailed, match="add_logs"):
        store.flush()
    assert good1.wait() is None and good2.wait() is None
    with pytest.raises(Exception, match="(?i)unique|duplicate"):
        bad.wait()
    assert _seqs(store) == [1, 2, 3]
    store.flush()  # each failure is raised once
    assert any("add_logs failed" in r.getMessage() for r in caplog.records)


def test_a_retried_call_in_a_batch_is_not_created_twice(open_store):
    store = open_store()
    row = {
        "call_id": "fc-1",
        "function_id": "fu-1",
        "kind": "map",
        "method": None,
        "n_inputs": 0,
        "closed": False,
        "cancelled": False,
        "created_at": time.time(),
        "expires_at": time.time() + 60,
    }
    release = _hold(store)
    first = store.queue_create_call(row, [])
    again = store.queue_create_call(dict(row, n_inputs=5), [])
    logs = store.add_logs([_log(1)])
    release.set()
    assert first.wait() is True
    assert again.wait() is False
    assert logs.wait() is None
    assert store.call("fc-1")["n_inputs"] == 0
    store.flush()  # an existing call is an answer, not a failure


@pytest.fixture
def pg_url():
    with postgres_database() as url:
        yield url


def test_a_write_survives_a_lost_connection(pg_url):
    """PostgreSQL only: SQLite has no server connection to lose."""
    store = Store(pg_url)
    try:
        store.add_logs([_log(1)]).wait()
        with store.engine.connect() as admin:
            admin.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            admin.commit()
        assert store.add_logs([_log(2)]).wait() is None
        store.flush()
        assert asyncio.run(store.aread(store.logs_after, "ap-1", 0))[-1]["seq"] == 2
    finally:
        store.close()


def test_fault_injection_delays_every_statement(db_url, monkeypatch):
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)

    monkeypatch.setenv(store_module.FAULT_DB_LATENCY_ENV, "5")
    monkeypatch.setattr(store_module, "_sleep", sleep)
    store = Store(db_url)
    try:
        n = len(slept)
        store.add_logs([_log(1)]).wait()
        assert store.logs_after("ap-1", 0)[0]["seq"] == 1
        assert slept[n:] == [0.005, 0.005]  # the insert, the select
    finally:
        store.close()
    monkeypatch.delenv(store_module.FAULT_DB_LATENCY_ENV)
    plain = Store(db_url)
    try:
        n = len(slept)
        plain.add_logs([_log(2)]).wait()
        assert slept[n:] == []
    finally:
        plain.close()


def test_a_write_is_a_future_that_cannot_be_cancelled(open_store):
    store = open_store()
    release = _hold(store)
    w = store.add_logs([_log(1)])
    assert isinstance(w, Write)
    assert w.cancel() is False
    with pytest.raises(StoreTimeout):
        w.wait(0.05)
    release.set()
    assert w.wait() is None


def test_an_in_memory_database_serves_reads_and_writes_through_the_writer():
    store = Store("sqlite://")
    try:
        store.add_logs([_log(1), _log(2)])
        store.add_logs([_log(3)])
        assert _seqs(store) == [1, 2, 3]
        assert asyncio.run(store.aread(store.logs_after, "ap-1", 2))[0]["seq"] == 3
    finally:
        store.close()


def _lingering(store: Store, name: str, done: list[str]) -> Write:
    """A journaled write nobody waits for (as a Dict put or a Queue put/take)."""
    return store._write(name, lambda _c: done.append(name), linger=True)


def test_lingering_writes_share_a_commit_until_one_is_waited_for(open_store, monkeypatch):
    monkeypatch.setattr(writer_module, "LINGER_S", 30.0)
    store = open_store()
    done: list[str] = []
    before = store.batches
    w1 = _lingering(store, "first", done)
    time.sleep(0.1)
    _lingering(store, "second", done)
    # a write someone waits for ends the batch at once (not after LINGER_S)
    store.set_node_state("no-1", "ready").wait(10)
    assert w1.wait(1) is None and done == ["first", "second"]
    assert store.batches - before == 1, "all three in one transaction"
    _lingering(store, "third", done)
    # a read on the writer thread ends it too, and sees the lingering write (a read on
    # the caller's thread waits for it: at most LINGER_S)
    assert asyncio.run(store.aread(store.logs_after, "ap-1", 0)) == []
    assert done[-1] == "third"
    _lingering(store, "fourth", done)
    store.flush(10)  # so does a caller waiting for the writer on its own thread
    assert done[-1] == "fourth"


def test_lingering_writes_are_committed_within_linger_s(open_store, monkeypatch):
    monkeypatch.setattr(writer_module, "LINGER_S", 0.05)
    store = open_store()
    done: list[str] = []
    _lingering(store, "alone", done).wait(10)
    assert done == ["alone"]
