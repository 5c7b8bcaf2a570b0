"""Cold starts, end to end: containers forked from a zygote (isolated under bwrap: their own
PID namespace, /tmp and capabilities), and memory snapshots (a template that ran the
``@enter(snap=True)`` hooks once; new code makes a new one; where CRIU fails, the app's
logs say why, once)."""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import sys
import textwrap
import time

import pytest
from apps import cold_start
from conftest import dedicated_server, pid_alive, processes_of, wait_until

from strato.client import session
from strato.protocol import messages as m

FAILING_CRIU = """#!/bin/sh
echo "Error (criu/vdso.c:613): vdso: Failed to fill self vdso symtable" >&2
exit 1
"""
CRIU_REASON = "CRIU is unusable here"
IMAGE_CACHE = os.environ.get("STRATO_TEST_IMAGE_CACHE", "/tmp/strato-test-image-cache")


def _containers(app_id: str) -> list[m.ContainerInfo]:
    listing = session.api().call(
        "GET", "/containers", None, m.ContainerList, params={"app": app_id}
    )
    return [c for c in listing.containers if c.state != "stopped"]


def scale_to_zero(app_id: str) -> None:
    """Wait until the app has no container left (scaledown_window=2 s)."""
    wait_until(lambda: not _containers(app_id), 30, "the app's containers to scale down", 0.1)


def app_logs(app_id: str) -> list[m.LogLine]:
    batch = session.api().call(
        "GET", f"/apps/{app_id}/logs", None, m.LogBatch, params={"after": 0, "timeout": 0}
    )
    return batch.lines


