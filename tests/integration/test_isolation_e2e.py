"""Functions in a Debian image, in isolated containers, under bwrap and gVisor: the
image's packages, no view of the host or of each other, memory and PIDs limits, and
network blocking, end to end through the control plane."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import dedicated_server

from strato import exceptions as exc

pytestmark = pytest.mark.slow

if os.geteuid() != 0 or not shutil.which("bwrap") or not shutil.which("debootstrap"):
    pytest.fail("these tests need root, bubblewrap and debootstrap (.ci/run installs them)")

from apps import isolated  # noqa: E402

IMAGE_CACHE = os.environ.get("STRATO_TEST_IMAGE_CACHE", "/tmp/strato-test-image-cache")
PROJECT_FILE = Path(__file__).resolve().parents[2] / "pyproject.toml"  # this checkout


@pytest.fixture(scope="module")
def running(strato_server):
    env = {"STRATO_IMAGE_CACHE": IMAGE_CACHE, "STRATO_CONTAINER_PIDS_MAX": "64"}
    with dedicated_server(env), isolated.app.run(quiet=True):
        yield


@pytest.fixture(scope="module")
def host_server():
    """A TCP server on the host's loopback that answers 'hello'."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"hello")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield port
    stop.set()
    t.join(2)
    srv.close()


@pytest.fixture(params=isolated.RUNTIMES)
def fns(request, running):
    return isolated.fns[request.param]


def test_image_packages_and_no_view_of_the_host(fns):
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as host_file:
        env = fns["environment"].remote(host_file.name, str(PROJECT_FILE))
    assert PROJECT_FILE.exists()  # the host sees this checkout; the container must not
    assert env["humanize"] == "2.0 MB"  # a package this client does not have
    assert env["debian"] is True
    assert env["sees_host_file"] is False
    assert env["sees_project"] is False
    assert len(env["pids"]) < 10  # its own PID namespace


def test_two_containers_see_neither_files_nor_processes_of_each_other(fns):
    a = fns["share_tmp"].spawn("a")
    b = fns["share_tmp"].spawn("b")
    ta, tb = a.get(timeout=120), b.get(timeout=120)
    assert "mark-a" in ta and "mark-b" not in ta
    assert "mark-b" in tb and "mark-a" not in tb


def test_block_network_cuts_the_host_loopback(fns, host_server):
    assert fns["connect_blocked"].remote(host_server).startswith("refused")


def test_memory_limit_is_an_out_of_memory_error(fns):
    assert fns["allocate"].remote(50) == 50
    with pytest.raises(exc.OutOfMemoryError, match="memory"):
        fns["allocate"].remote(500)


def test_fork_bomb_is_stopped_by_the_pids_limit(fns):
    out = fns["fork_bomb"].remote(200)
    started = int(out.split()[1].rstrip(","))
    assert started < 64, out
    assert fns["environment"].remote("/nonexistent")["debian"] is True  # the node is fine


def test_without_block_network_the_host_loopback_stays_out_of_reach(fns, host_server):
    """Egress goes through a user-mode stack in the container's own namespace: 127.0.0.1
    there is the container's own loopback, never the host's."""
    assert fns["connect"].remote(host_server).startswith("refused")
