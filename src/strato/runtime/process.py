"""The ``process`` runtime: a plain subprocess, in its own cgroup where that is possible.

It isolates nothing (the container shares this machine's filesystem, network and process
table) and says so in a warning the first time it starts a container. Where cgroups are
usable it enforces ``cpu``, ``memory_mb`` and ``pids_max`` and reports OOM kills.

Joining the cgroup before user code runs: see :mod:`strato.runtime.supervise`.
"""

from __future__ import annotations

import logging
import os
import signal as _signal

from strato.exceptions import InvalidError
from strato.runtime.base import CHANNEL_ENV, Capabilities, ContainerLaunch, Runtime
from strato.runtime.cgroups import CgroupManager, validate_limits
from strato.runtime.supervise import (
    STREAM_LIMIT,
    SupervisedContainer,
    cgroup_join_argv,
    describe_limits,
    node_has_gpus,
    open_cgroups,
    resolve_executable,
    spawn,
)

log = logging.getLogger("strato.runtime")

__all__ = ["STREAM_LIMIT", "ProcessContainer", "ProcessRuntime", "node_has_gpus"]

_warned = False
_resolve = resolve_executable


class ProcessContainer(SupervisedContainer):
    def _after_exit(self) -> None:
        if self.cgroup is None:
            # Leftover members of the process group go with the main process. The group id
            # stays reserved while any member lives; if none does, the id could only reach a
            # stranger after a full pid wrap-around within microseconds (accepted).
            self._killpg(_signal.SIGKILL)

    def _killpg(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def signal(self, sig: int) -> None:
        if self.running:
            self._killpg(sig)
        if sig == _signal.SIGKILL:
            self._kill_cgroup()  # also those that left the process group


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
        self.cgroups: CgroupManager | None
        self.cgroups, self.cgroup_reason = open_cgroups(use_cgroups, cgroup_parent)
        self.gpus_present = node_has_gpus() if gpus_present is None else gpus_present
        self.capabilities = Capabilities(
            isolation=False,
            network_control=False,
            cgroups=self.cgroups is not None,
            gpu=True,  # via CUDA_VISIBLE_DEVICES only: a courtesy, not enforced
            snapshot=False,
        )

    def describe(self) -> str:
        return f"process (no isolation; {describe_limits(self.cgroups, self.cgroup_reason)})"

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
        if launch.channel_socket is not None:
            env[CHANNEL_ENV] = f"unix:{launch.channel_socket}"  # the host path is the path
        return env

    async def start(self, launch: ContainerLaunch) -> ProcessContainer:
        if not launch.argv:
            raise InvalidError(f"container {launch.container_id}: argv is empty.")
        if launch.block_network:
            raise InvalidError(
                "The 'process' runtime cannot block a container's network; run functions "
                "with block_network=True on the 'bwrap' or 'gvisor' runtime."
            )
        if launch.rootfs_layers:
            raise InvalidError(
                "The 'process' runtime cannot run a container image; use the 'bwrap' or "
                "'gvisor' runtime."
            )
        moved = [b for b in launch.binds if os.path.normpath(b.src) != os.path.normpath(b.dst)]
        if moved:
            raise InvalidError(
                f"The 'process' runtime cannot mount {moved[0].src} at {moved[0].dst}: it "
                "shares this machine's filesystem. Use the 'bwrap' or 'gvisor' runtime."
            )
        validate_limits(launch.cpu, launch.memory_mb, launch.pids_max)
        self._warn_once()
        env = self._environment(launch)
        _resolve(launch.argv[0], env, launch.cwd)
        cgroup = None
        if self.cgroups is not None:
            cgroup = self.cgroups.create(
                launch.container_id, launch.cpu, launch.memory_mb, launch.pids_max
            )
        try:
            proc = await spawn(cgroup_join_argv(cgroup, launch.argv), env, launch.cwd)
        except BaseException:
            if cgroup is not None:
                cgroup.remove(timeout_s=0.5)
            raise
        memory_mb = launch.memory_mb if cgroup is not None else None
        return ProcessContainer(launch.container_id, proc, cgroup, memory_mb)
