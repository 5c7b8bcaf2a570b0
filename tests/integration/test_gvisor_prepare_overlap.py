"""The gvisor runtime's start (real runsc, slirp4netns and mounts): it makes a container's
network namespace and its bundle at once (each in a thread), and whatever of the two was
made is freed when the other fails, and when the start is cancelled while they are being
made; a minimal root's read-only folders are bound on the host inside the root (served
with it) and stay read-only, even to root inside."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from strato.runtime.base import ContainerLaunch
from strato.runtime.gvisor import GvisorRuntime
from strato.runtime.network import Egress, NetworkUnavailable, egress_unavailable_reason

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the gvisor runtime needs root"),
    pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed"),
]

TIMEOUT_S = 30.0


def mounts_of(container_id: str) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if
            container_id in line]  # fmt: skip


def launch(argv: list[str] | None = None) -> ContainerLaunch:
    return ContainerLaunch(
        container_id=f"test-{uuid.uuid4().hex[:12]}",
        argv=argv or [sys.executable, "-c", "print('hi')"],
        env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
        cwd="/",
    )


@pytest.fixture
def runtime(tmp_path: Path) -> GvisorRuntime:
    why = egress_unavailable_reason()
    if why:
        pytest.skip(f"no egress here: {why}")
    return GvisorRuntime(use_cgroups=False, state_dir=tmp_path / "state")


class Spy:
    """Records what the runtime's ``take_egress`` and ``_bundle`` made (``slow_bundle``:
    the bundle takes that long first, so a cancel lands while it is being made)."""

    def __init__(self, rt: GvisorRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
        self.egresses: list[Egress] = []
        self.dirs: list[Any] = []
        self.slow_bundle = 0.0
        self.egress_error: Exception | None = None
        take, bundle = rt.take_egress, rt._bundle

        def take_egress(launch: ContainerLaunch) -> Egress:
            if self.egress_error is not None:
                time.sleep(0.2)  # (the bundle is made meanwhile)
                raise self.egress_error
            e = take(launch)
            self.egresses.append(e)
            return e

        def _bundle(launch: ContainerLaunch, env: dict[str, str]) -> Any:
            time.sleep(self.slow_bundle)
            d = bundle(launch, env)
            self.dirs.append(d)
            return d

        monkeypatch.setattr(rt, "take_egress", take_egress)
        monkeypatch.setattr(rt, "_bundle", _bundle)

    def freed(self) -> bool:
        return all(e.handle.closed for e in self.egresses) and not any(
            d.path.exists() for d in self.dirs
        )


def wait_freed(spy: Spy, container_id: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not (spy.freed() and not mounts_of(container_id)):
        assert time.monotonic() < deadline, "what the failed start made was not freed"
        time.sleep(0.05)


def test_a_start_with_network_runs(runtime: GvisorRuntime, monkeypatch) -> None:
    spy = Spy(runtime, monkeypatch)
    spec = launch()

    async def main() -> tuple[bytes, int | None]:
        c = await runtime.start(spec)
        out = await c.stdout.read()
        return out, (await c.wait()).exit_code

    out, code = asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))
    assert (out, code) == (b"hi\n", 0)
    assert len(spy.egresses) == 1 and len(spy.dirs) == 1  # both made, then freed at exit
    wait_freed(spy, spec.container_id)


def test_a_failed_bundle_frees_the_network(runtime: GvisorRuntime, monkeypatch) -> None:
    spy = Spy(runtime, monkeypatch)
    spec = launch(["no-such-program-strato"])
    with pytest.raises(FileNotFoundError):
        asyncio.run(asyncio.wait_for(runtime.start(spec), TIMEOUT_S))
    assert len(spy.egresses) == 1, "the namespace was made beside the bundle"
    assert spy.egresses[0].handle.closed  # freed by the failed start itself
    assert not mounts_of(spec.container_id)


def test_a_failed_network_frees_the_bundle(runtime: GvisorRuntime, monkeypatch) -> None:
    spy = Spy(runtime, monkeypatch)
    spy.egress_error = NetworkUnavailable("no network for this test")
    spec = launch()
    with pytest.raises(NetworkUnavailable, match="no network for this test"):
        asyncio.run(asyncio.wait_for(runtime.start(spec), TIMEOUT_S))
    assert len(spy.dirs) == 1, "the bundle was made beside the namespace"
    assert not spy.dirs[0].path.exists()
    assert not mounts_of(spec.container_id)


def test_a_cancelled_start_frees_what_it_made(runtime: GvisorRuntime, monkeypatch) -> None:
    spy = Spy(runtime, monkeypatch)
    spy.slow_bundle = 0.5  # the cancel comes while the bundle is being made
    spec = launch()

    async def main() -> None:
        task = asyncio.ensure_future(runtime.start(spec))
        await asyncio.sleep(0.1)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.0)  # (the bundle's thread ends meanwhile; the loop runs)

    asyncio.run(main())
    assert len(spy.dirs) == 1 and len(spy.egresses) == 1
    wait_freed(spy, spec.container_id)


# ---- a minimal root's read-only folders, bound on the host inside the root -------------

WRITE_PROBE = """
import errno, json, os, sys
out = {}
for d in sys.argv[1:]:
    try:
        with open(os.path.join(d, "strato-write-probe"), "w") as f:
            f.write("x")
        out[d] = "written"
    except OSError as e:
        out[d] = errno.errorcode.get(e.errno, str(e.errno))
out["passwd"] = os.path.exists("/etc/passwd")
print(json.dumps(out))
"""


def test_minimal_root_folders_are_served_with_the_root_and_read_only(
    runtime: GvisorRuntime, monkeypatch
) -> None:
    # root inside (all capabilities of a container's root): only read-only mounts stop it
    monkeypatch.setattr(runtime, "user", (0, 0))
    prefix = os.path.realpath(sys.prefix)
    spec = launch([sys.executable, "-c", WRITE_PROBE, "/usr", "/usr/bin", "/etc", sys.prefix])
    spec.block_network = True
    seen: dict[str, Any] = {}

    async def main() -> tuple[bytes, bytes, int | None]:
        c = await runtime.start(spec)
        seen["mounts"] = [line.split()[4] for line in mounts_of(spec.container_id)]
        seen["config"] = (c.container_dir.path / "config.json").read_text()
        out, err = await asyncio.gather(c.stdout.read(), c.stderr.read())
        return out, err, (await c.wait()).exit_code

    out, err, code = asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))
    assert code == 0, err
    result = json.loads(out)
    for d in ("/usr", "/usr/bin", "/etc", sys.prefix):
        assert result[d] == "EROFS", (d, result)
    assert result["passwd"] is True
    # the fast path was taken: /usr and /etc are host binds inside the root's tmpfs (were
    # they OCI binds again, these would be absent here and present in the spec)
    rootfs = str(runtime.state_dir / "containers" / spec.container_id / "rootfs")
    assert f"{rootfs}/usr" in seen["mounts"] and f"{rootfs}/etc" in seen["mounts"]
    binds = [m["destination"] for m in json.loads(seen["config"])["mounts"] if m["type"] == "bind"]
    assert "/usr" not in binds and "/etc" not in binds
    if not prefix.startswith(("/root/", "/home/", "/tmp/", "/usr/")):
        assert f"{rootfs}{prefix}" in seen["mounts"]
    # and nothing of them is left on the host once it ended
    assert not mounts_of(spec.container_id)
    for d in ("/usr", "/etc", prefix):
        assert not os.path.exists(os.path.join(d, "strato-write-probe"))