@pytest.fixture(scope="module")
def failing_criu(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("criu") / "criu"
    path.write_text(FAILING_CRIU)
    path.chmod(0o755)
    return str(path)


WORKING_CRIU = """#!/bin/sh
case "$1" in
  check) echo "Looks good."; exit 0 ;;
  dump) exit 0 ;;
  *) echo "Error (criu/cr-restore.c:2447): Restoring FAILED." >&2; exit 1 ;;
esac
"""


@pytest.fixture(scope="module")
def bwrap_server(strato_server, failing_criu):
    """A control plane whose worker runs containers under bwrap, with a CRIU that fails."""
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("the bwrap runtime needs root and bubblewrap")
    env = {
        "STRATO_RUNTIME": "bwrap",
        "STRATO_CRIU": failing_criu,
        "STRATO_IMAGE_CACHE": IMAGE_CACHE,  # the Debian image of test_isolation_e2e
    }
    with dedicated_server(env) as handle:
        yield handle


@pytest.fixture
def bwrap(bwrap_server):
    """The bwrap control plane, with the client pointed at it (again)."""
    bwrap_server.activate()
    return bwrap_server


# ---------------------------------------------------------------------- zygotes


def assert_isolated_like_a_container(out: dict, api_port: int, image: bool = False) -> None:
    """What a bwrap container gets, forked or not (runtime/isolation.py, seccomp.py,
    network.py): an unprivileged user (the same uid on the host), a seccomp filter, a
    network namespace of its own (egress through a user-mode stack, never to the host's
    loopback) and, without an image, a minimal root (no secrets of the host's /etc)."""
    assert out["uid"] != 0 and out["host_uid"] == out["uid"], out
    assert out["seccomp"] == "2", out  # a filter (mode 2), loaded before any user code
    assert not out["reaches_host"], f"reached the control plane's port {api_port}: {out}"
    assert "lo" in out["interfaces"] and "tap0" in out["interfaces"], out
    if not image:
        assert not out["etc_shadow"], out  # the image's own /etc has one


def test_forked_container_runs_and_is_isolated(bwrap):
    with cold_start.app.run(quiet=True):
        a = cold_start.where.spawn("a", 2.0, bwrap.port)
        b = cold_start.where.spawn("b", 2.0, bwrap.port)
        ra, rb = a.get(timeout=60), b.get(timeout=60)
    assert ra["container_id"] != rb["container_id"]
    for mine, other in ((ra, rb), (rb, ra)):
        assert mine["forked"], mine
        assert mine["pid"] == 1, mine  # init of a PID namespace of its own
        assert mine["pids"] == ["1"], mine  # sees no other process: not its zygote, not b
        assert not any(other["container_id"] in p for p in mine["processes"])
        assert f"mark-{mine['marker']}" in mine["tmp"]
        assert f"mark-{other['marker']}" not in mine["tmp"]  # its own /tmp
        assert mine["hostname"] == mine["container_id"]
        assert not mine["cap_sys_admin"]
        assert "hostmounts" not in mine["run"] and ".proc" not in mine["run"]
        assert_isolated_like_a_container(mine, bwrap.port)
    assert ra["env_token"] != rb["env_token"]  # each got its own identity at fork time


def test_forked_container_of_an_image(bwrap):
    """A zygote in the image; each container forked from it gets the image with a writable
    layer of its own, and nothing of the zygote's own tree."""
    if shutil.which("debootstrap") is None:
        pytest.skip("images need debootstrap")
    with cold_start.app.run(quiet=True):
        a = cold_start.in_image.spawn("a", 2.0, bwrap.port)
        b = cold_start.in_image.spawn("b", 2.0, bwrap.port)
        ra, rb = a.get(timeout=600), b.get(timeout=120)
    for mine, other in ((ra, rb), (rb, ra)):
        assert mine["forked"] and mine["debian"] and mine["humanize"] == "2.0 MB", mine
        assert mine["pid"] == 1 and mine["pids"] == ["1"], mine
        assert f"mark-{mine['marker']}" in mine["root"]
        assert f"mark-{other['marker']}" not in mine["root"]  # its own writable layer
        assert not mine["cap_sys_admin"]
        assert "hostmounts" not in mine["run"] and "layers" not in mine["run"]
        assert not any("oldroot" in p or "layers" in p for p in mine["mounts"]), mine
        assert_isolated_like_a_container(mine, bwrap.port, image=True)


def test_containers_without_an_image_still_fork_after_an_image(bwrap):
    """Forking an image's containers first (and whatever happened to them) turns nothing
    off for containers without an image: a fallback is per (runtime, image), never the
    worker's."""
    if shutil.which("debootstrap") is None:
        pytest.skip("images need debootstrap")
    with cold_start.app.run(quiet=True):
        in_image = cold_start.in_image.remote("i", 0.0, bwrap.port)
        plain = cold_start.where.remote("p", 0.0, bwrap.port)
    assert in_image["forked"], in_image
    assert_isolated_like_a_container(in_image, bwrap.port, image=True)
    assert plain["forked"] and plain["pid"] == 1, plain
    assert_isolated_like_a_container(plain, bwrap.port)


def test_forked_container_makes_its_own_namespaces_when_none_are_ready(strato_server, failing_criu):
    """With no user and network namespaces made ahead (``STRATO_ZYGOTE_NETNS_AHEAD=0``; also
    what a burst meets when it has taken them all), the monitor makes them and the worker
    maps the ids and attaches the network stack meanwhile: the same isolation."""
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("the bwrap runtime needs root and bubblewrap")
    env = {"STRATO_RUNTIME": "bwrap", "STRATO_CRIU": failing_criu, "STRATO_ZYGOTE_NETNS_AHEAD": "0"}
    with dedicated_server(env) as handle, cold_start.app.run(quiet=True):
        out = cold_start.where.remote("own", 0.0, handle.port)
        offline = cold_start.offline.remote()
    assert out["forked"] and out["pid"] == 1, out
    assert_isolated_like_a_container(out, handle.port)
    assert offline["forked"] and offline["interfaces"] == ["lo"], offline


def test_a_dead_zygote_is_replaced(bwrap):
    with cold_start.app.run(quiet=True) as running:
        assert cold_start.where.remote("z")["forked"]
        scale_to_zero(running.app_id)
        zygotes = [pid for pid, cmd in processes_of(bwrap.home) if "strato.container.zygote" in cmd]
        assert zygotes
        for pid in zygotes:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not any(pid_alive(p) for p in zygotes), 10, "the zygote to die")
        out = cold_start.where.remote("y")
    assert out["forked"] and out["marker"] == "y"


def test_forked_container_with_blocked_network(bwrap):
    with cold_start.app.run(quiet=True):
        out = cold_start.offline.remote()
    assert out["forked"]
    assert out["interfaces"] == ["lo"]  # no user-mode stack: no network at all


def test_forked_under_the_process_runtime(server):
    with cold_start.app.run(quiet=True):
        out = cold_start.where.remote("p")
    assert out["forked"]
    assert out["container_id"]


# ---------------------------------------------------------------------- memory snapshots


def _snap_then_again(cls) -> tuple[dict, dict, str]:
    with cold_start.app.run(quiet=True) as running:
        first = cls().state.remote()
        scale_to_zero(running.app_id)
        second = cls().state.remote()
        return first, second, running.app_id


