"""Volume manifests in the control plane's store, on SQLite and on PostgreSQL: commits
merge per file (the last wins), refusals change nothing, copies and removals, and a
store reopened keeps every committed version."""

from __future__ import annotations

import asyncio

import pytest

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.server.store import Store
from strato.server.store.blobs import BlobStore
from strato.server.volumes import VolumeService


def run(url: str, blobs: BlobStore, body, max_bytes: int = 1 << 30) -> None:
    store = Store(url, journal=False)
    try:
        asyncio.run(body(VolumeService(store, blobs, max_bytes)))
    finally:
        store.close()


def put(blobs: BlobStore, path: str, data: bytes) -> m.VolumeFile:
    return m.VolumeFile(path, len(data), 0o644, 1.0, [blobs.put(data)] if data else [])


def files(man: m.VolumeManifest) -> dict[str, list[str]]:
    return {f.path: f.blocks for f in man.files}


def test_commits_merge_per_file_and_survive_a_reopen(db_url, tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    a1, a2, b = put(blobs, "a", b"1"), put(blobs, "a", b"2"), put(blobs, "d/b", b"b")

    async def first(svc: VolumeService):
        info = await svc.create(m.CreateVolume("v", create_if_missing=True))
        assert (await svc.create(m.CreateVolume("v"))).volume_id == info.volume_id
        with pytest.raises(exc.AlreadyExistsError):
            await svc.create(m.CreateVolume("v", create_if_missing=True, exists_ok=False))
        with pytest.raises(exc.NotFoundError):
            await svc.create(m.CreateVolume("w"))
        assert (await svc.commit("v", m.VolumeCommit([a1]))).version == 1
        assert (await svc.commit(info.volume_id, m.VolumeCommit([b]))).version == 2
        v = await svc.commit("v", m.VolumeCommit([a2]))  # the same file: the last wins
        assert (v.version, v.size, v.n_files) == (3, 2, 2)
        assert files(await svc.manifest("v")) == {"a": a2.blocks, "d/b": b.blocks}
        assert files(await svc.manifest("v", "d")) == {"d/b": b.blocks}
        assert [i.name for i in (await svc.named()).volumes] == ["v"]

    async def second(svc: VolumeService):
        man = await svc.manifest("v")
        assert man.version == 3 and files(man) == {"a": a2.blocks, "d/b": b.blocks}
        await svc.delete("v")
        with pytest.raises(exc.NotFoundError):
            await svc.manifest("v")

    run(db_url, blobs, first)
    run(db_url, blobs, second)


def test_refused_commits_change_nothing(db_url, tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    small = put(blobs, "small", b"x" * 60)

    async def body(svc: VolumeService):
        await svc.create(m.CreateVolume("v", create_if_missing=True))
        await svc.commit("v", m.VolumeCommit([small]))
        big = put(blobs, "big", b"y" * 50)
        with pytest.raises(exc.RequestSizeError, match="STRATO_VOLUME_MAX_BYTES"):
            await svc.commit("v", m.VolumeCommit([big]))
        with pytest.raises(exc.InvalidError, match="not uploaded"):
            await svc.commit("v", m.VolumeCommit([m.VolumeFile("n", 1, blocks=["a" * 64])]))
        with pytest.raises(exc.InvalidError, match=r"\.\."):
            await svc.commit("v", m.VolumeCommit(deletes=["../small"]))
        with pytest.raises(exc.NotFoundError):
            await svc.commit("v", m.VolumeCommit(deletes=["nope"], missing_ok=False))
        with pytest.raises(exc.InvalidError, match="inline"):
            lie = m.VolumeFile("i", 5, data=b"abc")
            await svc.commit("v", m.VolumeCommit([lie]))
        with pytest.raises(exc.InvalidError, match="both a file and a directory"):
            await svc.commit("v", m.VolumeCommit([put(blobs, "p", b"1"), put(blobs, "p/q", b"2")]))
        info = await svc.info("v")
        assert (info.version, info.size, info.n_files) == (1, 60, 1)
        # replacing a file frees its old size
        assert (await svc.commit("v", m.VolumeCommit([put(blobs, "small", b"z" * 90)]))).size == 90

    run(db_url, blobs, body, max_bytes=100)


def test_copy_remove_and_paths_replacing_each_other(db_url, tmp_path):
    blobs = BlobStore(tmp_path / "blobs")

    async def body(svc: VolumeService):
        await svc.create(m.CreateVolume("v", create_if_missing=True))
        f1, f2 = put(blobs, "d/one", b"1"), m.VolumeFile("d/e/two", 1, data=b"2")  # inline
        await svc.commit("v", m.VolumeCommit([f1, f2]))
        with pytest.raises(exc.InvalidError, match="recursive"):
            await svc.copy("v", m.VolumeCopy(["d"], "c"))
        await svc.copy("v", m.VolumeCopy(["d"], "c", recursive=True))
        await svc.copy("v", m.VolumeCopy(["d/one", "d/e/two"], "flat/"))
        got = files(await svc.manifest("v"))
        assert set(got) == {"d/one", "d/e/two", "c/one", "c/e/two", "flat/one", "flat/two"}
        assert got["c/one"] == f1.blocks  # copies share blocks
        inline = {f.path: f.data for f in (await svc.manifest("v", "c")).files}
        assert inline["c/e/two"] == b"2"
        no_data = (await svc.manifest("v", "c", data=False)).files
        assert [f.data for f in no_data] == [None, None]
        with pytest.raises(exc.InvalidError, match="recursive"):
            await svc.commit("v", m.VolumeCommit(deletes=["c"]))
        await svc.commit("v", m.VolumeCommit(recursive_deletes=["c"]))
        # a later commit of a file where a directory was replaces it (and back)
        await svc.commit("v", m.VolumeCommit([put(blobs, "d", b"file now")]))
        assert set(files(await svc.manifest("v"))) == {"d", "flat/one", "flat/two"}
        await svc.commit("v", m.VolumeCommit([put(blobs, "d/x", b"dir again")]))
        assert set(files(await svc.manifest("v"))) == {"d/x", "flat/one", "flat/two"}
        assert (await svc.info("v")).n_files == 3

    run(db_url, blobs, body)
