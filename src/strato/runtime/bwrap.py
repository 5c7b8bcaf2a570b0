"""The ``bwrap`` runtime: each container in its own namespaces with bubblewrap.

A container gets new PID, mount, IPC, UTS and (where possible) cgroup namespaces, a new
network namespace with only loopback when ``block_network`` is set, a private ``/tmp``, its
own ``/proc`` and a minimal ``/dev``. Its root is

- with an image (``rootfs_layers``): the layers as one overlayfs with a writable layer of its
  own on top (:mod:`strato.runtime.rootfs`; bubblewrap 0.8 cannot build overlays itself, so
  the runtime mounts it, as root, and removes it when the container has exited);
- without: the host's root, read-only, with a private ``/run`` (where the channel socket's
  mount point is made) and the runtime's own state directory hidden. Binds need a mount
  point that exists on the host, or one under ``/tmp`` or ``/run``.

The main process is ``sh`` (joining the cgroup) ``exec``ing ``bwrap``, which stays outside
the namespaces as a monitor; in the new PID namespace bwrap's init is pid 1 and the
program pid 2. When the program exits, the monitor exits with its code and everything left
in the namespace is killed (the kernel ends a PID namespace with its init). bwrap reports
death by signal N as code 128+N, read back as that signal. The environment reaches the
program through bwrap's own (not ``--setenv``, which would show secrets in ``ps``); bwrap
adds ``PWD``.

Capabilities: the program runs as root with Docker's default capability set (no
``CAP_SYS_ADMIN``, ``CAP_NET_ADMIN``, ``CAP_SYS_PTRACE``...) and ``no_new_privs``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal as _signal
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from strato.exceptions import InvalidError
from strato.runtime.base import CHANNEL_PATH, Bind, Capabilities, ContainerLaunch, Runtime
from strato.runtime.cgroups import CgroupManager, ContainerCgroup
from strato.runtime.devices import cuda_visible_devices, gpu_device_nodes
from strato.runtime.isolation import (
    DEFAULT_CAPS,
    check_launch,
    container_environment,
    host_workdir,
    interpreter_binds,
)
from strato.runtime.rootfs import (
    ContainerDir,
    check_host_view_binds,
    default_state_dir,
    find_executable,
)
from strato.runtime.supervise import (
    SupervisedContainer,
    cgroup_join_argv,
    describe_limits,
    node_has_gpus,
    open_cgroups,
    resolve_executable,
    spawn,
)

log = logging.getLogger("strato.runtime")

HELPERS = 2
"""bwrap's monitor and init share the container's cgroup: its pids limit is raised by 2."""


@cache
def _resolv_conf_args() -> tuple[str, ...]:
    """``/etc/resolv.conf`` may point into ``/run`` (systemd-resolved), which a container gets
    empty: bind the file it points to, so that DNS keeps working."""
    resolv = os.path.realpath("/etc/resolv.conf")
    return ("--ro-bind-try", resolv, resolv) if resolv.startswith("/run/") else ()


def bind_args(binds: Iterable[Bind]) -> list[str]:
    args: list[str] = []
    for b in binds:
        args += ["--ro-bind" if b.readonly else "--bind", b.src, b.dst]
    return args


def build_args(
    launch: ContainerLaunch,
    *,
    rootfs: str | None,
    workdir: str,
    gpu_nodes: list[str],
    hidden: Iterable[str] = (),
) -> list[str]:
    """The bwrap command line (without the program) for ``launch``.

    ``rootfs``: the mounted image, or ``None`` for the host root read-only. ``hidden``: host
    directories covered by an empty tmpfs (host root only).
    """
    args = [
        "--die-with-parent",
        "--new-session",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
    ]
    if launch.block_network:
        args.append("--unshare-net")
    args += ["--hostname", launch.hostname or launch.container_id[:63]]
    if rootfs is not None:
        args += ["--bind", rootfs, "/", "--ro-bind", "/sys", "/sys"]
    else:
        args += ["--ro-bind", "/", "/"]
        for path in hidden:
            if os.path.isdir(path):
                args += ["--tmpfs", path]
        args += ["--tmpfs", "/run", *_resolv_conf_args()]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for node in gpu_nodes:
        args += ["--dev-bind", node, node]
    args += bind_args(launch.binds)
    if launch.channel_socket is not None:
        args += ["--bind", launch.channel_socket, CHANNEL_PATH]
    if rootfs is not None and workdir != "/":
        args += ["--dir", workdir]
    args += ["--chdir", workdir, "--cap-drop", "ALL"]
    for cap in DEFAULT_CAPS:
        args += ["--cap-add", cap]
    return args


def _descendants(ppid: int) -> list[int]:
    """Live children of ``ppid`` (by scanning ``/proc``: no ``/proc/<pid>/task/*/children``
    on every kernel)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid:
            found.append(int(entry))
    return found


def _ns_pid(pid: int) -> int:
    """``pid`` as its own PID namespace numbers it (last ``NSpid`` field)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return 0


class BwrapContainer(SupervisedContainer):
    wraps_exit_status = True

    def __init__(
        self,
        container_id: str,
        proc: asyncio.subprocess.Process,
        cgroup: ContainerCgroup | None,
        memory_mb: int | None,
        container_dir: ContainerDir | None,
    ) -> None:
        super().__init__(container_id, proc, cgroup, memory_mb)
        self.container_dir = container_dir
        self._program_pid: int | None = None

    def program_pid(self) -> int | None:
        """Host pid of the program (pid 2 of the container's PID namespace), once started."""
        if self._program_pid is None and self.running:
            inits = _descendants(self.pid)
            programs = [p for init in inits for p in _descendants(init)]
            if programs:
                self._program_pid = min(programs, key=_ns_pid)
        return self._program_pid

    def signal(self, sig: int) -> None:
        if sig == _signal.SIGKILL:
            if self.running:
                _kill(self.pid, sig)  # the monitor: its death ends the PID namespace
            self._kill_cgroup()
            return
        if not self.running:
            return
        program = self.program_pid()
        if program is None:  # not started yet: stopping the monitor stops everything
            _kill(self.pid, sig)
            return
        try:
            os.killpg(program, sig)  # the program leads its own session and group
        except (ProcessLookupError, PermissionError):
            _kill(program, sig)

    def _release(self) -> None:
        if self.container_dir is not None:
            self.container_dir.remove()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class BwrapRuntime(Runtime):
    """Runs each container in its own namespaces with bubblewrap."""

    name = "bwrap"

    def __init__(
        self,
        *,
        use_cgroups: bool = True,
        cgroup_parent: str = "strato",
        gpus_present: bool | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        hidden_paths: Iterable[str] = (),
        bwrap: str | None = None,
    ) -> None:
        found = bwrap or shutil.which("bwrap")
        if found is None:
            raise InvalidError(
                "The 'bwrap' runtime needs bubblewrap: install it (apt-get install bubblewrap) "
                "or choose another runtime with $STRATO_RUNTIME."
            )
        self.bwrap = found
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.hidden_paths = [str(self.state_dir), *hidden_paths]
        """Host directories a container without an image must not see (empty there)."""
        self.cgroups: CgroupManager | None
        self.cgroups, self.cgroup_reason = open_cgroups(use_cgroups, cgroup_parent)
        self.gpus_present = node_has_gpus() if gpus_present is None else gpus_present
        self.capabilities = Capabilities(
            isolation=True,
            network_control=True,
            cgroups=self.cgroups is not None,
            gpu=True,
            snapshot=False,
        )

    def describe(self) -> str:
        limits = describe_limits(self.cgroups, self.cgroup_reason)
        return f"bwrap ({self.bwrap}; namespaces, overlay images; {limits})"

    def _environment(self, launch: ContainerLaunch) -> dict[str, str]:
        env = container_environment(launch)
        if launch.gpu_indices:
            env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices(launch.gpu_indices)
        elif self.gpus_present:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    async def start(self, launch: ContainerLaunch) -> BwrapContainer:
        check_launch(launch)
        env = self._environment(launch)
        gpu_nodes = gpu_device_nodes(launch.gpu_indices)
        container_dir: ContainerDir | None = None
        rootfs: str | None = None
        if launch.rootfs_layers:
            workdir = launch.workdir or "/"
            container_dir = ContainerDir.create(self.state_dir, launch.container_id)
        else:
            extra = interpreter_binds(launch, self.hidden_paths)
            launch = dataclasses.replace(launch, binds=[*extra, *launch.binds])
            workdir = host_workdir(launch, self.hidden_paths)
            check_host_view_binds(launch.binds)
            resolve_executable(launch.argv[0], env, workdir)
        cgroup = None
        try:
            if container_dir is not None:
                rootfs = str(container_dir.mount(launch.rootfs_layers))
                find_executable(rootfs, launch.argv[0], env, workdir)
            if self.cgroups is not None:
                pids_max = None if launch.pids_max is None else launch.pids_max + HELPERS
                cgroup = self.cgroups.create(
                    launch.container_id, launch.cpu, launch.memory_mb, pids_max
                )
            args = build_args(
                launch,
                rootfs=rootfs,
                workdir=workdir,
                gpu_nodes=gpu_nodes,
                hidden=self.hidden_paths,
            )
            argv = cgroup_join_argv(cgroup, [self.bwrap, *args, "--", *launch.argv])
            proc = await spawn(argv, env, "/")
        except BaseException:
            if cgroup is not None:
                cgroup.remove(timeout_s=0.5)
            if container_dir is not None:
                container_dir.remove()
            raise
        memory_mb = launch.memory_mb if cgroup is not None else None
        return BwrapContainer(launch.container_id, proc, cgroup, memory_mb, container_dir)
