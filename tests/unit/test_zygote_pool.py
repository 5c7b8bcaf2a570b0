"""Cold starts: snapshot keys, CRIU detection and command lines, which launches can be
forked, telling a function why it has no snapshot only once, the per-(runtime, image)
fallback (with real zygote processes), and the zygote protocol's messages."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import subprocess
import sys

import msgspec
import pytest

from strato.protocol import messages as m
from strato.protocol import zygote as zp
from strato.runtime.base import Bind, Capabilities, ContainerLaunch, Runtime
from strato.runtime.forking import ForkSandbox, PlainForking
from strato.runtime.process import ProcessRuntime
from strato.worker.coldstart import (
    ForkedContainer,
    ZygotePool,
    criu_check,
    criu_dump_argv,
    criu_restore_argv,
)


class Unforking(Runtime):
    """A runtime that forks nothing (as gvisor): only its name and capabilities are read."""

    name = "gvisor"
    capabilities = Capabilities(True, True, False, False, False)

    async def start(self, launch):
        raise AssertionError("not started here")

    def describe(self) -> str:
        return "unforking"


def start_msg(**spec_changes) -> m.ContainerStart:
    spec = m.FunctionSpec("f", "mod", "f", mount_id="mo-1", enable_memory_snapshot=True)
    spec = msgspec.structs.replace(spec, **spec_changes)
    return m.ContainerStart(
        container_id="ct-1",
        app_id="ap-1",
        function_id="fu-1",
        spec=spec,
        mount=None,
        gpu_indices=[],
        channel="unix:/tmp/x.sock",
        runtime=None,
        token="t",
    )


def launch(**changes) -> ContainerLaunch:
    base = ContainerLaunch("ct-1", [sys.executable, "-m", "strato.container"], {}, "/")
    for k, v in changes.items():
        setattr(base, k, v)
    return base


@pytest.fixture
def plain() -> ProcessRuntime:
    return ProcessRuntime(use_cgroups=False, gpus_present=False)


def test_the_snapshot_key_follows_code_image_spec_and_runtime(plain):
    key = ZygotePool.template_key
    same = key(start_msg(), launch(), plain)
    assert key(start_msg(), launch(), plain) == same
    assert key(start_msg(mount_id="mo-2"), launch(), plain) != same  # new code
    assert key(start_msg(), launch(rootfs_layers=["/l/a"]), plain) != same  # another image
    assert key(start_msg(env={"A": "1"}), launch(), plain) != same  # another spec
    assert key(start_msg(), launch(), Unforking()) != same


def test_criu_check_says_why_it_fails(tmp_path, monkeypatch):
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Error (criu/vdso.c:613): vdso: no symtable' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    ok, why = criu_check(str(fake))
    assert not ok and "vdso: no symtable" in why
    fake.write_text("#!/bin/sh\necho 'Looks good.'\n")
    assert criu_check(str(fake)) == (True, "")


def test_criu_command_lines(tmp_path):
    dump = criu_dump_argv(42, tmp_path)
    assert dump[1:4] == ["dump", "--tree", "42"] and "--leave-running" in dump
    restore = criu_restore_argv(tmp_path, tmp_path / "pid", {"socket:[7]": 5})
    assert "--restore-detached" in restore
    assert restore[restore.index("--inherit-fd") + 1] == "fd[5]:socket:[7]"


@pytest.mark.parametrize(
    "which, changes, snap, why",
    [
        ("unforking", {}, False, "the gvisor runtime cannot fork containers"),
        ("no-snapshot", {}, True, "the process runtime cannot snapshot memory"),
        ("no-snapshot", {}, False, None),
        ("process", {"gpu_indices": [0]}, False, "containers with GPUs are not forked"),
        ("process", {"argv": ["python", "app.py"]}, False, "does not run strato's entrypoint"),
        ("process", {}, True, None),
    ],
)
def test_which_launches_are_forked(tmp_path, plain, which, changes, snap, why):
    runtime: Runtime = plain
    if which == "unforking":
        runtime = Unforking()
    elif which == "no-snapshot":  # a runtime that forks but takes no memory snapshots
        plain.capabilities = dataclasses.replace(plain.capabilities, snapshot=False)
    found = ZygotePool(tmp_path).unforkable(launch(**changes), runtime, snap)
    if why is None:
        assert found is None
    else:
        assert found is not None and why in found


def test_binds_a_zygote_can_make(tmp_path):
    pool = ZygotePool(tmp_path)
    code = Bind(str(tmp_path / "mounts" / "mo-1" / "0"), "/run/strato/mounts/0")
    assert pool.bind_source(code) == "/run/strato/hostmounts/mo-1/0"
    assert pool.bind_source(code, sees_code=True) == "/run/strato/mounts/0"
    assert pool.bind_source(Bind("/x", "/run/strato/container")) == ""  # written instead
    assert pool.bind_source(Bind("/etc", "/data")) is None


def test_a_function_is_told_once(tmp_path):
    told: list[tuple[str, str]] = []
    pool = ZygotePool(tmp_path, tell=lambda cid, text: told.append((cid, text)))
    pool.tell_once(start_msg(), "no snapshot: because")
    pool.tell_once(start_msg(), "no snapshot: because")
    assert told == [("ct-1", "no snapshot: because")]


class BreakingForking(PlainForking):
    """The process runtime's forking, but a container of the image ``/l/broken`` gets a
    sandbox whose bind source is missing: its monitor's set-up fails in the zygote, as a
    set-up of strato's own that would fail again."""

    def sandbox(self, launch: ContainerLaunch, binds: list[tuple[str, str]]) -> ForkSandbox:
        made = super().sandbox(launch, binds)
        if launch.rootfs_layers == ["/l/broken"]:
            made.isolate = True
            made.binds = [("/nonexistent/strato-test-source", "/data")]
        return made


