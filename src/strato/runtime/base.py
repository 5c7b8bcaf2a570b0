"""The runtime interface: start a container's process tree and watch it exit.

A :class:`Runtime` turns a :class:`ContainerLaunch` into a :class:`RunningContainer`.
Runtimes differ in what they can enforce, which they state in :class:`Capabilities`.
This package imports only the standard library (and ``strato.exceptions``).
"""

from __future__ import annotations

import asyncio
import signal as _signal
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from strato.runtime.cgroups import CgroupManager
    from strato.runtime.forking import Forking

# Plain words for the signals that mean "the program crashed".
_CRASH_SIGNALS: dict[int, str] = {
    _signal.SIGSEGV: "segmentation fault",
    _signal.SIGBUS: "bus error",
    _signal.SIGFPE: "floating-point exception",
    _signal.SIGILL: "illegal instruction",
    _signal.SIGABRT: "aborted",
    _signal.SIGTRAP: "trace trap",
    _signal.SIGSYS: "bad system call",
}


@dataclass(frozen=True)
class Capabilities:
    """What a runtime can enforce on the processes it starts."""

    isolation: bool
    """Own filesystem and PID/mount/IPC/UTS namespaces."""
    network_control: bool
    """Can honour ``block_network``."""
    cgroups: bool
    """Enforces ``cpu``, ``memory_mb`` and ``pids_max`` and detects out-of-memory kills."""
    gpu: bool
    """Can hand a container only the GPUs assigned to it."""
    snapshot: bool
    """Can snapshot a container's memory after its ``@enter(snap=True)`` hooks (a template
    that containers are forked from, checkpointed with CRIU where usable)."""


@dataclass(frozen=True)
class Bind:
    """A host path made visible inside the container at ``dst``."""

    src: str
    """Absolute host path (file, directory or Unix socket)."""
    dst: str
    """Absolute path inside the container, created if missing; without an image (a read-only
    host root) it must exist on the host or lie under ``/tmp`` or ``/run``."""
    readonly: bool = True


CHANNEL_PATH = "/run/strato/channel.sock"
"""Where isolating runtimes place ``ContainerLaunch.channel_socket`` inside the container."""
CHANNEL_ENV = "STRATO_CHANNEL"


@dataclass
class ContainerLaunch:
    """Everything a runtime needs to start one container."""

    container_id: str
    argv: list[str]
    env: dict[str, str]
    """The complete environment of the process (nothing is inherited)."""
    cwd: str
    """Working directory of the ``process`` runtime (a host path). Isolating runtimes use
    ``workdir``; with no ``workdir`` and no image they use ``cwd`` where it is visible."""
    cpu: float | None = None
    """CPU limit in cores."""
    memory_mb: int | None = None
    """Hard memory limit in MiB (no swap beyond it)."""
    pids_max: int | None = None
    """Most processes and threads the container may hold at once."""
    cpu_request: float | None = None
    """CPU reserved in cores: the cgroup's weight (``cpu.shares`` 1024 per core on v1,
    ``cpu.weight`` 100 per core on v2, never below the default; see
    :func:`~strato.runtime.cgroups.cpu_weight`), so a busy neighbour cannot starve it; the
    limit is ``cpu``."""
    disk_mb: int | None = None
    """Size of each writable folder in MiB (the writable layer over an image, ``/tmp``,
    ``/root``, ``/home``, ``/run``, ``/dev/shm``): past it writes fail with ``ENOSPC``.
    They are in memory (tmpfs), counted against ``memory_mb``. ``None``: unlimited."""
    cidr_allowlist: list[str] | None = None
    """The only address ranges the container may reach (besides DNS); ``None``: any."""
    gpu_indices: list[int] = field(default_factory=list)
    block_network: bool = False
    rootfs_layers: list[str] = field(default_factory=list)
    """The image: host directories stacked read-only, bottom first, under a writable layer
    of the container's own. Empty: no image (the host root, read-only, where isolated)."""
    binds: list[Bind] = field(default_factory=list)
    channel_socket: str | None = None
    """A host Unix socket the container must reach even with ``block_network``. The runtime
    makes it reachable and sets ``$STRATO_CHANNEL`` to ``unix:<path inside>``."""
    hostname: str | None = None
    """Hostname inside the container (default: the container id); isolating runtimes only."""
    workdir: str | None = None
    """Working directory inside the container; isolating runtimes only."""


