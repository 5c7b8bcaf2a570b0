"""Cold starts, the pure parts: snapshot keys, CRIU detection and command lines, which
launches can be forked, and telling a function why it has no snapshot only once."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys

import msgspec
import pytest

from strato.protocol import messages as m
from strato.runtime.base import Bind, ContainerLaunch
from strato.worker import zygote
from strato.worker.zygote import ZygotePool


class FakeRuntime:
    def __init__(self, name: str) -> None:
        self.name = name


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
    base = ContainerLaunch("ct-1", ["/usr/bin/python3", "-m", "strato.container"], {}, "/")
    for k, v in changes.items():
        setattr(base, k, v)
    return base


def test_the_snapshot_key_follows_code_image_spec_and_runtime():
    key = ZygotePool.template_key
    rt = FakeRuntime("bwrap")
    same = key(start_msg(), launch(), rt)
    assert key(start_msg(), launch(), rt) == same
    assert key(start_msg(mount_id="mo-2"), launch(), rt) != same  # new code
    assert key(start_msg(), launch(rootfs_layers=["/l/a"]), rt) != same  # another image
    assert key(start_msg(env={"A": "1"}), launch(), rt) != same  # another spec
    assert key(start_msg(), launch(), FakeRuntime("process")) != same


def test_criu_check_says_why_it_fails(tmp_path, monkeypatch):
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Error (criu/vdso.c:613): vdso: no symtable' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(zygote.os, "geteuid", lambda: 0)
    ok, why = zygote.criu_check(str(fake))
    assert not ok and "vdso: no symtable" in why
    fake.write_text("#!/bin/sh\necho 'Looks good.'\n")
    assert zygote.criu_check(str(fake)) == (True, "")


def test_criu_command_lines(tmp_path):
    dump = zygote.criu_dump_argv(42, tmp_path)
    assert dump[1:4] == ["dump", "--tree", "42"] and "--leave-running" in dump
    restore = zygote.criu_restore_argv(tmp_path, tmp_path / "pid", {"socket:[7]": 5})
    assert "--restore-detached" in restore
    assert restore[restore.index("--inherit-fd") + 1] == "fd[5]:socket:[7]"


@pytest.mark.parametrize(
    "runtime, changes, why",
    [
        ("gvisor", {}, "the gvisor runtime cannot fork containers"),
        ("process", {"gpu_indices": [0]}, "containers with GPUs are not forked"),
        ("process", {"argv": ["python", "app.py"]}, "does not run strato's entrypoint"),
        ("process", {}, None),
    ],
)
def test_which_launches_are_forked(tmp_path, runtime, changes, why):
    pool = ZygotePool(tmp_path)
    found = pool._unforkable(launch(**changes), FakeRuntime(runtime))
    assert found == why if why is None else why in found


def test_binds_a_zygote_can_make(tmp_path):
    pool = ZygotePool(tmp_path)
    code = Bind(str(tmp_path / "mounts" / "mo-1" / "0"), "/run/strato/mounts/0")
    assert pool._bind_source(code) == "/run/strato/hostmounts/mo-1/0"
    assert pool._bind_source(code, template=True) == "/run/strato/mounts/0"
    assert pool._bind_source(Bind("/x", "/run/strato/container")) == ""  # written instead
    assert pool._bind_source(Bind("/etc", "/data")) is None


def test_a_function_is_told_once(tmp_path):
    told: list[tuple[str, str]] = []
    pool = ZygotePool(tmp_path, tell=lambda cid, text: told.append((cid, text)))
    pool._tell_once(start_msg(), "no snapshot: because")
    pool._tell_once(start_msg(), "no snapshot: because")
    assert told == [("ct-1", "no snapshot: because")]


def test_a_fork_failure_turns_forking_off_for_its_runtime_and_image_only(tmp_path, caplog):
    """After a fork's set-up failed for one (runtime, image), its containers start normally
    for a while (said once in the worker's log, once per function in the app's), while
    other images and containers without an image are still forked."""
    told: list[tuple[str, str]] = []
    pool = ZygotePool(tmp_path, tell=lambda cid, text: told.append((cid, text)))
    pool._unforkable = lambda launch, runtime, spec=None: None
    forked: list[str] = []

    async def get_zygote(runtime, channel, sock, like=None, env=None):
        return object()

    async def fork(z, msg, launch, runtime, where=""):
        if launch.rootfs_layers == ["/l/broken"]:
            pool._broken[where] = (zygote.time.monotonic(), "mount proc: EPERM")
            raise zygote.ForkFailed("mount proc: EPERM")
        forked.append(msg.container_id)
        return msg.container_id

    pool._get_zygote, pool._fork = get_zygote, fork
    rt = FakeRuntime("bwrap")
    plain = start_msg(enable_memory_snapshot=False)

    def start(msg, layers):
        return asyncio.run(pool.start(msg, launch(rootfs_layers=layers), rt))

    broken = msgspec.structs.replace(plain, container_id="ct-b1")
    assert start(broken, ["/l/broken"]) is None
    again = msgspec.structs.replace(plain, container_id="ct-b2")
    assert start(again, ["/l/broken"]) is None  # not tried again
    assert start(msgspec.structs.replace(plain, container_id="ct-2"), ["/l/other"]) == "ct-2"
    assert start(msgspec.structs.replace(plain, container_id="ct-3"), []) == "ct-3"
    assert forked == ["ct-2", "ct-3"]
    warnings = [r.getMessage() for r in caplog.records if "not forked" in r.getMessage()]
    assert len(warnings) == 1 and "EPERM" in warnings[0], warnings
    assert told == [("ct-b1", "not forked from a zygote: mount proc: EPERM; the container "
                     "starts normally")]  # fmt: skip
    assert pool.fallback_key(rt, launch()) != pool.fallback_key(rt, launch(rootfs_layers=["/x"]))
    assert pool.fallback_key(rt, launch()) != pool.fallback_key(FakeRuntime("process"), launch())


HIDE_AND_CHECK = """
import subprocess, sys
from pathlib import Path
from strato.worker import zygote

state = Path(sys.argv[1])
path = state / "emptyproc"
assert zygote._ensure_empty_proc(path) is None
assert zygote._proc_root_at(path)
# what another runtime did to the state directory: bound onto itself, not recursively;
# the empty proc is still in the mount table, but its path now leads to a plain directory
subprocess.run(["mount", "--bind", str(state), str(state)], check=True)
assert not zygote._proc_root_at(path)
assert zygote._ensure_empty_proc(path) is None  # mounted again, where the path leads
assert zygote._proc_root_at(path)
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
