"""The blob collector keeps a sandbox snapshot's layer after its sandbox ended (grace
period 0): the image is the client's, and a new sandbox started from it later builds it
from that blob and sees the snapshot's files."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest
from conftest import dedicated_server, wait_until

import strato
from strato.client import session
from strato.protocol import messages as m

if os.geteuid() != 0 or not shutil.which("bwrap"):
    pytest.fail("this test needs root and bubblewrap (.ci/run installs them)")

IMAGE_CACHE = os.environ.get("STRATO_TEST_IMAGE_CACHE", "/tmp/strato-test-image-cache")
ENV = {
    "STRATO_IMAGE_CACHE": IMAGE_CACHE,
    "STRATO_BLOB_GC_GRACE_S": "0",
    "STRATO_BLOB_GC_INTERVAL_S": "0",
}


def _run(sb: strato.Sandbox, script: str) -> str:
    p = sb.exec("sh", "-c", script)
    out = p.stdout.read()
    assert p.wait() == 0, (p.stderr.read(), sb.poll(), sb.reason)
    return out


def test_a_snapshot_layer_outlives_its_sandbox(strato_server):
    note = uuid.uuid4().hex
    with dedicated_server(ENV) as server:
        blobs = server.home / "blobs"
        app = strato.App.lookup(f"gcsnap-{note[:8]}", create_if_missing=True)
        sb = strato.Sandbox.create(
            app=app, image=strato.Image.debian_slim(), runtime="bwrap", timeout=600
        )
        try:
            _run(sb, f"echo {note} > /root/note.txt")
            before = {p.name for p in blobs.glob("??/*")}
            snap = sb.snapshot_filesystem()
            layers = {p.name for p in blobs.glob("??/*")} - before
            assert len(layers) == 1, layers
        finally:
            sb.terminate()
        wait_until(lambda: sb.poll() is not None, 60, "the sandbox to end")

        res = session.api().call("POST", "/blobs/gc", m.BlobGc(), m.BlobGcReport)
        assert layers <= {p.name for p in blobs.glob("??/*")}, (
            "the snapshot's layer is kept",
            res,
        )

        sb2 = strato.Sandbox.create(app=app, image=snap, runtime="bwrap", timeout=600)
        try:
            assert _run(sb2, "cat /root/note.txt") == f"{note}\n"
        finally:
            sb2.terminate()
    strato_server.activate()
