"""The ``process`` runtime: a plain subprocess, in its own cgroup where that is possible.

It isolates nothing (the container shares this machine's filesystem, network and process
table) and says so in a warning the first time it starts a container. Where cgroups are
usable it enforces ``cpu``, ``memory_mb`` and ``pids_max`` and reports OOM kills.

Joining the cgroup: the child joins its cgroup *before* user code runs. The runtime starts
``/bin/sh -c 'echo $$ > <cgroup.procs> && ... && exec "$@"' strato-cgroup-join ARGV...``,
so the shell writes its own pid into every ``cgroup.procs`` and only then ``exec``s the
real program under the same pid. If a write fails the shell exits (code 2) before
``exec``; no user code runs outside the cgroup. This avoids ``preexec_fn``, which is
unsafe in a process with threads. The cost is one ``sh`` start (about a millisecond).
"""

from __future__ import annotations

import asyncio
import errno
import glob
import logging
import os
import shlex
import shutil
import signal as _signal

from strato.exceptions import InvalidError
from strato.runtime.base import (
    Capabilities,
    ContainerLaunch,
    ExitStatus,
    RunningContainer,
    Runtime,
)
from strato.runtime.cgroups import (
    CgroupManager,
    CgroupUnavailable,
    ContainerCgroup,
    open_manager,
    validate_limits,
)

log = logging.getLogger("strato.runtime")

SHELL = "/bin/sh"
STREAM_LIMIT = 1 << 20  # readline() limit of stdout/stderr
_warned = False


def node_has_gpus() -> bool:
    """Whether this machine has NVIDIA GPUs (driver loaded or device nodes present)."""
    try:
        if os.listdir("/proc/driver/nvidia/gpus"):
            return True
    except OSError:
        pass
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _resolve(argv0: str, env: dict[str, str], cwd: str) -> None:
    """Raise ``FileNotFoundError`` as ``exec`` would, before the shell hides it as code 127."""
    if "/" in argv0:
        path = argv0 if os.path.isabs(argv0) else os.path.join(cwd, argv0)
        found = os.path.isfile(path) and os.access(path, os.X_OK)
    else:
        found = shutil.which(argv0, path=env.get("PATH", os.defpath)) is not None
    if not found:
        raise FileNotFoundError(errno.ENOENT, "No such executable file", argv0)


class ProcessContainer(RunningContainer):
    def __init__(
        self,
        container_id: str,
        proc: asyncio.subprocess.Process,
        cgroup: ContainerCgroup | None,
        memory_mb: int | None,
    ) -> None:
        self.container_id = container_id
        self.pid = proc.pid
        assert proc.stdout is not None and proc.stderr is not None
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.cgroup = cgroup
        """The container's cgroup, or ``None`` when cgroups are not in use."""
        self._proc = proc
        self._memory_mb = memory_mb
        self._wait_task: asyncio.Future[ExitStatus] | None = None
        self._cleaned = False

    async def wait(self) -> ExitStatus:
        if self._wait_task is None:
            self._wait_task = asyncio.ensure_future(self._wait())
        return await asyncio.shield(self._wait_task)

    async def _wait(self) -> ExitStatus:
        returncode = await self._proc.wait()
        oom = False
        if self.cgroup is not None:
            if returncode != 0:
                oom = self.cgroup.oom_killed(killed_by_sigkill=returncode == -_signal.SIGKILL)
            await asyncio.to_thread(self._cleanup, self.cgroup)
        else:
            # Leftover members of the process group go with the main process. The group id
            # stays reserved while any member lives; if none does, the id could only reach a
            # stranger after a full pid wrap-around within microseconds (accepted).
            self._killpg(_signal.SIGKILL)
        return ExitStatus.from_returncode(returncode, oom_killed=oom, memory_mb=self._memory_mb)

    def _cleanup(self, cgroup: ContainerCgroup) -> None:
        cgroup.kill_all()
        cgroup.remove()
        self._cleaned = True

    def _killpg(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def signal(self, sig: int) -> None:
        if self._proc.returncode is None:
            self._killpg(sig)
        if sig == _signal.SIGKILL and self.cgroup is not None and not self._cleaned:
            self.cgroup.kill_all(timeout_s=0)  # also those that left the process group


class ProcessRuntime(Runtime):
    """Runs containers as plain subprocesses of the worker agent."""

    name = "process"

    def __init__(
        self,
        *,
        use_cgroups: bool = True,
        cgroup_parent: str = "strato",
        gpus_present: bool | None = None,
    ) -> None:
        self.cgroups: CgroupManager | None = None
        self.cgroup_reason: str | None = "disabled by configuration"
        if use_cgroups:
            try:
                self.cgroups = open_manager(cgroup_parent)
                self.cgroup_reason = None
            except CgroupUnavailable as exc:
                self.cgroup_reason = str(exc)
        self.gpus_present = node_has_gpus() if gpus_present is None else gpus_present
        self.capabilities = Capabilities(
            isolation=False,
            network_control=False,
            cgroups=self.cgroups is not None,
            gpu=True,  # via CUDA_VISIBLE_DEVICES only: a courtesy, not enforced
            snapshot=False,
        )

    def describe(self) -> str:
        if self.cgroups is not None:
            limits = f"limits by {self.cgroups.describe()}"
        else:
            limits = f"no resource limits: {self.cgroup_reason}"
        return f"process (no isolation; {limits})"

    def _warn_once(self) -> None:
        global _warned
        if _warned:
            return
        _warned = True
        limits = (
            "cpu, memory and pids limits are enforced by cgroups"
            if self.cgroups is not None
            else f"cpu, memory and pids limits are NOT enforced ({self.cgroup_reason})"
        )
        log.warning(
            "The 'process' runtime isolates nothing: containers share this machine's "
            "filesystem, network, processes and users; %s. Use the 'bwrap' or 'gvisor' "
            "runtime for isolation.",
            limits,
        )

    def _environment(self, launch: ContainerLaunch) -> dict[str, str]:
        env = dict(launch.env)
        if launch.gpu_indices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in launch.gpu_indices)
        elif self.gpus_present:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    async def start(self, launch: ContainerLaunch) -> ProcessContainer:
        if not launch.argv:
            raise InvalidError(f"container {launch.container_id}: argv is empty.")
        if launch.block_network:
            raise InvalidError(
                "The 'process' runtime cannot block a container's network; run functions "
                "with block_network=True on the 'bwrap' or 'gvisor' runtime."
            )
        validate_limits(launch.cpu, launch.memory_mb, launch.pids_max)
        self._warn_once()
        env = self._environment(launch)
        _resolve(launch.argv[0], env, launch.cwd)
        cgroup = None
        argv = list(launch.argv)
        if self.cgroups is not None:
            cgroup = self.cgroups.create(
                launch.container_id, launch.cpu, launch.memory_mb, launch.pids_max
            )
            joins = " && ".join(f"echo $$ > {shlex.quote(p)}" for p in cgroup.procs_paths)
            argv = [SHELL, "-c", f'{joins} && exec "$@"', "strato-cgroup-join", *argv]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=launch.cwd,
                start_new_session=True,
                close_fds=True,
                limit=STREAM_LIMIT,
            )
        except BaseException:
            if cgroup is not None:
                cgroup.remove(timeout_s=0.5)
            raise
        memory_mb = launch.memory_mb if cgroup is not None else None
        return ProcessContainer(launch.container_id, proc, cgroup, memory_mb)
