"""What a runtime does for cold starts by fork: start a *zygote* (a long-lived Python that a
worker forks containers from) and say how each forked container is sandboxed.

A runtime that can fork sets ``Runtime.forking`` to a :class:`Forking`; the worker's
cold-start code (:mod:`strato.worker.coldstart`) speaks to it only through this interface,
and to the zygote through :mod:`strato.protocol.zygote`. ``None`` (``gvisor``): its
containers always start normally.

- :class:`PlainForking` (the ``process`` runtime): the zygote is a plain subprocess in a
  cgroup of its own; a forked container gets its cgroup and its environment, nothing else.
- :class:`strato.runtime.bwrap_fork.SandboxForking` (``bwrap``): the zygote runs in a
  sandbox like a container's, and each forked container makes its own namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from strato.runtime.base import ContainerLaunch

if TYPE_CHECKING:
    from strato.runtime.base import Runtime
    from strato.runtime.cgroups import ContainerCgroup
    from strato.runtime.supervise import SupervisedRuntime


class ForkUnavailable(Exception):
    """This container (or zygote) cannot be forked (started) here; the message says why.
    Its container starts normally instead."""


@dataclass
class ForkSandbox:
    """How one forked container is set up (what the zygote's monitor does for it)."""

    env: dict[str, str]
    """Its complete environment."""
    workdir: str
    hostname: str
    isolate: bool = False
    """Namespaces and mounts of its own; else only its cgroup and environment."""
    block_network: bool = False
    netns: bool = False
    egress: bool = False
    """The worker attaches egress (:meth:`Forking.attach_egress`) when its monitor has made
    the network namespace."""
    user: tuple[int, int] | None = None
    """The unprivileged (uid, gid) it runs as, the same on the host (:meth:`Forking.
    map_ids` maps them); ``None``: root of its own user namespace, with ``caps``."""
    caps: list[str] = field(default_factory=list)
    seccomp: bytes | None = None
    binds: list[tuple[str, str]] = field(default_factory=list)
    """(source as the zygote sees it, destination inside)."""
    layers: list[str] = field(default_factory=list)
    """An image's layers as the zygote sees them, top first: a root of its own."""
    owned: list[str] = field(default_factory=list)
    spec_path: str | None = None
    disk_mb: int | None = None
    """Size of each of its writable folders (tmpfs) in MiB; ``None``: unlimited."""


@dataclass(eq=False)
class Helper:
    """A zygote's process as a runtime started it, and what it holds besides."""

    proc: asyncio.subprocess.Process
    cgroup: ContainerCgroup | None = None
    holds: list[Callable[[], object]] = field(default_factory=list)
    """What :meth:`release` frees (blocking), last first: its network stack, its root."""
    tree_root: Callable[[int], int] = lambda pid: pid

    def checkpoint_root(self) -> int:
        """The process whose tree is the zygote (what CRIU checkpoints)."""
        return self.tree_root(self.proc.pid)

    def release(self) -> None:
        """Free what it held (blocking; after it exited or was killed)."""
        holds, self.holds = self.holds, []
        cgroup, self.cgroup = self.cgroup, None
        if cgroup is not None:
            cgroup.kill_all()
            cgroup.remove()
        for free in reversed(holds):
            with contextlib.suppress(Exception):
                free()


class Namespaces(ABC):
    """Namespaces made ahead for a forked container, which its monitor joins."""

    egress: Any
    """Its network stack, which lives on with the container (``close()`` to free it)."""

    @property
    @abstractmethod
    def fds(self) -> list[int]:
        """The namespaces' file descriptors, sent with the fork request."""

    @abstractmethod
    def close_fds(self) -> None:
        """This side's descriptors (sent: the monitor has its own)."""

    @abstractmethod
    def end_holder(self) -> None:
        """The monitor joined them: what held them goes (blocking)."""

    @abstractmethod
    def discard(self) -> None:
        """Unused, or its container failed: all of it goes (blocking)."""


class Forking(ABC):
    """A runtime's part of forking containers from zygotes."""

    isolates: bool = False
    """A forked container gets a sandbox of its own, made from the zygote's view: the
    binds it needs must be visible to the zygote (the worker says where)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def unforkable(self, launch: ContainerLaunch) -> str | None:
        """Why ``launch`` cannot be forked under this runtime now (``None``: it can).
        Blocking, cheap: called at every start, in a thread."""
        return None

    @abstractmethod
    async def start_helper(
        self, launch: ContainerLaunch, control_fd: int, *, network: bool = False
    ) -> Helper:
        """Start a zygote as ``launch`` says, inheriting ``control_fd``; ``network``: give
        it egress (a template's snap hooks may download). Raises :class:`ForkUnavailable`
        or ``OSError`` having freed what it set up."""

    @abstractmethod
    def sandbox(self, launch: ContainerLaunch, binds: list[tuple[str, str]]) -> ForkSandbox:
        """How the container of ``launch`` is forked; ``binds``: its binds as the zygote
        sees their sources. Raises :class:`ForkUnavailable`."""

    def cgroup(self, launch: ContainerLaunch) -> ContainerCgroup | None:
        """A new cgroup for a forked container (its limits, + its monitor), or ``None``."""
        manager = self.runtime.cgroups
        if manager is None:
            return None
        pids = None if launch.pids_max is None else launch.pids_max + 1
        return manager.create(
            launch.container_id, launch.cpu, launch.memory_mb, pids, launch.cpu_request
        )

    def prewarm(self) -> None:  # noqa: B027 - most runtimes make nothing ahead
        """Start making what forks will need ahead (in the event loop; never blocks)."""

    def namespaces_ahead(self, sandbox: ForkSandbox) -> Namespaces | None:
        """Namespaces made ahead that suit ``sandbox`` (in the event loop), or ``None``."""
        return None

    def map_ids(self, pid: int, user: tuple[int, int]) -> None:
        """Map ``user`` in the user namespace of ``pid`` (its monitor). Raises OSError."""
        raise OSError("this runtime maps no ids")

    def attach_egress(self, pid: int) -> Any:
        """Give the network namespace of ``pid`` egress; returns what to ``close()``."""
        raise OSError("this runtime gives forked containers no network of their own")

    async def close(self) -> None:  # noqa: B027
        """Free what :meth:`prewarm` made."""


class PlainForking(Forking):
    """The ``process`` runtime's: no sandbox, as its containers have none."""

    runtime: SupervisedRuntime[Any]

    async def start_helper(
        self, launch: ContainerLaunch, control_fd: int, *, network: bool = False
    ) -> Helper:
        from strato.runtime.supervise import Launching

        st = Launching(launch, list(launch.argv), self.runtime.environment(launch), launch.cwd)
        st.pass_fds.append(control_fd)
        return await self.runtime.launch_helper(st)

    def sandbox(self, launch: ContainerLaunch, binds: list[tuple[str, str]]) -> ForkSandbox:
        hostname = (launch.hostname or launch.container_id)[:63]
        return ForkSandbox(self.runtime.environment(launch), launch.cwd, hostname)


def closing(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