def test_a_restored_container_skips_the_snap_hook_but_runs_enter(bwrap):
    first, second, app_id = _snap_then_again(cold_start.Snapped)
    assert first["container_id"] != second["container_id"]
    assert second["forked"]
    assert second["snap"] == first["snap"]  # the snap hook's state came from the snapshot
    assert second["loads"] == 1  # ... and it did not run again
    # the snap hook ran in the template, as uid 0 of the host: with no capability at all
    # (Docker's default set would let it mknod the host's disks)
    assert first["snap_caps"] == 0 and second["snap_caps"] == 0, (first, second)
    assert second["enter"] != first["enter"]  # the other enter hooks ran in each container
    assert second["enter_saw"] == second["container_id"]  # with its own environment
    reasons = [line.text for line in app_logs(app_id) if CRIU_REASON in line.text]
    assert len(reasons) == 1, reasons  # told once, for two containers
    assert "vdso" in reasons[0]
    assert all(line.stream == "system" for line in app_logs(app_id) if CRIU_REASON in line.text)


def test_without_snapshots_the_snap_hook_runs_in_each_container(bwrap):
    first, second, _ = _snap_then_again(cold_start.Unsnapped)
    assert second["snap"] != first["snap"]
    assert second["loads"] == 1


def test_snapshots_under_the_process_runtime(server):
    first, second, _ = _snap_then_again(cold_start.Snapped)
    assert second["snap"] == first["snap"] and second["loads"] == 1
    assert second["enter"] != first["enter"]


def test_a_failing_snap_hook_fails_the_call(bwrap):
    """The template fails; the container then starts normally and reports the error."""
    with cold_start.app.run(quiet=True):
        with pytest.raises(RuntimeError, match="this snap hook fails"):
            cold_start.BrokenSnap().state.remote()


VERSIONED = """
import uuid

import strato

app = strato.App("test-cold-start-versioned")
VERSION = {version}


@app.cls(enable_memory_snapshot=True, scaledown_window=2)
class Versioned:
    @strato.enter(snap=True)
    def load(self):
        self.token = uuid.uuid4().hex

    @strato.method()
    def state(self):
        return {{"version": VERSION, "token": self.token}}
"""


def test_new_code_invalidates_the_snapshot(bwrap, tmp_path):
    module = tmp_path / "coldstart_versioned.py"
    module.write_text(textwrap.dedent(VERSIONED.format(version=1)))
    sys.path.insert(0, str(tmp_path))
    try:
        mod = importlib.import_module("coldstart_versioned")
        with mod.app.run(quiet=True):
            v1 = mod.Versioned().state.remote()
        with mod.app.run(quiet=True):  # the same code again: the same snapshot
            v1_again = mod.Versioned().state.remote()
        time.sleep(0.01)  # a new mtime, whatever the file system's resolution
        module.write_text(textwrap.dedent(VERSIONED.format(version=2)))
        os.utime(module, ns=(time.time_ns(), time.time_ns()))
        mod = importlib.reload(mod)
        with mod.app.run(quiet=True):
            v2 = mod.Versioned().state.remote()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("coldstart_versioned", None)
    assert v1["version"] == 1 and v2["version"] == 2
    assert v1_again["token"] == v1["token"]
    assert v2["token"] != v1["token"]


def test_a_checkpoint_that_does_not_restore_is_taken_again(strato_server, tmp_path):
    """A CRIU whose check and dump pass but whose restore fails: the evicted template comes
    back by running the snap hooks again, and the app's logs say why."""
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("the bwrap runtime needs root and bubblewrap")
    criu = tmp_path / "criu"
    criu.write_text(WORKING_CRIU)
    criu.chmod(0o755)
    env = {"STRATO_RUNTIME": "bwrap", "STRATO_CRIU": str(criu), "STRATO_SNAPSHOT_MAX": "1"}
    with dedicated_server(env), cold_start.app.run(quiet=True) as running:
        first = cold_start.Snapped().state.remote()
        scale_to_zero(running.app_id)
        cold_start.OtherSnapped().state.remote()  # the one template kept: Snapped's goes
        scale_to_zero(running.app_id)
        again = cold_start.Snapped().state.remote()
        logs = [line.text for line in app_logs(running.app_id)]
    assert again["forked"] and again["snap"] != first["snap"]
    assert any("not restored" in t and "Restoring FAILED" in t for t in logs), logs
