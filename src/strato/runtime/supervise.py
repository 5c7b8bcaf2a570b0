"""What every runtime that starts a host process shares: the steps of a start
(:class:`SupervisedRuntime`), joining the container's cgroup before ``exec``, the
subprocess itself, and waiting for it (OOM check, cgroup cleanup).

Joining the cgroup: the runtime starts
``/bin/sh -c 'echo 0 > <dir>/tasks && ... && exec "$@"' strato-cgroup-join ARGV...``
(``echo $$ > <dir>/cgroup.procs`` on cgroup v2, see
:meth:`~strato.runtime.cgroups.ContainerCgroup.join_self_shell`), so the shell moves itself
into every hierarchy of the cgroup and only then ``exec``s the real program (the user's, or
``bwrap``/``runsc``) under the same pid. If a write fails the shell
exits (code 2) before ``exec``; nothing runs outside the cgroup. This avoids ``preexec_fn``,
which is unsafe in a process with threads. The cost is one ``sh`` start (about a millisecond).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import glob
import logging
import os
import shutil
import signal as _signal
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from strato.runtime.base import ContainerLaunch, ExitStatus, RunningContainer, Runtime
from strato.runtime.cgroups import (
    CgroupManager,
    CgroupUnavailable,
    ContainerCgroup,
    open_manager,
)

if TYPE_CHECKING:
    from strato.runtime.forking import Helper

log = logging.getLogger("strato.runtime")

SHELL = "/bin/sh"
STREAM_LIMIT = 1 << 20  # readline() limit of stdout/stderr


def node_has_gpus() -> bool:
    """Whether this machine has NVIDIA GPUs (driver loaded or device nodes present)."""
    try:
        if os.listdir("/proc/driver/nvidia/gpus"):
            return True
    except OSError:
        pass
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def resolve_executable(argv0: str, env: dict[str, str], cwd: str) -> None:
    """Raise ``FileNotFoundError`` as ``exec`` would, before a wrapper hides it as a code."""
    if "/" in argv0:
        path = argv0 if os.path.isabs(argv0) else os.path.join(cwd, argv0)
        found = os.path.isfile(path) and os.access(path, os.X_OK)
    else:
        found = shutil.which(argv0, path=env.get("PATH", os.defpath)) is not None
    if not found:
        raise FileNotFoundError(errno.ENOENT, "No such executable file", argv0)


def open_cgroups(use: bool, parent: str) -> tuple[CgroupManager | None, str | None]:
    """A cgroup manager, or ``None`` and why not (for ``describe()`` and warnings)."""
    if not use:
        return None, "disabled by configuration"
    try:
        return open_manager(parent), None
    except CgroupUnavailable as exc:
        return None, str(exc)


def describe_limits(cgroups: CgroupManager | None, reason: str | None) -> str:
    if cgroups is not None:
        return f"limits by {cgroups.describe()}"
    return f"no resource limits: {reason}"


def cgroup_join_argv(cgroup: ContainerCgroup | None, argv: list[str]) -> list[str]:
    """``argv``, run so that it joins ``cgroup`` before it starts (unchanged if ``None``)."""
    if cgroup is None:
        return list(argv)
    return [SHELL, "-c", f'{cgroup.join_self_shell()} && exec "$@"', "strato-cgroup-join", *argv]


async def spawn(
    argv: list[str], env: dict[str, str], cwd: str, pass_fds: tuple[int, ...] = ()
) -> asyncio.subprocess.Process:
    """Start ``argv`` in a new session, stdin from /dev/null, stdout/stderr piped; of this
    process's file descriptors only ``pass_fds`` are inherited."""
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
        start_new_session=True,
        close_fds=True,
        pass_fds=pass_fds,
        limit=STREAM_LIMIT,
    )


_SIGNAL_NUMBERS = {int(s) for s in _signal.Signals}


def wrapped_returncode(returncode: int) -> tuple[int | None, int | None]:
    """``(exit_code, signal)`` from the code of a wrapper (``bwrap``, ``runsc``) that reports
    death by signal N as exit code 128+N, as a shell does. A program that exits with such a
    code on purpose is read as killed by that signal: the wrappers do not tell them apart."""
    if returncode < 0:
        return None, -returncode
    if returncode > 128 and returncode - 128 in _SIGNAL_NUMBERS:
        return None, returncode - 128
    return returncode, None


