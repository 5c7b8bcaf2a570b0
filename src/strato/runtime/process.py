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
from strato.runtime.base import Capabilities, ContainerLaunch
from strato.runtime.cgroups import CgroupManager, validate_limits
from strato.runtime.forking import PlainForking
from strato.runtime.supervise import (
    STREAM_LIMIT,
    Launching,
    SupervisedContainer,
    SupervisedRuntime,
    node_has_gpus,
    open_cgroups,
    resolve_executable,
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


class ProcessRuntime(SupervisedRuntime[ProcessContainer]):
    """Runs containers as plain subprocesses of the worker agent."""

    name = "process"
    container_class = ProcessContainer

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
            snapshot=True,
        )
        self.forking = PlainForking(self)

    def describe(self) -> str:
        return f"process (no isolation; {self.describe_limits()})"

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

    def check(self, launch: ContainerLaunch) -> None:
        if not launch.argv:
            raise InvalidError(f"container {launch.container_id}: argv is empty.")
        if launch.block_network:
            raise InvalidError(
                "The 'process' runtime cannot block a container's network; run functions "
                "with block_network=True on the 'bwrap' or 'gvisor' runtime."
            )
        if launch.cidr_allowlist is not None:
            raise InvalidError(
                "The 'process' runtime cannot restrict a container's network; use "
                "cidr_allowlist on the 'bwrap' or 'gvisor' runtime."
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

    async def prepare(self, launch: ContainerLaunch, st: Launching) -> None:
        _resolve(launch.argv[0], st.env, launch.cwd)