@dataclass(frozen=True)
class ExitStatus:
    """How a container's main process ended."""

    exit_code: int | None
    """``None`` when the process was killed by a signal."""
    signal: int | None
    oom_killed: bool
    memory_mb: int | None = None
    """The memory limit it ran under, for the message of an out-of-memory kill."""

    @property
    def description(self) -> str:
        """A sentence fragment for logs and errors, e.g. ``"exited with code 3"``."""
        if self.oom_killed:
            limit = f" (limit {self.memory_mb} MiB)" if self.memory_mb is not None else ""
            return f"ran out of memory{limit} and was killed"
        if self.signal is not None:
            name = signal_name(self.signal)
            meaning = _CRASH_SIGNALS.get(self.signal)
            return f"killed by signal {name}" + (f" ({meaning})" if meaning else "")
        return f"exited with code {self.exit_code}"

    @classmethod
    def from_returncode(
        cls, returncode: int, *, oom_killed: bool = False, memory_mb: int | None = None
    ) -> ExitStatus:
        """Build from a ``subprocess`` return code (negative = killed by that signal)."""
        if returncode < 0:
            return cls(None, -returncode, oom_killed, memory_mb)
        return cls(returncode, None, oom_killed, memory_mb)


def signal_name(sig: int) -> str:
    """``"SIGKILL"`` for 9; ``"signal 99"`` for a number with no name."""
    try:
        return _signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


class RunningContainer(ABC):
    """A started container. ``wait()`` must be safe to call repeatedly and concurrently.

    Read ``stdout``/``stderr`` concurrently with ``wait()``: they reach EOF only when every
    process holding the pipes has exited, and ``wait()`` is what kills leftovers. Always
    ``wait()`` (or ``stop()``) a container, or its cgroup is not removed.
    """

    container_id: str
    pid: int
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader

    @abstractmethod
    async def wait(self) -> ExitStatus:
        """Wait for the main process to exit, detect an OOM kill, then clean up."""

    @abstractmethod
    def signal(self, sig: int) -> None:
        """Send ``sig`` to the container's processes; no error if they are gone."""

    def writable_layer(self) -> Path | None:
        """The host folder of what the container wrote over its image (an overlayfs upper
        directory, whiteouts included), or None where the host has none to read (no
        image; a container forked from a zygote keeps it in its own mount namespace)."""
        return None

    async def stop(self, grace_s: float) -> ExitStatus:
        """Send SIGTERM, then SIGKILL if still running after ``grace_s`` seconds."""
        self.signal(_signal.SIGTERM)
        try:
            return await asyncio.wait_for(asyncio.shield(self.wait()), timeout=max(grace_s, 0))
        except TimeoutError:
            self.signal(_signal.SIGKILL)
            return await self.wait()


class Runtime(ABC):
    """Starts containers. One instance serves a whole worker agent."""

    name: str
    capabilities: Capabilities
    cgroups: CgroupManager | None = None
    """Where its containers' cgroups are made (``None``: no limits here)."""
    gpus_present: bool = False
    """This machine has GPUs: a container given none sees an empty ``CUDA_VISIBLE_DEVICES``."""
    forking: Forking | None = None
    """How containers are forked from zygotes under this runtime; ``None``: never (they
    always start normally)."""

    @abstractmethod
    async def start(self, launch: ContainerLaunch) -> RunningContainer:
        """Start the container's main process; returns once it is running."""

    @abstractmethod
    def describe(self) -> str:
        """One line for logs: the runtime and what it enforces here."""

    def environment(self, launch: ContainerLaunch) -> dict[str, str]:
        """The complete environment of the launch's process: its own, with
        ``$STRATO_CHANNEL`` where this runtime places the channel socket and
        ``CUDA_VISIBLE_DEVICES`` as the runtime sets it (an isolating runtime never passes
        the launch's own on)."""
        env = dict(launch.env)
        if self.capabilities.isolation:
            env.pop("CUDA_VISIBLE_DEVICES", None)
        if launch.channel_socket is not None:
            inside = CHANNEL_PATH if self.capabilities.isolation else launch.channel_socket
            env[CHANNEL_ENV] = f"unix:{inside}"
        if launch.gpu_indices:
            env["CUDA_VISIBLE_DEVICES"] = self.cuda_devices(launch.gpu_indices)
        elif self.gpus_present:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def cuda_devices(self, indices: list[int]) -> str:
        """``CUDA_VISIBLE_DEVICES`` for a container given the GPUs ``indices``."""
        return ",".join(str(i) for i in indices)

    def hide(self, path: str) -> None:  # noqa: B027 - most show containers no host folder
        """Keep the host directory ``path`` out of sight of containers (where they may see
        host directories at all)."""
