"""The process runtime with real processes and real cgroups on this machine."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import textwrap
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from strato.exceptions import InvalidError
from strato.runtime import ContainerLaunch, ExitStatus, default_runtime, get_runtime
from strato.runtime import process as process_module
from strato.runtime.cgroups import CgroupMount, CgroupV2Manager, parse_mountinfo, read_mounts
from strato.runtime.process import ProcessContainer, ProcessRuntime

T = TypeVar("T")
TIMEOUT_S = 15.0


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def launch(code: str, **kwargs: Any) -> ContainerLaunch:
    return ContainerLaunch(
        container_id=f"test-{uuid.uuid4().hex[:12]}",
        argv=[sys.executable, "-c", textwrap.dedent(code)],
        env={"PATH": os.environ.get("PATH", os.defpath)},
        cwd=kwargs.pop("cwd", "/tmp"),
        **kwargs,
    )


_STARTED: list[ProcessContainer] = []


async def start(runtime: ProcessRuntime, spec: ContainerLaunch) -> ProcessContainer:
    """Start a container and remember it, so that a failing test leaves nothing behind."""
    c = await runtime.start(spec)
    _STARTED.append(c)
    return c


@pytest.fixture(autouse=True)
def _reap_leftovers() -> Iterator[None]:
    yield
    while _STARTED:
        c = _STARTED.pop()
        if c.cgroup is None:
            c.signal(signal.SIGKILL)
        elif not (c.cgroup.kill_all() and c.cgroup.remove()):
            pytest.fail(f"container {c.container_id}: cgroup cleanup failed")


def gone(pid: int) -> bool:
    """The process no longer runs (absent, or a zombie waiting for init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_gone(pids: list[int], timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def plain() -> ProcessRuntime:
    return ProcessRuntime(use_cgroups=False, gpus_present=False)


@pytest.fixture(scope="module")
def limited() -> ProcessRuntime:
    runtime = ProcessRuntime(gpus_present=False)
    if not runtime.capabilities.cgroups:
        pytest.skip(f"cgroups are not usable here: {runtime.cgroup_reason}")
    return runtime


# ---- plain processes ------------------------------------------------------------------


def test_stdout_stderr_and_exit_code(plain: ProcessRuntime) -> None:
    async def main() -> tuple[bytes, bytes, ExitStatus]:
        c = await start(
            plain, launch("import sys; print('hello'); print('oops', file=sys.stderr); sys.exit(3)")
        )
        out, err = await asyncio.gather(c.stdout.read(), c.stderr.read())
        return out, err, await c.wait()

    out, err, status = run(main())
    assert out == b"hello\n" and err == b"oops\n"
    assert status == ExitStatus(exit_code=3, signal=None, oom_killed=False)
    assert status.description == "exited with code 3"


def test_environment_is_complete_and_cwd_applies(plain: ProcessRuntime, tmp_path) -> None:
    async def main() -> bytes:
        spec = launch("import os, json; print(json.dumps([dict(os.environ), os.getcwd()]))")
        spec.env = {"ONLY": "this"}
        spec.cwd = str(tmp_path)
        c = await start(plain, spec)
        out = await c.stdout.read()
        assert (await c.wait()).exit_code == 0
        return out

    env, cwd = json.loads(run(main()))
    assert env.get("ONLY") == "this" and "PATH" not in env and "CUDA_VISIBLE_DEVICES" not in env
    assert cwd == str(tmp_path)


@pytest.mark.parametrize(
    ("gpus_present", "indices", "expected"),
    [(True, [], ""), (True, [1, 3], "1,3"), (False, [0], "0"), (False, [], None)],
)
def test_cuda_visible_devices(gpus_present: bool, indices: list[int], expected: str | None) -> None:
    runtime = ProcessRuntime(use_cgroups=False, gpus_present=gpus_present)

    async def main() -> bytes:
        c = await start(
            runtime,
            launch(
                "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))",
                gpu_indices=indices,
            ),
        )
        out = await c.stdout.read()
        await c.wait()
        return out

    assert run(main()).decode().strip() == repr(expected)


def test_sigkill_reported(plain: ProcessRuntime) -> None:
    async def main() -> ExitStatus:
        c = await start(plain, launch("import time; print('ready', flush=True); time.sleep(60)"))
        assert await c.stdout.readline() == b"ready\n"
        c.signal(signal.SIGKILL)
        status = await c.wait()
        c.signal(signal.SIGKILL)  # already gone: no error
        return status

    status = run(main())
    assert status == ExitStatus(exit_code=None, signal=signal.SIGKILL, oom_killed=False)
    assert status.description == "killed by signal SIGKILL"


def test_sigsegv_reported(plain: ProcessRuntime) -> None:
    code = """
        import os, resource, signal
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.kill(os.getpid(), signal.SIGSEGV)
    """

    async def main() -> ExitStatus:
        c = await start(plain, launch(code))
        return await c.wait()

    status = run(main())
    assert status.signal == signal.SIGSEGV and status.exit_code is None
    assert status.description == "killed by signal SIGSEGV (segmentation fault)"


def test_stop_escalates_to_sigkill(plain: ProcessRuntime) -> None:
    code = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print('ready', flush=True)
        time.sleep(60)
    """

    async def main() -> tuple[ExitStatus, float]:
        c = await start(plain, launch(code))
        assert await c.stdout.readline() == b"ready\n"
        started = time.monotonic()
        status = await c.stop(0.3)
        return status, time.monotonic() - started

    status, elapsed = run(main())
    assert status.signal == signal.SIGKILL
    assert 0.3 <= elapsed < 3


def test_stop_lets_sigterm_handler_finish(plain: ProcessRuntime) -> None:
    code = """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
        print('ready', flush=True)
        time.sleep(60)
    """

    async def main() -> tuple[ExitStatus, float]:
        c = await start(plain, launch(code))
        assert await c.stdout.readline() == b"ready\n"
        started = time.monotonic()
        status = await c.stop(5)
        return status, time.monotonic() - started

    status, elapsed = run(main())
    assert status.exit_code == 7
    assert elapsed < 2


def test_missing_executable_raises(plain: ProcessRuntime, limited: ProcessRuntime) -> None:
    for runtime in (plain, limited):
        spec = launch("")
        spec.argv = ["no-such-program-strato"]
        with pytest.raises(FileNotFoundError):
            run(runtime.start(spec))


def test_block_network_refused(plain: ProcessRuntime) -> None:
    with pytest.raises(InvalidError, match="block_network"):
        run(plain.start(launch("pass", block_network=True)))


def test_warns_once_that_nothing_is_isolated(caplog, monkeypatch, plain: ProcessRuntime) -> None:
    monkeypatch.setattr(process_module, "_warned", False)

    async def main() -> None:
        for _ in range(2):
            await (await start(plain, launch("pass"))).wait()

    with caplog.at_level(logging.WARNING, logger="strato.runtime"):
        run(main())
    warnings = [r for r in caplog.records if "isolates nothing" in r.getMessage()]
    assert len(warnings) == 1


def test_get_runtime(monkeypatch) -> None:
    monkeypatch.delenv("STRATO_RUNTIME", raising=False)
    assert get_runtime().name == default_runtime()
    monkeypatch.setenv("STRATO_RUNTIME", "nope")
    with pytest.raises(InvalidError, match="available: .*process"):
        get_runtime()
    with pytest.raises(InvalidError, match="'firecracker'.*process"):
        get_runtime("firecracker")


# ---- cgroups ----------------------------------------------------------------------------


def test_limits_written_and_cgroup_removed(limited: ProcessRuntime) -> None:
    code = "import sys; print(open('/proc/self/cgroup').read(), flush=True); sys.stdin.read()"

    async def main() -> tuple[ProcessContainer, bytes, ExitStatus]:
        c = await start(limited, launch(code, cpu=0.5, memory_mb=300, pids_max=50))
        assert c.cgroup is not None
        out = await c.stdout.read()  # stdin is /dev/null: the child reads EOF and exits
        return c, out, await c.wait()

    c, out, status = run(main())
    assert status.exit_code == 0 and not status.oom_killed
    assert f"/strato/{c.container_id}" in out.decode()  # joined before user code ran
    assert c.cgroup is not None
    for d in c.cgroup.dirs.values():
        assert not d.exists(), f"{d} left behind"


def test_limit_values(limited: ProcessRuntime) -> None:
    async def main() -> dict[str, str]:
        c = await start(
            limited,
            launch(
                "import time; print('ready', flush=True); time.sleep(60)",
                cpu=0.5,
                memory_mb=300,
                pids_max=50,
            ),
        )
        assert c.cgroup is not None
        await c.stdout.readline()
        assert c.pid in c.cgroup.pids()
        d = c.cgroup.dirs
        if c.cgroup.version == 2:
            read = {
                n: (d["unified"] / n).read_text().strip()
                for n in ("cpu.max", "memory.max", "pids.max")
            }
        else:
            read = {
                "cpu.max": " ".join(
                    (d["cpu"] / f).read_text().strip()
                    for f in ("cpu.cfs_quota_us", "cpu.cfs_period_us")
                ),
                "memory.max": (d["memory"] / "memory.limit_in_bytes").read_text().strip(),
                "pids.max": (d["pids"] / "pids.max").read_text().strip(),
            }
        await c.stop(0)
        return read

    assert run(main()) == {
        "cpu.max": "50000 100000",
        "memory.max": str(300 << 20),
        "pids.max": "50",
    }


def test_oom_killed(limited: ProcessRuntime) -> None:
    async def main() -> ExitStatus:
        c = await start(limited, launch("x = b'1' * (400 << 20); print('survived')", memory_mb=100))
        out = await c.stdout.read()
        assert b"survived" not in out
        return await c.wait()

    status = run(main())
    assert status.oom_killed
    assert "memory" in status.description and "100 MiB" in status.description


def test_signal_is_not_oom(limited: ProcessRuntime) -> None:
    async def main() -> ExitStatus:
        c = await start(
            limited,
            launch("import time; print('ready', flush=True); time.sleep(60)", memory_mb=100),
        )
        await c.stdout.readline()
        c.signal(signal.SIGKILL)
        return await c.wait()

    status = run(main())
    assert status.signal == signal.SIGKILL and not status.oom_killed


def test_pids_max_stops_fork_loop(limited: ProcessRuntime) -> None:
    code = """
        import json, subprocess
        started, errors = [], 0
        for _ in range(200):
            try:
                child = subprocess.Popen(
                    ['sleep', '30'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                started.append(child.pid)
            except OSError:
                errors += 1
        print(json.dumps({'pids': started, 'errors': errors}), flush=True)
    """

    async def main() -> tuple[bytes, ExitStatus, ProcessContainer]:
        c = await start(limited, launch(code, pids_max=20))
        out = await c.stdout.readline()  # the sleepers hold no pipe, but do not rely on EOF
        return out, await c.wait(), c

    out, status, c = run(main())
    report = json.loads(out)
    assert status.exit_code == 0
    assert 0 < len(report["pids"]) < 20 and report["errors"] == 200 - len(report["pids"])
    assert wait_gone(report["pids"]), "the sleeping children outlived their container"
    assert c.cgroup is not None and not any(d.exists() for d in c.cgroup.dirs.values())

    async def again() -> ExitStatus:  # the node still starts processes
        return await (await start(limited, launch("pass"))).wait()

    assert run(again()).exit_code == 0


def test_escaped_children_are_killed(limited: ProcessRuntime) -> None:
    code = """
        import subprocess
        p = subprocess.Popen(['sleep', '30'], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(p.pid, flush=True)
    """

    async def main() -> tuple[int, ExitStatus]:
        c = await start(limited, launch(code))
        pid = int(await c.stdout.readline())
        return pid, await c.wait()

    pid, status = run(main())
    assert status.exit_code == 0
    assert wait_gone([pid])


# ---- mount parsing (pure) -------------------------------------------------------------

HYBRID = """\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:1 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
UNIFIED = "30 23 0:26 /kubepods/x /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_parse_mountinfo() -> None:
    hybrid = parse_mountinfo(HYBRID)
    assert hybrid.v1["cpu"] == CgroupMount(Path("/sys/fs/cgroup/cpu,cpuacct"), "/")
    assert hybrid.v1["memory"].point == Path("/sys/fs/cgroup/memory")
    assert hybrid.v1["pids"].point == Path("/sys/fs/cgroup/pids")
    assert hybrid.v2 == CgroupMount(Path("/sys/fs/cgroup/unified"), "/")
    unified = parse_mountinfo(UNIFIED)
    assert unified.v1 == {} and unified.v2 == CgroupMount(Path("/sys/fs/cgroup"), "/kubepods/x")


def test_exit_descriptions() -> None:
    assert ExitStatus(None, signal.SIGBUS, False).description == (
        "killed by signal SIGBUS (bus error)"
    )
    assert ExitStatus(None, 9, True, 256).description == (
        "ran out of memory (limit 256 MiB) and was killed"
    )
    assert ExitStatus(0, None, False).description == "exited with code 0"


def test_v2_join_kill_and_remove_on_a_hybrid_host(limited: ProcessRuntime) -> None:
    """On a hybrid host the empty v2 mount still exercises joining, cgroup.kill and rmdir."""
    mounts = read_mounts()
    if limited.cgroups is None or limited.cgroups.version == 2 or mounts.v2 is None:
        pytest.skip("no separate cgroup v2 mount: the tests above cover v2 already")
    parent = mounts.v2.point / f"strato-test-{uuid.uuid4().hex[:8]}"
    parent.mkdir()
    runtime = ProcessRuntime(use_cgroups=False, gpus_present=False)
    runtime.cgroups = CgroupV2Manager(parent)
    code = """
        import subprocess, sys
        p = subprocess.Popen(['sleep', '30'], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(p.pid, open('/proc/self/cgroup').read(), flush=True)
        sys.exit(4)
    """

    async def main() -> tuple[str, ExitStatus, ProcessContainer]:
        c = await start(runtime, launch(code))
        out = (await c.stdout.read()).decode()
        return out, await c.wait(), c

    try:
        out, status, c = run(main())
        assert f"0::/{parent.name}/{c.container_id}" in out
        assert status == ExitStatus(exit_code=4, signal=None, oom_killed=False)
        assert wait_gone([int(out.split()[0])])
        assert c.cgroup is not None and not c.cgroup.path.exists()
    finally:
        parent.rmdir()


def test_own_limits_seen_from_inside(limited: ProcessRuntime) -> None:
    """The node inventory's cgroup reading, run inside a limited container."""
    code = """
        from strato.worker.resources import detect_cpu, detect_memory_mb
        print(detect_cpu(), detect_memory_mb())
    """

    async def main() -> bytes:
        c = await start(limited, launch(code, cpu=0.5, memory_mb=300))
        out, err = await asyncio.gather(c.stdout.read(), c.stderr.read())
        assert (await c.wait()).exit_code == 0, err.decode()
        return out

    assert run(main()).split() == [b"0.5", b"300"]
