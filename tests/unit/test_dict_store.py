"""Dict in the control plane's store, on SQLite and on PostgreSQL: entries by pickled
key, skip_if_exists, paged iteration, large values in the blob store, expiry after the
TTL without access, and bad input refused without a change."""

from __future__ import annotations

import asyncio
import time

import pytest

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.server.state import Dicts
from strato.server.state.db import StateDb
from strato.server.state.dicts import key_hash
from strato.server.store import Store
from strato.server.store.blobs import BlobStore


def run(url: str, tmp_path, body, ttl_s: float = 3600.0) -> None:
    store = Store(url, journal=False)
    dicts = Dicts(
        StateDb(store),
        BlobStore(tmp_path / "blobs"),
        blob_threshold=1000,
        max_payload=1 << 20,
        ttl_s=ttl_s,
    )
    try:
        asyncio.run(body(dicts))
    finally:
        store.close()


def put(d: Dicts, did: str, pairs: dict[bytes, bytes], skip: bool = False):
    return d.put(did, m.DictPut([m.DictEntry(k, v) for k, v in pairs.items()], skip))


def test_get_put_pop_len_clear(db_url, tmp_path):
    async def body(d: Dicts):
        did = (await d.objects.lookup("cache", True)).object_id
        assert await put(d, did, {b"a": b"1", b"b": b"2"}) == 2
        assert (await d.get(did, b"a")) == m.DictValue(True, b"1")
        assert not (await d.get(did, b"zz")).found
        assert await put(d, did, {b"a": b"new", b"c": b"3"}, skip=True) == 1
        assert (await d.get(did, b"a")).value == b"1"
        assert await put(d, did, {b"a": b"new"}) == 1
        assert (await d.get(did, b"a")).value == b"new"
        assert await d.length(did) == 3
        assert (await d.pop(did, b"b")).value == b"2"
        assert not (await d.pop(did, b"b")).found
        await d.clear(did)
        assert await d.length(did) == 0

    run(db_url, tmp_path, body)


def test_pages_in_insertion_order_and_large_values_in_blobs(db_url, tmp_path):
    async def body(d: Dicts):
        did = (await d.objects.lookup("big", True)).object_id
        keys = [b"k%04d" % i for i in range(2500)]
        await put(d, did, {k: k + b"v" for k in keys})
        await put(d, did, {b"k0000": b"changed"})  # an update keeps its place
        seen, after = [], 0
        while True:
            page = await d.page(did, after, 1000, "keys")
            seen += [e.key for e in page.entries]
            assert all(e.value is None for e in page.entries)
            after = page.cursor
            if page.done:
                break
        assert seen == keys
        large = b"x" * 5000  # over the blob threshold
        await put(d, did, {b"large": large})
        got = await d.get(did, b"large")
        assert got.value is None and got.blob and d.blobs.get(got.blob) == large

    run(db_url, tmp_path, body)


def test_entries_expire_after_the_ttl_without_access(db_url, tmp_path):
    async def body(d: Dicts):
        did = (await d.objects.lookup("ttl", True)).object_id
        await put(d, did, {b"old": b"1", b"kept": b"2"})
        await asyncio.sleep(0.6)
        assert (await d.get(did, b"kept")).found  # an access restarts its clock
        await asyncio.sleep(0.6)  # "old" is now past the 1 s TTL, "kept" is not
        assert await d.db.run("expiry", d.expire_op(time.time())) == 1
        assert not (await d.get(did, b"old")).found
        assert (await d.get(did, b"kept")).found
        # past its TTL an entry is gone at once, before the expiry loop deletes it
        await put(d, did, {b"a": b"1", b"b": b"2"})
        await asyncio.sleep(1.2)
        assert not (await d.get(did, b"a")).found and not (await d.pop(did, b"b")).found
        await put(d, did, {b"c": b"3"})
        await asyncio.sleep(1.2)
        assert await d.length(did) == 0 and (await d.page(did, 0, 10, "keys")).entries == []
        assert await put(d, did, {b"c": b"new"}, skip=True) == 1  # an expired key is absent

    run(db_url, tmp_path, body, ttl_s=1.0)


def test_bad_input_changes_nothing(db_url, tmp_path):
    async def body(d: Dicts):
        did = (await d.objects.lookup("strict", True)).object_id
        await put(d, did, {b"a": b"1"})
        with pytest.raises(exc.RequestSizeError, match="limit of 65536 bytes for keys"):
            await put(d, did, {b"b": b"2", b"k" * 70000: b"x"})
        with pytest.raises(exc.InvalidError, match="not in the blob store"):
            await d.put(did, m.DictPut([m.DictEntry(b"c", None, "0" * 64)]))
        with pytest.raises(exc.InvalidError, match="needs a value"):
            await d.put(did, m.DictPut([m.DictEntry(b"c")]))
        with pytest.raises(exc.RequestSizeError, match="STRATO_MAX_PAYLOAD"):
            await put(d, did, {b"c": b"x" * ((1 << 20) + 1)})
        assert await d.length(did) == 1
        with pytest.raises(exc.NotFoundError):
            await d.get("di-" + "0" * 24, b"a")
        with pytest.raises(exc.NotFoundError):
            await d.get("not-an-id", b"a")
        with pytest.raises(exc.InvalidError, match="invalid Dict name"):
            await d.objects.lookup("bad name", True)
        # deleting removes the entries; a named Dict is not deleted by id from a container
        with pytest.raises(exc.AuthError, match="named Dict"):
            await d.objects.delete_id(did, named_ok=False)
        await d.objects.delete_id(did, named_ok=True)
        with pytest.raises(exc.NotFoundError):
            await d.length(did)

    run(db_url, tmp_path, body)


