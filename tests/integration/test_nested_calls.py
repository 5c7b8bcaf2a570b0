"""Calls from inside containers, end to end: every call form over the container's channel,
classes and ``@enter``, a child's failure as the parent's exception, a container killed
mid-call, cancellation reaching children, and what a container's credential cannot reach."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest
from apps import nested
from conftest import wait_until

import strato
from strato import exceptions as exc


@pytest.fixture(scope="module")
def running(strato_server):
    strato_server.activate()
    with nested.app.run(quiet=True):
        yield nested.app


def _marker(name: str) -> str:
    return os.path.join(tempfile.mkdtemp(prefix="strato-nested-"), name)


def test_every_call_form_from_inside_a_container(running):
    call = nested.every_form.spawn(4)
    out = call.get(timeout=180)
    assert out["remote"] == 9
    assert out["map"] == [0, 1, 4, 9]
    assert out["starmap"] == [3, 7]
    assert out["spawn"] == 25 and out["from_id"] == 25
    assert out["spawn_map"] is True
    assert out["gen"] == [0, 1, 2]
    assert out["from_name"] == 36
    assert out["cls"] == 103  # @enter made a nested call too: base 100
    assert out["cls_from_name"] == 104
    assert out["lookup"] is True
    assert out["aio"] == 49
    assert out["input_id"].startswith("in-ct-")
    assert out["call_id"] == call.object_id


def test_large_values_go_over_the_channel_in_chunks(running):
    assert nested.large_values.remote(5 << 20) is True


def test_a_web_endpoint_calls_functions(running):
    import httpx

    url = nested.web_square.get_web_url()
    assert url
    got = httpx.get(url, params={"x": 9}, timeout=120).json()
    assert got == {"square": 81, "url": url}  # get_web_url() from inside, too
    url = nested.web_square_async.get_web_url()
    got = httpx.get(url, params={"x": 4}, timeout=120).json()
    assert got == {"square": 16, "calls": [5, 6]}


def test_a_childs_failure_reaches_the_parent_as_its_exception(running):
    with pytest.raises(ValueError, match="child failed on 4"):
        nested.parent_of_failure.remote(4)
    assert nested.catches_child_failure.remote(5) == "caught ValueError: child failed on 5"


def test_what_a_containers_credential_cannot_reach(running):
    with nested.other.run(quiet=True):
        held = nested.hold.spawn(60.0)
        try:
            other_fid = nested.hold.object_id
            assert other_fid is not None and nested.other.app_id is not None
            seen = nested.probe.remote(nested.other.app_id, held.object_id, other_fid)
        finally:
            held.cancel(terminate_containers=True)
    admin = ("stop own app", "list apps", "own logs", "nodes", "containers", "create app")
    for name in admin:
        assert seen[name] == "AuthError", (name, seen)
    assert seen["autoscaler"] == "AuthError"
    for name in (
        "other app",
        "other app's function",
        "other app's call",
        "other app's call status",
        "cancel other app's call",
        "other app's stats",
        "call other app",
    ):
        assert seen[name] == "NotFoundError", (name, seen)
    assert seen["own app"] == "ok"  # the probe itself can fail: its own app is reachable
    assert seen["token"] is False  # the API token never enters a container


def test_a_deployed_app_is_callable_from_a_container(running):
    nested.other.deploy()
    try:
        seen = nested.probe.remote("ap-none", "fc-none", "fn-none")
        assert seen["call other app"] == "ok"
    finally:
        nested.other.stop()


def _pid_in(marker: str, timeout: float = 60.0) -> int:
    wait_until(lambda: Path(marker).exists() and Path(marker).read_text(), timeout, marker)
    return int(Path(marker).read_text())


def test_child_container_killed_mid_call(running):
    # the child's container dies while the parent waits on it: the parent's call still
    # ends with one clear error (slow has no retries)
    marker = _marker("child")
    call = nested.waits_on.spawn(marker, 600.0)
    os.kill(_pid_in(marker), signal.SIGKILL)
    with pytest.raises(exc.ExecutionError, match="died|killed|signal"):
        call.get(timeout=120)


def test_parent_container_killed_mid_call(running):
    # the parent's container dies while its child runs: the parent's call ends with one
    # clear error, not a hang
    marker = _marker("parent")
    call = nested.spawns_children.spawn(marker, 1)
    wait_until(lambda: Path(marker).exists() and Path(marker).read_text(), 60, marker)
    child_id = Path(marker).read_text().split(",")[0]
    child_pid = _pid_in(f"{marker}-0")
    os.kill(_parent_pid(child_pid), signal.SIGKILL)
    with pytest.raises(exc.ExecutionError, match="died|killed|signal"):
        call.get(timeout=120)
    strato.FunctionCall.from_id(child_id).cancel(terminate_containers=True)


def _parent_pid(child_pid: int) -> int:
    """The pid of the container running ``spawns_children`` (a sibling of the child's)."""
    wanted = b"spawns_children"
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == child_pid:
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"STRATO_CONTAINER_ID=" in environ and wanted in _spec_of(environ):
            return int(pid)
    raise AssertionError("no container runs spawns_children")


def _spec_of(environ: bytes) -> bytes:
    for item in environ.split(b"\0"):
        if item.startswith(b"STRATO_CONTAINER_SPEC="):
            try:
                return Path(item.split(b"=", 1)[1].decode()).read_bytes()
            except OSError:
                return b""
    return b""


def test_cancelling_a_parent_cancels_its_children(running):
    marker = _marker("cancel")
    call = nested.spawns_children.spawn(marker, 2)
    wait_until(lambda: Path(marker).exists() and Path(marker).read_text(), 60, marker)
    children = Path(marker).read_text().split(",")
    for i in range(2):
        _pid_in(f"{marker}-{i}")  # both children run
    call.cancel(terminate_containers=True)
    for child in children:
        with pytest.raises(exc.InputCancellation):
            strato.FunctionCall.from_id(child).get(timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["bwrap", "gvisor"])
def test_nested_calls_from_isolated_containers_without_network(strato_server, runtime):
    # a Debian image without strato's server dependencies, block_network=True: the calls
    # go over the container's channel, under both isolating runtimes
    from apps import nested_isolated
    from conftest import dedicated_server

    cache = os.environ.get("STRATO_TEST_IMAGE_CACHE", "/tmp/strato-test-image-cache")
    with dedicated_server({"STRATO_IMAGE_CACHE": cache}), nested_isolated.app.run(quiet=True):
        out = nested_isolated.callers[runtime].remote(7)
    assert out["remote"] == 49
    assert out["map"] == [0, 1, 4]
    assert out["server_deps"] == []
    assert out["network"] != "reachable"