class SupervisedContainer(RunningContainer):
    """A container whose main host process is a child of this one, maybe in a cgroup.

    ``wait()`` waits for that process, checks the cgroup for an OOM kill, then cleans up: the
    cgroup's leftovers are killed and it is removed, and :meth:`_release` runs (in a thread).
    """

    wraps_exit_status = False
    """The main process reports a signal as 128+N (see :func:`wrapped_returncode`)."""

    def __init__(self, st: Launching) -> None:
        proc, cgroup = st.proc, st.cgroup
        assert proc is not None
        self.container_id = st.launch.container_id
        self.pid = proc.pid
        assert proc.stdout is not None and proc.stderr is not None
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.cgroup = cgroup
        """The container's cgroup, or ``None`` when cgroups are not in use."""
        self._proc = proc
        self._memory_mb = st.launch.memory_mb if cgroup is not None else None
        self._wait_task: asyncio.Future[ExitStatus] | None = None
        self._cleaned = False

    @property
    def running(self) -> bool:
        return self._proc.returncode is None

    async def wait(self) -> ExitStatus:
        if self._wait_task is None:
            self._wait_task = asyncio.ensure_future(self._wait())
        return await asyncio.shield(self._wait_task)

    async def _wait(self) -> ExitStatus:
        returncode = await self._proc.wait()
        if self.wraps_exit_status:
            code, sig = wrapped_returncode(returncode)
        else:
            code, sig = (None, -returncode) if returncode < 0 else (returncode, None)
        oom = False
        try:
            if self.cgroup is not None and returncode != 0:
                oom = self.cgroup.oom_killed(killed_by_sigkill=sig == _signal.SIGKILL)
            self._after_exit()
        finally:
            await asyncio.to_thread(self._cleanup)
        memory_mb = self._memory_mb if self.cgroup is not None else None
        return ExitStatus(code, sig, oom, memory_mb)

    def _after_exit(self) -> None:
        """Runs in the event loop as soon as the main process has exited (quick)."""

    def _cleanup(self) -> None:
        if self.cgroup is not None:
            self.cgroup.kill_all()
            self.cgroup.remove()
        self._cleaned = True
        try:
            self._release()
        except Exception:  # noqa: BLE001 - cleanup must not hide the exit status
            log.exception("container %s: cleanup failed", self.container_id)

    def _release(self) -> None:
        """Free what the runtime set up besides the cgroup (runs in a thread, once)."""

    def _kill_cgroup(self) -> None:
        if self.cgroup is not None and not self._cleaned:
            self.cgroup.kill_all(timeout_s=0)


@dataclass(eq=False)
class Launching:
    """One start in the making: the command, and what was set up for it (freed again if
    the start fails, else handed to the container or zygote)."""

    launch: ContainerLaunch
    argv: list[str]
    env: dict[str, str]
    cwd: str = "/"
    pass_fds: list[int] = field(default_factory=list)
    """Inherited by the process (the caller's: left open)."""
    own_fds: list[int] = field(default_factory=list)
    """Inherited by the process, closed here once it started or failed to."""
    holds: list[Callable[[], object]] = field(default_factory=list)
    """What was set up (blocking frees, run last first): a root, a network stack..."""
    container_dir: Any = None
    egress: Any = None
    proc: asyncio.subprocess.Process | None = None
    cgroup: ContainerCgroup | None = None
    """Its cgroup, once made (``None``: no cgroups here)."""

    def hold(self, free: Callable[[], object]) -> None:
        self.holds.append(free)

    def rollback(self) -> None:
        holds, self.holds = self.holds, []
        for free in reversed(holds):
            try:
                free()
            except Exception:  # noqa: BLE001 - the start's own error is what matters
                log.exception("freeing what a failed start set up failed")


C = TypeVar("C", bound=SupervisedContainer)


class SupervisedRuntime(Runtime, Generic[C]):
    """A runtime whose container is a host process it starts. A start is always: check
    the launch, take its environment, let the container's user reach the channel socket
    (isolating runtimes), :meth:`prepare` the rest (a root, a network, the command), make
    its cgroup, spawn the command joining that cgroup first, and :meth:`wrap` the process;
    whatever fails frees what was set up. A zygote (:meth:`launch_helper`) starts the
    same way."""

    cgroup_reason: str | None = None
    pids_extra = 0
    """Processes of the runtime's own in the container's cgroup (its pids limit is raised
    by as many)."""

    def check(self, launch: ContainerLaunch) -> None:
        """Raise for a launch this runtime cannot run, before anything is set up."""

    @abstractmethod
    async def prepare(self, launch: ContainerLaunch, st: Launching) -> None:
        """Set up what the container needs and fill ``st``'s command (``st.hold`` what
        must be freed if the start fails)."""

    container_class: type[C]

    def wrap(self, st: Launching) -> C:
        """The running container of the process ``st`` started."""
        return self.container_class(st)

    def describe_limits(self) -> str:
        return describe_limits(self.cgroups, self.cgroup_reason)

    async def start(self, launch: ContainerLaunch) -> C:
        self.check(launch)
        st = Launching(launch, list(launch.argv), self.environment(launch), launch.cwd)
        if self.capabilities.isolation and launch.channel_socket is not None:
            from strato.runtime.isolation import let_container_reach

            let_container_reach(launch.channel_socket)
        pids = None if launch.pids_max is None else launch.pids_max + self.pids_extra
        await self._spawn(st, pids, self.prepare(launch, st))
        return self.wrap(st)

    async def launch_helper(self, st: Launching, prepare: Any = None) -> Helper:
        """Start a zygote whose command ``st`` holds (``prepare``: an awaitable that sets
        up the rest first); its cgroup has no pids limit."""
        from strato.runtime.forking import Helper

        await self._spawn(st, None, prepare)
        assert st.proc is not None
        return Helper(st.proc, st.cgroup, list(st.holds))

    async def _spawn(self, st: Launching, pids_max: int | None, prepare: Any) -> None:
        launch = st.launch
        try:
            if prepare is not None:
                await prepare
            if self.cgroups is not None:
                st.cgroup = self.cgroups.create(
                    launch.container_id, launch.cpu, launch.memory_mb, pids_max, launch.cpu_request
                )
            argv = cgroup_join_argv(st.cgroup, st.argv)
            fds = (*st.pass_fds, *st.own_fds)
            st.proc = await spawn(argv, st.env, st.cwd, pass_fds=fds)
        except BaseException:
            if st.cgroup is not None:
                st.cgroup.remove(timeout_s=0.5)
            await asyncio.to_thread(st.rollback)
            raise
        finally:
            for fd in st.own_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            st.own_fds = []
