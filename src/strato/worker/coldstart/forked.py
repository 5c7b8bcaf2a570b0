"""Forking one container from a zygote: the request (its sandbox as the runtime says,
:meth:`strato.runtime.forking.Forking.sandbox`), the set-up handshake with its monitor,
and the :class:`ForkedContainer` the worker then watches like any other."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal as _signal
import time
from typing import Any

from strato.protocol import zygote as zp
from strato.runtime.base import ContainerLaunch, ExitStatus, RunningContainer
from strato.runtime.cgroups import ContainerCgroup
from strato.runtime.forking import Forking, ForkSandbox, ForkUnavailable, Namespaces

from .channel import Channel, pipe_reader, socketpair
from .zygotes import ForkFailed, Zygote, kill

log = logging.getLogger("strato.worker")

FORK_TIMEOUT_S = 10.0


class ForkedContainer(RunningContainer):
    """A container forked from a zygote: ``pid`` is its main process (PID 1 of its own PID
    namespace where the runtime isolates), whose parent, the monitor, reports how it
    ended."""

    def __init__(
        self,
        container_id: str,
        pid: int,
        monitor: int | None,
        chan: Channel,
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader,
        cgroup: ContainerCgroup | None,
        memory_mb: int | None,
        zygote: Zygote,
    ) -> None:
        self.container_id = container_id
        self.pid = pid
        self.monitor = monitor
        self.stdout = stdout
        self.stderr = stderr
        self.cgroup = cgroup
        self.zygote = zygote
        self._chan = chan
        self._memory_mb = memory_mb
        self._wait_task: asyncio.Future[ExitStatus] | None = None
        self._done = False
        self.egress: Any = None  # its user-mode network stack, if any

    async def wait(self) -> ExitStatus:
        if self._wait_task is None:
            self._wait_task = asyncio.ensure_future(self._wait())
        return await asyncio.shield(self._wait_task)

    async def _wait(self) -> ExitStatus:
        code: int | None = None
        sig: int | None = _signal.SIGKILL  # no report: the monitor itself was killed
        while (got := await self._chan.get()) is not None:
            report, _ = got
            if isinstance(report, zp.Exited):
                code, sig = report.code, report.signal
        self._done = True
        oom = False
        cgroup = self.cgroup
        try:
            if cgroup is not None and code != 0:
                oom = cgroup.oom_killed(killed_by_sigkill=sig == _signal.SIGKILL)
        finally:
            self._chan.close()
            self.zygote.children -= 1
            self.zygote.last_used = time.monotonic()

            egress, self.egress = self.egress, None

            def cleanup() -> None:
                if cgroup is not None:
                    cgroup.kill_all()
                    cgroup.remove()
                if egress is not None:
                    egress.close()

            await asyncio.to_thread(cleanup)
        memory_mb = self._memory_mb if cgroup is not None else None
        return ExitStatus(code, sig, oom, memory_mb)

    def signal(self, sig: int) -> None:
        if sig == _signal.SIGKILL:
            if self.cgroup is not None and not self._done:
                self.cgroup.kill_all(timeout_s=0)
            kill(self.pid, sig)
            kill(self.monitor, sig)
            return
        if self._done:
            return
        try:
            os.killpg(self.pid, sig)  # it leads its own session
        except (ProcessLookupError, PermissionError):
            kill(self.pid, sig)


def _join_files(cgroup: ContainerCgroup) -> list[str]:
    """The files a process writes ``0`` to, to move itself (one thread) into ``cgroup``."""
    if cgroup.version == 1:
        return [p[: -len("cgroup.procs")] + "tasks" for p in cgroup.procs_paths]
    return list(cgroup.procs_paths)


def fork_request(sandbox: ForkSandbox, cid: str, spec: bytes) -> zp.ForkRequest:
    """The request for ``sandbox``: its fields travel as they are (the same names)."""
    fields = {f.name: getattr(sandbox, f.name) for f in dataclasses.fields(sandbox)}
    return zp.ForkRequest(cid=cid, spec=spec if sandbox.spec_path else None, **fields)


async def fork(
    z: Zygote,
    launch: ContainerLaunch,
    forking: Forking,
    binds: list[tuple[str, str]],
    spec: bytes,
) -> ForkedContainer:
    """Fork the container of ``launch`` from ``z``; ``binds``: its binds as the zygote sees
    their sources; ``spec``: its function spec (msgpack), written where the runtime says.
    Raises :class:`ForkFailed` (``broken``: strato's own set-up failed)."""
    cid = launch.container_id
    try:
        sandbox = forking.sandbox(launch, binds)
    except ForkUnavailable as e:
        raise ForkFailed(str(e)) from None
    req = fork_request(sandbox, cid, spec)
    cgroup: ContainerCgroup | None = None
    send: list[int] = []
    mine, theirs = socketpair()
    out_r = err_r = -1
    ahead: Namespaces | None = None
    try:
        cgroup = forking.cgroup(launch)
        if cgroup is not None:
            send += [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in _join_files(cgroup)]
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        fds = [out_w, err_w, theirs.fileno(), *send]
        send += [out_w, err_w]
        if z.chan is None or not z.alive:
            raise ForkFailed(f"the {z.kind} is gone")
        ahead = forking.namespaces_ahead(sandbox)
        if ahead is not None:  # its user and network namespaces, made ahead
            req.premade = True
            fds += ahead.fds
        z.chan.send(req, fds)
    except BaseException as e:
        mine.close()
        for fd in (out_r, err_r):
            if fd >= 0:
                os.close(fd)
        if cgroup is not None:
            cgroup.remove(timeout_s=0.5)
        if ahead is not None:
            asyncio.ensure_future(asyncio.to_thread(ahead.discard))
        if isinstance(e, ForkFailed):
            raise
        raise ForkFailed(f"{type(e).__name__}: {e}") from None
    finally:
        theirs.close()
        for fd in send:
            os.close(fd)
    z.children += 1
    z.last_used = time.monotonic()
    chan = Channel(mine)
    monitor: int | None = None
    pid: int | None = None
    egress: Any = None
    if ahead is not None:
        egress = ahead.egress
        ahead.close_fds()  # the monitor has its own
    try:
        while pid is None:
            got = await chan.get(FORK_TIMEOUT_S)
            if got is None:
                raise ForkFailed(f"the {z.kind}'s fork ended before the container started")
            report, sender = got
            if isinstance(report, zp.NamespacesMade):
                if monitor is not None and egress is None:
                    if sandbox.user is not None:
                        _map_ids(chan, forking, monitor, sandbox.user)
                    if sandbox.egress:
                        egress = await _attach_egress(chan, forking, monitor)
            elif isinstance(report, zp.SetupFailed):  # strato's own: it would fail again
                why = f"a forked container could not be set up: {report.error}"
                raise ForkFailed(why, broken=True)
            elif isinstance(report, zp.MonitorUp):
                monitor = sender
            elif isinstance(report, zp.Started):
                pid = sender
    except BaseException as e:
        z.children -= 1
        chan.close()
        os.close(out_r)
        os.close(err_r)
        kill(monitor, _signal.SIGKILL)
        if ahead is not None:
            await asyncio.to_thread(ahead.discard)
        elif egress is not None:
            await asyncio.to_thread(egress.close)
        if cgroup is not None:
            await asyncio.to_thread(cgroup.kill_all)
            await asyncio.to_thread(cgroup.remove)
        if isinstance(e, ForkFailed):
            raise
        if isinstance(e, TimeoutError):
            why = f"no container from the {z.kind} after {FORK_TIMEOUT_S:g}s"
            raise ForkFailed(why) from None
        raise
    stdout = await pipe_reader(out_r)
    stderr = await pipe_reader(err_r)
    memory_mb = launch.memory_mb if cgroup is not None else None
    made = " (namespaces made ahead)" if ahead is not None else ""
    log.debug("container %s forked from %s %s (pid %s)%s", cid, z.kind, z.name, pid, made)
    forked = ForkedContainer(cid, pid, monitor, chan, stdout, stderr, cgroup, memory_mb, z)
    forked.egress = egress
    if ahead is not None:  # its namespaces live on in the container: the holder goes
        asyncio.ensure_future(asyncio.to_thread(ahead.end_holder))
    return forked


def _map_ids(chan: Channel, forking: Forking, monitor: int, user: tuple[int, int]) -> None:
    """Map the container's ids in the user namespace the monitor made; tell it to go on
    (or why not)."""
    try:
        forking.map_ids(monitor, user)
    except OSError as e:
        chan.send(zp.IdsMapped(False, f"cannot map the container's ids: {e}"))
        return
    chan.send(zp.IdsMapped(True))


async def _attach_egress(chan: Channel, forking: Forking, monitor: int) -> Any:
    """Attach egress to the network namespace the monitor made, then tell it to go on (or
    why not: it then fails, and the container starts normally)."""
    try:
        egress = await asyncio.to_thread(forking.attach_egress, monitor)
    except OSError as e:
        chan.send(zp.EgressAttached(False, str(e)))
        return None
    chan.send(zp.EgressAttached(True))
    return egress
