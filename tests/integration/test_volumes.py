"""Volumes end to end: the real control plane, worker and containers (the ``process``
runtime, which mounts a volume in the container's own mount namespace, so these tests
need root). Modal's consistency model: a container sees the volume as of its start or
its last reload; its writes become visible at commit (or its exit); of two commits of
one file the later wins, of different files both survive."""

from __future__ import annotations

import asyncio
import io
import os
import threading

import pytest
from apps import volumes as va
from click.testing import CliRunner
from conftest import dedicated_server, wait_until

import strato
from strato import exceptions as exc
from strato.cli.main import main as cli_main
from strato.client import session
from strato.protocol import messages as m

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the process runtime mounts volumes as root"
)


def files_of(vol: strato.Volume) -> dict[str, bytes]:
    return {
        e.path: b"".join(vol.read_file(e.path))
        for e in vol.iterdir("/", recursive=True)
        if e.type == strato.volume.FileEntryType.FILE
    }


def fresh(name: str) -> strato.Volume:
    try:
        strato.Volume.delete(name)
    except exc.NotFoundError:
        pass
    return strato.Volume.from_name(name, create_if_missing=True).hydrate()


@pytest.fixture
def vols(server):
    return fresh(va.VOL), fresh(va.OTHER)


@pytest.fixture
def running(vols):
    with va.app.run(quiet=True):
        yield vols


# ---------------------------------------------------------------------- outside containers


def test_upload_list_read_copy_remove(vols, tmp_path):
    vol, _ = vols
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "one.txt").write_bytes(b"one")
    (tmp_path / "d" / "e" / "two.txt").write_bytes(b"two")
    big = os.urandom(9 << 20) + b"tail"  # two blocks
    sizes = {"tiny": 10, "small": 10 << 10, "medium": 200 << 10, "empty": 0}  # inline, blobs
    mixed = {name: os.urandom(n) for name, n in sizes.items()}
    with vol.batch_upload() as batch:
        batch.put_directory(tmp_path / "d", "/dir")
        batch.put_file(io.BytesIO(big), "/big.bin")
        for name, data in mixed.items():
            batch.put_file(io.BytesIO(data), f"mixed/{name}")
    assert {p: d for p, d in files_of(vol).items() if p.startswith("mixed/")} == {
        f"mixed/{k}": v for k, v in mixed.items()
    }
    vol.remove_file("mixed", recursive=True)
    names = {(e.path, e.type.name) for e in vol.listdir("/")}
    assert names == {("dir", "DIRECTORY"), ("big.bin", "FILE")}
    deep = {e.path for e in vol.listdir("/dir", recursive=True)}
    assert deep == {"dir/one.txt", "dir/e", "dir/e/two.txt"}
    chunks = list(vol.read_file("big.bin"))
    assert len(chunks) == 2 and b"".join(chunks) == big  # streamed, block by block
    with pytest.raises(FileExistsError):
        with vol.batch_upload() as batch:
            batch.put_file(io.BytesIO(b"x"), "dir/one.txt")
    vol.copy_files(["dir/one.txt"], "copy.txt")
    with pytest.raises(exc.InvalidError, match="recursive"):
        vol.copy_files(["dir"], "dir2")
    vol.copy_files(["dir"], "dir2", recursive=True)
    vol.remove_file("big.bin")
    with pytest.raises(exc.InvalidError, match="recursive"):
        vol.remove_file("dir")
    vol.remove_file("dir", recursive=True)
    assert files_of(vol) == {
        "copy.txt": b"one",
        "dir2/one.txt": b"one",
        "dir2/e/two.txt": b"two",
    }
    with pytest.raises(exc.NotFoundError):
        vol.remove_file("nothing-here")

    async def aio() -> list:
        await vol.remove_file.aio("copy.txt")
        return [c async for c in vol.read_file.aio("dir2/one.txt")]

    assert asyncio.run(aio()) == [b"one"]
    assert "copy.txt" not in files_of(vol)


def test_ephemeral_volume_is_deleted_after_its_block(server):
    with strato.Volume.ephemeral() as vol:
        with vol.batch_upload() as batch:
            batch.put_file(io.BytesIO(b"tmp"), "t.txt")
        assert files_of(vol) == {"t.txt": b"tmp"}
        vid = vol.object_id
    with pytest.raises(exc.NotFoundError):
        session.api().call("GET", f"/volumes/{vid}", None, m.VolumeInfo)