def test_ephemeral_dicts_without_heartbeat_are_deleted(db_url, tmp_path, monkeypatch):
    from strato.server.state import objects

    monkeypatch.setattr(objects, "EPHEMERAL_TIMEOUT_S", 0.2)

    async def body(d: Dicts):
        did = (await d.objects.ephemeral()).object_id
        await put(d, did, {b"a": b"1"})
        assert await d.objects.expire_ephemeral(time.time()) == []
        await asyncio.sleep(0.4)
        assert await d.objects.expire_ephemeral(time.time()) == [did]
        with pytest.raises(exc.NotFoundError):
            await d.get(did, b"a")

    run(db_url, tmp_path, body)


def test_one_page_carries_at_most_8_mib(db_url, tmp_path):
    store = Store(db_url, journal=False)
    d = Dicts(
        StateDb(store),
        BlobStore(tmp_path / "blobs"),
        blob_threshold=4 << 20,
        max_payload=8 << 20,
        ttl_s=3600.0,
    )

    async def body() -> None:
        did = (await d.objects.lookup("wide", True)).object_id
        await put(d, did, {b"k%d" % i: b"v" * (3 << 20) for i in range(7)})
        got, after, pages = 0, 0, 0
        while True:
            page = await d.page(did, after, 1000, "items")
            got, after, pages = got + len(page.entries), page.cursor, pages + 1
            assert len(page.entries) <= 2  # 2 x 3 MiB fit in 8 MiB, 3 do not
            if page.done:
                break
        assert got == 7 and pages == 4

    try:
        asyncio.run(body())
    finally:
        store.close()


def test_the_read_cache_never_serves_a_changed_entry(db_url, tmp_path):
    async def body(d: Dicts):
        did = (await d.objects.lookup("cached", True)).object_id
        await put(d, did, {b"k": b"1", b"j": b"2"})
        assert (await d.get(did, b"k")).value == b"1"
        assert d.cache.get(did, key_hash(b"k")) is not None  # filled by the read
        await put(d, did, {b"k": b"new"})
        assert (await d.get(did, b"k")).value == b"new"
        assert (await d.pop(did, b"k")).value == b"new"
        assert not (await d.get(did, b"k")).found
        assert (await d.get(did, b"j")).value == b"2"
        await d.clear(did)
        assert not (await d.get(did, b"j")).found
        # a read in flight while a change is queued does not fill the cache
        await put(d, did, {b"r": b"old"})
        d.cache.forget_dicts([did])  # (the put filled it)
        reading = asyncio.ensure_future(d.get(did, b"r"))
        await asyncio.sleep(0)  # the read is queued
        await put(d, did, {b"r": b"newer"})
        await reading
        assert (await d.get(did, b"r")).value == b"newer"
        # deleting the Dict forgets its entries
        assert (await d.get(did, b"r")).found
        await d.objects.delete_name("cached")
        with pytest.raises(exc.NotFoundError):
            await d.get(did, b"r")

    run(db_url, tmp_path, body)


def test_a_committed_put_fills_the_cache_unless_another_change_came_between(db_url, tmp_path):
    async def body(d: Dicts):
        did = (await d.objects.lookup("written", True)).object_id
        kh = key_hash(b"w")
        await put(d, did, {b"w": b"1"})
        cached = d.cache.get(did, kh)
        assert cached is not None and cached.value == b"1"
        first = asyncio.ensure_future(put(d, did, {b"w": b"2"}))
        await asyncio.sleep(0)  # queued
        await put(d, did, {b"w": b"3"})
        await first
        cached = d.cache.get(did, kh)
        assert cached is not None and cached.value == b"3"
        assert (await d.get(did, b"w")).value == b"3"
        await put(d, did, {b"w": b"4"}, skip=True)  # skipped: the entry stays
        assert (await d.get(did, b"w")).value == b"3"

    run(db_url, tmp_path, body)


def test_the_read_cache_keeps_the_ttl(db_url, tmp_path):
    async def body(d: Dicts):
        did = (await d.objects.lookup("cached-ttl", True)).object_id
        await put(d, did, {b"k": b"1"})
        assert (await d.get(did, b"k")).found  # cached, with its access time
        await asyncio.sleep(1.2)  # past the 1 s TTL without an access
        assert not (await d.get(did, b"k")).found

    run(db_url, tmp_path, body, ttl_s=1.0)
