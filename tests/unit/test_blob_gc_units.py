"""The blob collector (``server/blob_gc.py``) against a real store on SQLite and
PostgreSQL: every table that names blobs is marked (paged, composite keys included), what
no row names is swept once past the grace period, a dry run deletes nothing, naming a key
again keeps it young, and leftovers of interrupted uploads go."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import msgspec
import pytest
from sqlalchemy import insert, update

from strato.protocol import images
from strato.protocol import messages as m
from strato.protocol.mounts import MountFile, MountManifest, encode_manifest, mount_id
from strato.server import blob_gc
from strato.server.blob_gc import Collector
from strato.server.store import Store
from strato.server.store import schema as t
from strato.server.store import tables_sandboxes as tsb
from strato.server.store import tables_state as ts
from strato.server.store import tables_volumes as tv
from strato.server.store.blobs import BlobStore

OLD = time.time() - 7 * 86400  # a week ago: past any grace period here


def age(blobs: BlobStore, *keys: str, when: float = OLD) -> None:
    for k in keys:
        os.utime(blobs.path(k), (when, when))


def insert_rows(store: Store, table, rows: list[dict]) -> None:
    store._write("test_rows", lambda c: c.execute(insert(table), rows)).wait()


def make_app(store: Store, name: str, specs: list[m.FunctionSpec], mount: MountManifest):
    app_id = f"ap-{name}"
    fns = [(f"fu-{name}-{i}", s.name, msgspec.msgpack.encode(s)) for i, s in enumerate(specs)]
    store.create_app(
        app_id, name, "deployed", fns, (mount_id(mount), encode_manifest(mount)), False
    )
    return app_id


def stop(store: Store, app_id: str, at: float) -> None:
    store._write(
        "test_stop",
        lambda c: c.execute(
            update(t.apps).where(t.apps.c.app_id == app_id).values(state="stopped", stopped_at=at)
        ),
    ).wait()


def collect(gc: Collector, dry_run: bool = False) -> blob_gc.GcResult:
    return asyncio.run(gc.collect(dry_run))


@pytest.fixture
def small_pages(monkeypatch):
    monkeypatch.setattr(blob_gc, "PAGE", 3)  # many pages from a few rows


def test_marks_every_table_and_sweeps_the_rest(db_url, tmp_path: Path, small_pages):
    store = Store(db_url, journal=False)
    blobs = BlobStore(tmp_path / "blobs")
    try:
        put = {name: blobs.put(name.encode() * 100) for name in [f"b{i}" for i in range(40)]}
        k = list(put.values())
        # calls: arguments, outputs, generator items
        insert_rows(
            store,
            t.inputs,
            [
                {
                    "input_id": i,
                    "call_id": "ca-1",
                    "idx": i,
                    "status": "done",
                    "attempts": 0,
                    "args_blob": a,
                    "output_blob": o,
                }
                for i, (a, o) in enumerate([(k[0], None), (None, k[1]), (k[2], k[3]), (None, None)])
            ],
        )
        insert_rows(
            store,
            t.gen_items,
            [
                {"seq": s, "call_id": "ca-1", "idx": 0, "gen_index": s, "blob": b}
                for s, b in enumerate([k[4], None, k[5]])
            ],
        )
        # Dict values (composite primary key, paged)
        insert_rows(
            store,
            ts.dict_entries,
            [
                {
                    "dict_id": f"di-{d}",
                    "key_hash": f"{h:064x}",
                    "seq": h,
                    "key": b"k",
                    "value_blob": k[6 + h] if h < 5 else None,
                    "value": None if h < 5 else b"v",
                    "accessed_at": time.time(),
                }
                for d in range(2)
                for h in range(d * 4, d * 4 + 4)
            ],
        )
        # volume blocks (space-separated, composite key, inline files have none)
        insert_rows(
            store,
            tv.volume_files,
            [
                {
                    "volume_id": "vo-1",
                    "path": f"f{i}",
                    "size": 1,
                    "mode": 0o644,
                    "mtime": 0.0,
                    "blocks": blocks,
                    "data": None if blocks else b"x",
                    "version": 1,
                }
                for i, blocks in enumerate([f"{k[11]} {k[12]}", "", k[13], f"{k[13]} {k[14]}"])
            ],
        )
        # a running app: its code mount and image files; a long-stopped one: neither
        image = images.ImageSpec(
            [
                images.DebianSlim("bookworm", "3.11"),
                images.AddFiles([("/a", k[15], 0o644)]),
                images.SnapshotLayer(sha256=k[16], size=10),
            ]
        )
        live_mount = MountManifest([[MountFile("m.py", k[17], 10, 0o644)]])
        make_app(store, "live", [m.FunctionSpec("f", "m", "f", image=image)], live_mount)
        old_mount = MountManifest([[MountFile("o.py", k[18], 10, 0o644)]])
        old_image = images.ImageSpec([images.SnapshotLayer(sha256=k[19], size=1)])
        old = make_app(store, "old", [m.FunctionSpec("f", "m", "f", image=old_image)], old_mount)
        stop(store, old, OLD)
        store._write(
            "test_age_mount",
            lambda c: c.execute(
                update(t.mounts)
                .where(t.mounts.c.mount_id == mount_id(old_mount))
                .values(created_at=OLD)
            ),
        ).wait()
        # a sandbox snapshot's layer: its image is the client's, kept while recorded
        insert_rows(store, tsb.snapshot_layers, [{"sha256": k[21], "size": 1, "created_at": OLD}])
        # a sandbox's spec in memory only
        sandbox = m.FunctionSpec(
            "sb", "", "", image=images.ImageSpec([images.SnapshotLayer(sha256=k[20], size=1)])
        )
        referenced = {*k[0:11], *k[11:18], k[20], k[21]}
        age(blobs, *k)
        gc = Collector(store, blobs, grace_s=3600.0, live_specs=lambda: [sandbox])

        dry = collect(gc, dry_run=True)
        assert dry.dry_run and dry.deleted == len(k) - len(referenced)
        assert all(blobs.path(x).exists() for x in k), "a dry run deletes nothing"

        res = collect(gc)
        assert res.marked == len(referenced)
        assert (res.kept, res.deleted) == (len(referenced), len(k) - len(referenced))
        assert res.bytes_freed == sum(
            len(n.encode()) * 100 for n, x in put.items() if x not in referenced
        )
        for x in k:
            assert blobs.path(x).exists() == (x in referenced), x
        assert collect(gc).deleted == 0, "a second round finds nothing more"
    finally:
        store.close()


def test_grace_period_and_naming_again(tmp_path: Path):
    store = Store(f"sqlite:///{tmp_path / 'state.db'}", journal=False)
    blobs = BlobStore(tmp_path / "blobs")
    try:
        young = blobs.put(b"young")  # an upload no row names yet
        old, rehad, reput = (blobs.put(x) for x in (b"old", b"has", b"put"))
        age(blobs, old, rehad, reput)
        assert blobs.has(rehad)  # a key someone is about to name (e.g. /blobs/check)
        assert blobs.put(b"put") == reput  # the same content stored again
        # interrupted uploads: an old leftover goes, a young one (in flight) stays
        stale, fresh = blobs.root / "tmp" / "put-1-dead", blobs.root / "tmp" / "put-2-live"
        stale.parent.mkdir(exist_ok=True)
        stale.write_bytes(b"x")
        fresh.write_bytes(b"y")
        os.utime(stale, (OLD, OLD))
        half = blobs.path(old).with_suffix(".tmp9-dead")
        half.write_bytes(b"z")
        os.utime(half, (OLD, OLD))

        res = collect(Collector(store, blobs, grace_s=3600.0))
        assert (res.deleted, res.kept, res.kept_young) == (1, 3, 3)
        assert not blobs.path(old).exists()
        assert all(blobs.path(x).exists() for x in (young, rehad, reput))
        assert not stale.exists() and not half.exists() and fresh.exists()

        res = collect(Collector(store, blobs, grace_s=0.0))
        assert res.deleted == 3, "with no grace period nothing unreferenced is kept"
    finally:
        store.close()


def test_a_blob_named_during_the_sweep_is_put_back(tmp_path: Path):
    blobs = BlobStore(tmp_path / "blobs")
    key = blobs.put(b"raced")
    aside = str(blobs.root / "tmp" / "gc-x")
    (blobs.root / "tmp").mkdir(exist_ok=True)
    # the sweep saw it old; `refresh` came before the rename: it is young when checked again
    assert blob_gc._delete(str(blobs.path(key)), aside, cutoff=time.time() - 60) is None
    assert blobs.get(key) == b"raced" and not os.path.exists(aside)
    age(blobs, key)
    assert blob_gc._delete(str(blobs.path(key)), aside, cutoff=time.time() - 60) == 5
    assert not blobs.has(key)
    assert blob_gc._delete(str(blobs.path(key)), aside, cutoff=time.time()) == -1


def test_a_version_6_database_gains_snapshot_layers(tmp_path: Path):
    from sqlalchemy import inspect, text

    from strato.server.store.migrations import LATEST, current_version

    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = Store(url, journal=False)
    with store.conn.begin():
        store.conn.execute(text("DROP TABLE snapshot_layers"))
        store.conn.execute(text("UPDATE schema_version SET version = 6"))
    store.close()
    again = Store(url, journal=False)
    try:
        with again.conn.begin():
            assert current_version(again.conn) == LATEST
            assert inspect(again.conn).has_table("snapshot_layers")
    finally:
        again.close()