def test_concurrent_commits_of_different_files_both_survive(vols):
    vol, _ = vols
    errors: list[BaseException] = []

    def upload(i: int) -> None:
        try:
            with strato.Volume.from_name(va.VOL).batch_upload() as batch:
                batch.put_file(io.BytesIO(f"v{i}".encode()), f"f{i}.txt")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert files_of(vol) == {f"f{i}.txt": f"v{i}".encode() for i in range(8)}


def test_size_limit_is_refused_and_changes_nothing():
    with dedicated_server({"STRATO_VOLUME_MAX_BYTES": "1000", "STRATO_RUNTIME": "process"}):
        vol = strato.Volume.from_name("limited", create_if_missing=True)
        with vol.batch_upload() as batch:
            batch.put_file(io.BytesIO(b"a" * 600), "a.bin")
        before = vol.info()
        with pytest.raises(exc.RequestSizeError, match="STRATO_VOLUME_MAX_BYTES"):
            with vol.batch_upload() as batch:
                batch.put_file(io.BytesIO(b"b" * 300), "b.bin")
                batch.put_file(io.BytesIO(b"c" * 300), "c.bin")
        after = vol.info()
        assert (after.version, after.size, after.n_files) == (before.version, 600, 1)
        assert files_of(vol) == {"a.bin": b"a" * 600}
        with vol.batch_upload(force=True) as batch:  # replacing a file counts its new size
            batch.put_file(io.BytesIO(b"d" * 900), "a.bin")
        assert vol.info().size == 900
        # a container's commit over the limit: refused, the error reaches the caller
        fresh(va.VOL)
        with va.app.run(quiet=True):
            assert va.write.remote({"ok.txt": "x" * 500}) == {"ok.txt": "x" * 500}
            with pytest.raises(exc.RequestSizeError, match="STRATO_VOLUME_MAX_BYTES"):
                va.write.remote({"big.txt": "y" * 600})
        assert files_of(strato.Volume.from_name(va.VOL)) == {"ok.txt": b"x" * 500}


def test_bad_input_gets_clear_errors_and_changes_nothing(vols):
    vol, _ = vols
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"keep"), "keep.txt")
    version = vol.info().version
    for bad in ("", "a b", "../x", "x/y", "-lead", "n" * 65, "bad\x00"):
        with pytest.raises(exc.InvalidError, match="volume name"):
            strato.Volume.from_name(bad)
    with pytest.raises(exc.NotFoundError, match="strato volume create"):
        strato.Volume.from_name("no-such-volume").listdir("/")
    for path in ("../escape", "a/../../b", "/../etc/passwd"):
        with pytest.raises(exc.InvalidError, match=r"\.\."):
            with vol.batch_upload() as batch:
                batch.put_file(io.BytesIO(b"no"), path)
        with pytest.raises(exc.InvalidError, match=r"\.\."):
            list(vol.read_file(path))
    with pytest.raises(exc.InvalidError, match=r"\.\."):
        vol.copy_files(["keep.txt"], "../out")
    # the API checks too, whatever a client sends
    with pytest.raises(exc.InvalidError, match=r"\.\."):
        session.api().call(
            "POST",
            f"/volumes/{vol.object_id}/commit",
            m.VolumeCommit(deletes=["a/../../etc"]),
            m.VolumeVersion,
        )
    with pytest.raises(exc.InvalidError, match="not uploaded"):
        fake = m.VolumeFile("f.txt", 3, blocks=["0" * 64])
        session.api().call(
            "POST", f"/volumes/{vol.object_id}/commit", m.VolumeCommit([fake]), m.VolumeVersion
        )
    with pytest.raises(exc.InvalidError, match="blocks hold"):
        key = session.api().call("POST", "/volume-blobs", m.BlobBatch([b"abc"]), m.BlobKeys).keys[0]
        lie = m.VolumeFile("f.txt", 10, blocks=[key])
        session.api().call(
            "POST", f"/volumes/{vol.object_id}/commit", m.VolumeCommit([lie]), m.VolumeVersion
        )
    assert vol.info().version == version
    assert files_of(vol) == {"keep.txt": b"keep"}
    # mount paths
    app = strato.App("strato-test-volume-bad")
    for mounts in ({"data": vol}, {"/proc/x": vol}, {"/a": vol, "/a/b": vol}, {"/x": "vol"}):
        with pytest.raises(exc.InvalidError):
            app.function(volumes=mounts)  # type: ignore[arg-type]
    # an unknown volume stops the app before it starts
    bad_app = strato.App("strato-test-volume-unknown")
    bad_app.function(serialized=True, volumes={"/srv": strato.Volume.from_name("nope-vol")})(
        lambda: None
    )
    before = len(session.api().call("GET", "/apps", None, m.AppList).apps)
    with pytest.raises(exc.NotFoundError, match="nope-vol"):
        with bad_app.run(quiet=True):
            pass
    assert len(session.api().call("GET", "/apps", None, m.AppList).apps) == before


