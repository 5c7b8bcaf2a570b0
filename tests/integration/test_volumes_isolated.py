"""Volumes under the isolating runtimes (bwrap and gVisor), in a Debian image, end to
end: a commit under one runtime is seen under the other after a reload, a read-only
mount refuses writes, what a container leaves is committed at its exit, the container's
unprivileged user writes its writable mounts, and a function mounts two volumes."""

from __future__ import annotations

import io
import os
import shutil

import pytest
from conftest import dedicated_server, wait_until

import strato
from strato import exceptions as exc

pytestmark = pytest.mark.slow

if os.geteuid() != 0 or not shutil.which("bwrap") or not shutil.which("runsc"):
    pytest.fail("these tests need root, bubblewrap and runsc (.ci/run installs them)")

from apps import volumes_isolated as vi  # noqa: E402

IMAGE_CACHE = os.environ.get("STRATO_TEST_IMAGE_CACHE", "/tmp/strato-test-image-cache")
BOTH = [("bwrap", "gvisor"), ("gvisor", "bwrap")]


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


@pytest.fixture(scope="module")
def server_env(strato_server):
    with dedicated_server({"STRATO_IMAGE_CACHE": IMAGE_CACHE}) as handle:
        yield handle


@pytest.fixture
def vols(server_env):
    return fresh(vi.VOL), fresh(vi.OTHER)


@pytest.fixture
def running(vols):
    with vi.app.run(quiet=True):
        yield vols


@pytest.mark.parametrize(("writer", "reader"), BOTH)
def test_a_commit_under_one_runtime_is_seen_under_the_other_after_reload(
    running, server_env, writer, reader
):
    vol, other = running
    with other.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"from outside"), "ro.txt")
    w, r = vi.fns[writer], vi.fns[reader]
    # the reader's container starts before the commit and sees the read-only volume
    assert r["read"].remote(reload=False) == {"vol": {}, "ro": {"ro.txt": "from outside"}}
    big = "z" * 300_000  # a blob, not inline
    out = w["write"].remote({"x/a.txt": "A", "b.txt": "B", "big.txt": big})
    assert out["uid"] == 65534 and out["owners"] == [65534]  # the container's own user
    assert out["files"] == {"x/a.txt": "A", "b.txt": "B", "big.txt": big}
    assert files_of(vol) == {"x/a.txt": b"A", "b.txt": b"B", "big.txt": big.encode()}
    # the writable mount was an overlay over a tree of the container user's files (not a
    # copy per container)
    owned = server_env.home / "worker" / "volumes" / "owned" / "65534.65534" / vol.object_id
    assert owned.is_dir() and os.listdir(owned)
    assert r["read"].remote(reload=False)["vol"] == {}  # as of its start
    assert r["read"].remote(reload=True)["vol"] == {"x/a.txt": "A", "b.txt": "B", "big.txt": big}
    # the reader's runtime writes files the other made (in place, and a new one beside)
    out = r["write"].remote({"b.txt": "+", "x/c.txt": "C"}, append=True)
    assert out["uid"] == 65534 and out["files"]["b.txt"] == "B+"
    assert w["read"].remote(reload=True)["vol"] == {
        "x/a.txt": "A",
        "b.txt": "B+",
        "x/c.txt": "C",
        "big.txt": big,
    }


@pytest.mark.parametrize("runtime", vi.RUNTIMES)
def test_read_only_mount_refuses_writes(running, runtime):
    _, other = running
    with other.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"ro"), "ro.txt")
    out = vi.fns[runtime]["write_read_only"].remote("ro.txt").split(",")
    # a read-only mount; a write in place and a new file are refused (EACCES where the
    # runtime checks the files' owner, root, before the mount's flag), and so is a commit
    assert out[0] == "ro" and out[-1] == "InvalidError", out
    assert set(out[1:3]) <= {"EROFS", "EACCES"}, out
    assert files_of(other) == {"ro.txt": b"ro"}


@pytest.mark.parametrize("runtime", vi.RUNTIMES)
def test_changes_are_committed_when_the_container_exits(vols, runtime):
    vol, _ = vols
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"original"), "base.txt")
    with vi.app.run(quiet=True):
        fn = vi.fns[runtime]["write"]
        out = fn.remote({"late.txt": "at exit", "base.txt": " changed"}, commit=False, append=True)
        assert out["files"] == {"late.txt": "at exit", "base.txt": "original changed"}
        assert files_of(vol) == {"base.txt": b"original"}  # not committed yet
        # a container of the same version, under the other runtime: the node's files (the
        # overlay's lower layer) never saw the write in place
        other_rt = next(rt for rt in vi.RUNTIMES if rt != runtime)
        assert vi.fns[other_rt]["read"].remote(reload=False)["vol"] == {"base.txt": "original"}
    # stopping the app stops its container: the worker commits what it left
    want = {"late.txt": b"at exit", "base.txt": b"original changed"}
    wait_until(lambda: files_of(vol) == want, 60, "the commit at exit")


@pytest.mark.parametrize("runtime", vi.RUNTIMES)
def test_two_writable_volumes_on_one_function(running, runtime):
    vol, other = running
    with other.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"there"), "sub/old.txt")
    out = vi.fns[runtime]["two"].remote(runtime)
    assert out == {
        "vol": {f"{runtime}-a.txt": "a"},
        "other": {"sub/old.txt": "there", f"sub/{runtime}-b.txt": "b"},
    }
    assert files_of(vol) == {f"{runtime}-a.txt": b"a"}
    assert files_of(other) == {"sub/old.txt": b"there", f"sub/{runtime}-b.txt": b"b"}