def test_a_fork_failure_turns_forking_off_for_its_runtime_and_image_only(tmp_path, plain, caplog):
    """After a fork's set-up failed for one (runtime, image), its containers start normally
    for a while (said once in the worker's log, once per function in the app's), while
    other images and containers without an image are still forked: real zygotes (one per
    image), real forks."""
    caplog.set_level(logging.INFO, "strato.worker")
    plain.forking = BreakingForking(plain)
    told: list[tuple[str, str]] = []
    pool = ZygotePool(tmp_path, tell=lambda cid, text: told.append((cid, text)))
    plain_msg = start_msg(enable_memory_snapshot=False)

    async def scenario() -> list[str]:
        forked: list[str] = []
        try:
            for cid, layers in [
                ("ct-b1", ["/l/broken"]),
                ("ct-b2", ["/l/broken"]),  # not tried again
                ("ct-2", ["/l/other"]),
                ("ct-3", []),
            ]:
                msg = msgspec.structs.replace(plain_msg, container_id=cid)
                rc = await pool.start(msg, launch(container_id=cid, rootfs_layers=layers), plain)
                if rc is not None:
                    assert isinstance(rc, ForkedContainer)
                    forked.append(cid)
                    await asyncio.wait_for(rc.wait(), 60)  # it finds no control plane
        finally:
            await pool.close()
        return forked

    assert asyncio.run(scenario()) == ["ct-2", "ct-3"]
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "not forked" in r.getMessage()
    ]
    assert len(warnings) == 1 and "/nonexistent/strato-test-source" in warnings[0], warnings
    assert len(told) == 1 and told[0][0] == "ct-b1", told
    assert told[0][1].startswith("not forked from a zygote: a forked container could not")
    key = pool.fallback_key
    assert key(plain, launch()) != key(plain, launch(rootfs_layers=["/x"]))
    assert key(plain, launch()) != key(Unforking(), launch())


def test_the_zygote_messages_travel_typed():
    req = zp.ForkRequest(
        cid="ct-1", env={"A": "1"}, workdir="/w", user=(65534, 65534), binds=[("/a", "/b")]
    )
    back = zp.decode_request(zp.encode(req))
    assert back == req and back.user == (65534, 65534) and back.binds == [("/a", "/b")]
    assert zp.decode_report(zp.encode(zp.Exited(None, 9))) == zp.Exited(None, 9)
    assert isinstance(zp.decode_answer(zp.encode(zp.IdsMapped(True))), zp.IdsMapped)
    with pytest.raises(msgspec.DecodeError):
        zp.decode_report(zp.encode(zp.IdsMapped(True)))  # an answer is no report


HIDE_AND_CHECK = """
import subprocess, sys
from pathlib import Path
from strato.runtime.bwrap_fork import ensure_empty_proc, proc_root_at

state = Path(sys.argv[1])
path = state / "emptyproc"
assert ensure_empty_proc(path) is None
assert proc_root_at(path)
# what another runtime did to the state directory: bound onto itself, not recursively;
# the empty proc is still in the mount table, but its path now leads to a plain directory
subprocess.run(["mount", "--bind", str(state), str(state)], check=True)
assert not proc_root_at(path)
assert ensure_empty_proc(path) is None  # mounted again, where the path leads
assert proc_root_at(path)
print("ok")
"""


def test_a_hidden_empty_proc_is_mounted_again(tmp_path):
    """The cause of ``mount proc ... Operation not permitted`` in forked image containers:
    the empty proc the zygote binds was hidden by a later bind of its parent directory,
    while the mount table still listed it. In a mount namespace of the test's own."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and util-linux's unshare")
    argv = [unshare, "--mount", "--propagation", "private", sys.executable, "-c",
            HIDE_AND_CHECK, str(tmp_path / "state")]  # fmt: skip
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