def test_cli(vols, tmp_path):
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli_main, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha")
    (src / "sub").mkdir()
    (src / "sub" / "b.txt").write_text("beta")
    run("volume", "create", "strato-test-cli")
    try:
        again = runner.invoke(cli_main, ["volume", "create", "strato-test-cli"])
        assert again.exit_code == 1 and "exists" in again.output
        assert "strato-test-cli" in run("volume", "list")
        run("volume", "put", "strato-test-cli", str(src), "/up")
        run("volume", "put", "strato-test-cli", str(src / "a.txt"), "/single.txt")
        listing = run("volume", "ls", "strato-test-cli", "/up", "-r")
        assert "up/a.txt" in listing and "up/sub/b.txt" in listing
        run("volume", "cp", "strato-test-cli", "single.txt", "copied.txt")
        run("volume", "rm", "strato-test-cli", "single.txt")
        out = tmp_path / "out"
        run("volume", "get", "strato-test-cli", "/up", str(out))
        assert (out / "up" / "sub" / "b.txt").read_text() == "beta"
        assert run("volume", "get", "strato-test-cli", "copied.txt", "-") == "alpha"
        bad = runner.invoke(cli_main, ["volume", "rm", "strato-test-cli", "../x"])
        assert bad.exit_code == 1 and ".." in bad.output
    finally:
        run("volume", "delete", "strato-test-cli", "--yes")
    gone = runner.invoke(cli_main, ["volume", "ls", "strato-test-cli"])
    assert gone.exit_code == 1 and "no volume named" in gone.output


# ---------------------------------------------------------------------- in containers


def test_commit_in_one_container_is_seen_by_another_after_reload(running):
    vol, other = running
    with other.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"from outside"), "ro.txt")
    # a container started now sees both volumes as they are
    assert va.read.remote(reload=False) == {"srv": {}, "media": {"ro.txt": "from outside"}}
    assert va.write.remote({"x/a.txt": "A", "b.txt": "B"}) == {"x/a.txt": "A", "b.txt": "B"}
    assert files_of(vol) == {"x/a.txt": b"A", "b.txt": b"B"}
    # the reader container started before the commit: it sees it once it reloads
    assert va.read.remote(reload=False)["srv"] == {}
    assert va.read.remote(reload=True)["srv"] == {"x/a.txt": "A", "b.txt": "B"}
    # a deletion travels the same way
    assert va.write.remote({}, remove=["b.txt"]) == {"x/a.txt": "A"}
    assert va.read.remote(reload=True)["srv"] == {"x/a.txt": "A"}
    # larger files go as blobs, not inline
    mid = {"m/20k.txt": "m" * 20_000, "m/300k.txt": "n" * 300_000}
    assert va.write.remote(mid) == {"x/a.txt": "A", **mid}
    assert va.read.remote(reload=True)["srv"] == {"x/a.txt": "A", **mid}


def test_read_only_mount_refuses_writes(running):
    _, other = running
    with other.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"ro"), "ro.txt")
    out = va.write_read_only.remote("ro.txt")
    assert out.startswith("OSError,InvalidError:"), out  # EROFS, then commit refused
    assert files_of(other) == {"ro.txt": b"ro"}


