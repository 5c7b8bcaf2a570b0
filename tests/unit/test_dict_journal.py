"""A Dict put into a Dict that an operation has found is journaled and answered before the
database has it (``Store.accept_dict_put``): a read right after sees it, and what a crash
leaves (the database without the put, the journal with it) gets it back when the store
opens again. A put into a Dict deleted meanwhile stores nothing."""

from __future__ import annotations

import asyncio
import shutil
import threading

from sqlalchemy import select

from strato.protocol import messages as m
from strato.server.state import Dicts
from strato.server.state.db import StateDb
from strato.server.store import Store
from strato.server.store import tables_state as ts
from strato.server.store.blobs import BlobStore


def _dicts(store: Store, tmp_path) -> Dicts:
    return Dicts(
        StateDb(store),
        BlobStore(tmp_path / "blobs"),
        blob_threshold=1000,
        max_payload=1 << 20,
        ttl_s=3600.0,
    )


def _keys(c, did: str) -> list[bytes]:
    e = ts.dict_entries.c
    return [r[0] for r in c.execute(select(e.key).where(e.dict_id == did).order_by(e.seq))]


def _put(d: Dicts, did: str, pairs: dict[bytes, bytes]):
    return d.put(did, m.DictPut([m.DictEntry(k, v) for k, v in pairs.items()]))


def test_a_journaled_put_is_read_back_and_replayed_after_a_crash(tmp_path):
    live, copy = tmp_path / "live", tmp_path / "copy"
    live.mkdir()
    store = Store(f"sqlite:///{live}/db.sqlite")
    assert store.journaled
    d = _dicts(store, tmp_path)
    held = threading.Event()
    release = threading.Event()

    async def body() -> str:
        did = (await d.objects.lookup("j", True)).object_id
        assert await _put(d, did, {b"a": b"1"}) == 1  # through the writer: the Dict is found
        d.cache.forget_dicts([did])

        def hold(_c) -> None:
            held.set()
            release.wait(30)

        d.db.submit("hold the writer", hold)
        assert held.wait(30)
        # the writer is busy: these are answered from the journal, not the database
        assert await asyncio.wait_for(_put(d, did, {b"b": b"2", b"a": b"new"}), 5) == 2
        assert await asyncio.wait_for(_put(d, did, {b"c": b"3"}), 5) == 1
        shutil.copytree(live, copy)  # what a SIGKILL now would leave
        release.set()
        assert (await d.get(did, b"a")).value == b"new"
        d.cache.forget_dicts([did])
        assert (await d.get(did, b"b")).value == b"2"  # from the store, after the put
        return did

    try:
        did = asyncio.run(body())
    finally:
        release.set()
        store.close()

    again = Store(f"sqlite:///{copy}/db.sqlite")
    try:
        d2 = _dicts(again, tmp_path)

        async def read() -> list[bytes | None]:
            return [(await d2.get(did, k)).value for k in (b"a", b"b", b"c")]

        assert asyncio.run(read()) == [b"new", b"2", b"3"]
    finally:
        again.close()


def test_a_put_into_a_dict_deleted_meanwhile_stores_nothing(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/db.sqlite")
    d = _dicts(store, tmp_path)

    async def body() -> None:
        did = (await d.objects.lookup("gone", True)).object_id
        await _put(d, did, {b"a": b"1"})
        assert did in d._live
        batches = store._writer.batches
        store.accept_dict_put(did, [["h", b"k", b"v", None]], 0.0)
        stored = await d.db.read("entries", lambda c: _keys(c, did))
        assert stored == [b"a", b"k"]  # (queued before the deletion)
        await d.objects.delete_name("gone")
        assert did not in d._live  # the next put checks again
        store.accept_dict_put(did, [["h2", b"k2", b"v", None]], 0.0)
        store.flush()
        assert store._writer.batches > batches
        assert await d.db.read("entries", lambda c: _keys(c, did)) == []
        assert not store._writer.failures  # nothing to store: not a failure

    try:
        asyncio.run(body())
    finally:
        store.close()
