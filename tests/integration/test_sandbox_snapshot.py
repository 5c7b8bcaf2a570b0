"""``sb.snapshot_filesystem()`` end to end under bwrap and gVisor: a sandbox in a Debian
image writes files, its snapshot is an image that a new sandbox and a function see them
in; a snapshot of that sandbox after it deleted one (a whiteout) hides it; a sandbox
without an image and one that ended get a clear error."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid

import pytest
from conftest import dedicated_server

import strato
from strato import exceptions as exc

pytestmark = pytest.mark.slow

ISOLATING = [r for r in ("bwrap", "gvisor") if shutil.which("bwrap" if r == "bwrap" else "runsc")]
if os.geteuid() != 0 or len(ISOLATING) < 2:
    pytest.fail("these tests need root, bubblewrap and runsc (.ci/run installs them)")

IMAGE_CACHE = os.environ.get("STRATO_TEST_IMAGE_CACHE", "/tmp/strato-test-image-cache")


@pytest.fixture(scope="module")
def image_server(strato_server):
    with dedicated_server({"STRATO_IMAGE_CACHE": IMAGE_CACHE}) as handle:
        yield handle


def _run(sb: strato.Sandbox, script: str) -> str:
    p = sb.exec("sh", "-c", script)
    out = p.stdout.read()
    assert p.wait() == 0, (p.stderr.read(), sb.poll(), sb.reason)
    return out


@pytest.mark.parametrize("runtime", ISOLATING)
def test_a_snapshot_is_an_image_for_new_sandboxes_and_functions(image_server, runtime):
    app = strato.App.lookup(f"sbsnap-{uuid.uuid4().hex[:8]}", create_if_missing=True)
    base = strato.Image.debian_slim()
    sb = strato.Sandbox.create(app=app, image=base, runtime=runtime, timeout=600)
    try:
        _run(sb, "mkdir -p app/sub && cd app && echo kept > note.txt && echo gone > sub/old.txt")
        with sb.open("/root/app/sub/data.bin", "wb") as f:  # (through the agent's file operations)
            f.write(b"\x00\x01" * 1000)
        snap = sb.snapshot_filesystem()
        # the same files again: the same image (content-addressed)
        assert sb.snapshot_filesystem().object_id == snap.object_id
    finally:
        sb.terminate()
    assert isinstance(snap, strato.Image) and snap.object_id != base.object_id

    sb2 = strato.Sandbox.create(app=app, image=snap, runtime=runtime, timeout=600)
    try:
        assert (
            _run(sb2, "cd app && cat note.txt sub/old.txt; wc -c < sub/data.bin")
            == "kept\ngone\n2000\n"
        )
        assert _run(sb2, "cat /etc/debian_version") != ""  # the image's own files too
        _run(sb2, "cd app && rm sub/old.txt && echo again >> note.txt")
        snap2 = asyncio.run(sb2.snapshot_filesystem.aio())  # (the .aio twin)
    finally:
        sb2.terminate()

    fn_app = strato.App(f"sbsnap-fn-{uuid.uuid4().hex[:6]}")

    @fn_app.function(image=snap2, runtime=runtime, serialized=True, timeout=300)
    def look() -> dict:
        return {
            "note": open("/root/app/note.txt").read(),
            "old": os.path.exists("/root/app/sub/old.txt"),
            "data": os.path.getsize("/root/app/sub/data.bin"),
        }

    with fn_app.run(quiet=True):
        assert look.remote() == {"note": "kept\nagain\n", "old": False, "data": 2000}


def test_a_snapshot_needs_a_running_sandbox_with_an_image(server):
    app = strato.App.lookup(f"sbsnap-bad-{uuid.uuid4().hex[:8]}", create_if_missing=True)
    sb = strato.Sandbox.create(app=app, runtime="bwrap", timeout=120)
    try:
        with pytest.raises(exc.InvalidError, match="needs one made with Sandbox.create"):
            sb.snapshot_filesystem()
    finally:
        sb.terminate()
    sb.wait(raise_on_termination=False)
    with pytest.raises(exc.SandboxTerminatedError, match="has ended"):
        sb.snapshot_filesystem()


def test_a_snapshot_on_a_joined_node(strato_server):
    """The node that runs the sandbox uploads the layer over the HTTP API (its own
    credential); a new sandbox of the snapshot, on that node, sees the file."""
    from cluster_nodes import one_joined_node

    with one_joined_node("sbsnap-node", env={"STRATO_IMAGE_CACHE": IMAGE_CACHE}):
        app = strato.App.lookup("sbsnap-joined", create_if_missing=True)
        image = strato.Image.debian_slim()
        sb = strato.Sandbox.create(app=app, image=image, runtime="bwrap", timeout=600)
        try:
            _run(sb, "echo joined > /root/mark.txt")
            snap = sb.snapshot_filesystem()
        finally:
            sb.terminate()
        sb2 = strato.Sandbox.create(app=app, image=snap, runtime="bwrap", timeout=600)
        try:
            assert _run(sb2, "cat /root/mark.txt") == "joined\n"
        finally:
            sb2.terminate()