def test_same_file_last_commit_wins_and_other_files_survive(running):
    vol, _ = running
    va.write.remote({"same.txt": "first", "a.txt": "a"})
    with vol.batch_upload(force=True) as batch:  # a later commit of the same file
        batch.put_file(io.BytesIO(b"second"), "same.txt")
        batch.put_file(io.BytesIO(b"b"), "b.txt")
    # the writer container still has its old copy; its next commit of same.txt is last
    va.write.remote({"same.txt": "third", "c.txt": "c"})
    assert files_of(vol) == {"same.txt": b"third", "a.txt": b"a", "b.txt": b"b", "c.txt": b"c"}


def test_concurrent_container_commits_of_different_files(running):
    vol, _ = running
    calls = [va.write.spawn({f"p{i}.txt": str(i)}) for i in range(4)]
    for c in calls:
        c.get(timeout=120)
    assert {k: v for k, v in files_of(vol).items() if k.startswith("p")} == {
        f"p{i}.txt": str(i).encode() for i in range(4)
    }


def test_changes_are_committed_when_the_container_exits(vols):
    vol, _ = vols
    with va.app.run(quiet=True):
        va.write_no_commit.remote("late.txt", "at exit")
        assert files_of(vol) == {}  # not committed yet
    # stopping the app stops its container: the worker commits what it left
    wait_until(lambda: files_of(vol) == {"late.txt": b"at exit"}, 60, "the commit at exit")


def test_class_with_two_writable_volumes(running):
    vol, other = running
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"moved"), "m.txt")
    assert va.Shelf().swap.remote() == {"srv": {}, "media": {"m.txt": "moved"}}
    assert files_of(vol) == {} and files_of(other) == {"m.txt": b"moved"}


def test_a_container_reaches_only_the_volumes_it_mounts(running):
    vol, other = running
    for v in (vol, other):
        with v.batch_upload() as batch:
            batch.put_file(io.BytesIO(b"keep"), "keep.txt")
    assert va.foreign.remote(vol.object_id, other.object_id) == [
        "NotFoundError",  # not mounted: as if it did not exist
        "NotFoundError",
        "AuthError",  # the admin API is closed to containers
        "AuthError",
        "InvalidError",  # the SDK: not mounted in this container
        "ok",  # mounted read-only: readable
        "InvalidError",  # and never written
    ]
    assert files_of(vol) == {"keep.txt": b"keep"} and files_of(other) == {"keep.txt": b"keep"}
    with pytest.raises(exc.NotFoundError):
        strato.Volume.from_name("made-inside").info()


def test_read_only_trees_of_older_versions_are_removed_from_the_node(vols, server):
    _, other = vols
    trees = server.home / "worker" / "volumes" / "trees" / other.object_id
    with va.app.run(quiet=True):
        with other.batch_upload() as batch:
            batch.put_file(io.BytesIO(b"v1"), "ro.txt")
        assert va.read.remote(reload=False)["media"] == {"ro.txt": "v1"}
    with other.batch_upload(force=True) as batch:
        batch.put_file(io.BytesIO(b"v2"), "ro.txt")
    latest = str(other.info().version)
    with va.app.run(quiet=True):
        assert va.read.remote(reload=False)["media"] == {"ro.txt": "v2"}
    # once no container binds it, a version older than the node's newest is removed
    wait_until(lambda: os.listdir(trees) == [latest], 60, "the older tree to be removed")


def test_exit_commit_ignores_a_forged_state_file(vols):
    vol, _ = vols
    with va.app.run(quiet=True):
        va.write_with_forged_state.remote("forged.txt", "still committed")
    wait_until(
        lambda: files_of(vol) == {"forged.txt": b"still committed"}, 60, "the commit at exit"
    )


def test_a_write_in_place_never_reaches_another_containers_view(vols):
    vol, _ = vols
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"original"), "base.txt")
    with va.app.run(quiet=True):
        va.write_no_commit.remote("base.txt", "changed in place")  # not committed
        # another container of the same version: the node's shared files are untouched
        assert va.read.remote(reload=False)["srv"] == {"base.txt": "original"}
    wait_until(lambda: files_of(vol) == {"base.txt": b"changed in place"}, 60, "the commit at exit")
