"""The ``gvisor`` runtime: each container in its own gVisor sandbox (``runsc``).

The container's system calls are served by gVisor's user-space kernel (the sentry), not
the host's. Per container the runtime writes an OCI bundle, ``<dir>/config.json``, with its
root filesystem mounted at ``<dir>/rootfs``:

- with an image: the layers as one overlayfs with a writable layer of its own
  (:mod:`strato.runtime.rootfs`), its home and working directory the container user's;
- without: a minimal root (:func:`strato.runtime.isolation.minimal_root`): a small tmpfs
  with the links and mount points, and the system folders, the interpreter's folders and
  a prepared ``/etc`` bound read-only, fresh ``/tmp``, ``/root``, ``/home`` and ``/run``.
  The read-only folders are bound on the host, inside that tmpfs (recursively read-only,
  private), so gVisor serves them with the root through one gofer mount
  (:func:`served_with_root`; each OCI bind mount is a gofer mount of its own, a few ms of
  the sandbox's start); those the sentry would cover with a folder of its own (an
  interpreter under a fresh ``/root``) stay OCI bind mounts. runsc creates mount points
  inside the root it is given, never in the host's own directories.

A start makes the bundle and (with network) takes the network namespace at once, each in
a thread; what either made is freed if the other fails or the start is cancelled.

It runs ``runsc --rootless=false --ignore-cgroups --network=none|host --host-uds=open run``
in the container's cgroup (joined by ``sh`` as in every runtime), so the memory, CPU and
PID limits hold the whole sandbox: the sentry, the gofer and ``runsc`` itself. The sentry
is what the kernel kills when the container runs out of memory (read back as an OOM kill).
Processes inside a sandbox are not host processes: ``pids_max`` is enforced inside by
``RLIMIT_NPROC``, which gVisor applies to every process of the sandbox; the host cgroup's
PID limit is ``pids_max`` + :data:`SANDBOX_PIDS` for gVisor's own threads, a backstop.

**User and system calls.** The process runs as ``$STRATO_CONTAINER_UID``:``$STRATO_CONTAINER_GID``
(65534 by default) with no capabilities and ``no_new_privs``. Its system calls are served by
gVisor's sentry (which runs under runsc's own seccomp filter), never by the host kernel, so
no filter of strato's applies inside: what the sentry allows (``unshare``, ``ptrace`` of its
own processes...) stays within the sandbox.

Network: ``block_network`` -> ``--network=none`` and a network namespace (loopback only,
served by gVisor's netstack). Otherwise ``--network=host`` with ``runsc`` started
(``nsenter --net=``) in a namespace of the container's own, taken from
:func:`strato.runtime.network.default_pool` with slirp4netns attached: "host" is that
namespace, so the sandbox has egress only (no host loopback, no other container). (gVisor's
own netstack, ``--network=sandbox``, would be the better choice, but this runsc, 2022-12,
takes every namespace for the root one on a recent kernel and refuses to start.) runsc's
``kill`` and ``delete`` run in that namespace too: its control socket is an abstract one.
The channel socket is bound into the sandbox at ``/run/strato/channel.sock``;
``--host-uds=open`` lets the sentry connect to it (and to any other host Unix socket bound
inside: the minimal root binds none). Signals go through ``runsc kill --all``; SIGKILL kills
``runsc run`` itself, which takes the sandbox with it. runsc reports death by signal N as
code 128+N.

Disk: with ``disk_mb`` the writable layer over an image is a host tmpfs of that size (as
under bwrap: the gofer gets ``ENOSPC`` past it), and gVisor's own tmpfs folders (``/tmp``,
``/dev/shm``, ``/run`` and a minimal root's ``/root`` and ``/home``) get ``size=``.

Platform: ``$STRATO_GVISOR_PLATFORM``, else ``ptrace``. (``kvm`` hangs at start on a VM
without usable nested virtualisation, so it is not tried by default; this runsc has no
``systrap``.) GPUs are refused: this runsc has no GPU proxy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import resource
import signal as _signal
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from strato import settings
from strato.exceptions import InvalidError
from strato.runtime.base import CHANNEL_PATH, Bind, ContainerLaunch
from strato.runtime.isolation import (
    DEFAULT_CAPS,
    IsolatingRuntime,
    bound_program,
    find_tool,
    minimal_root,
    minimal_workdir,
    sanitized_etc,
)
from strato.runtime.network import Egress
from strato.runtime.rootfs import ContainerDir, RootEntryLike, find_executable
from strato.runtime.supervise import Launching, SupervisedContainer, resolve_executable

log = logging.getLogger("strato.runtime")

DEFAULT_PLATFORM = "ptrace"
SANDBOX_PIDS = 512
"""Host threads gVisor needs besides the container's processes (sentry, gofer, runsc)."""
_KILL_TIMEOUT_S = 10.0


def _tmpfs(destination: str, options: list[str]) -> dict[str, Any]:
    return {"destination": destination, "type": "tmpfs", "source": "tmpfs", "options": options}


def build_spec(
    launch: ContainerLaunch,
    *,
    env: dict[str, str],
    workdir: str,
    readonly_root: bool,
    hidden: Iterable[str] = (),
    user: tuple[int, int] = (0, 0),
    fresh: Iterable[str] = (),
) -> dict[str, Any]:
    """The OCI ``config.json`` of ``launch`` (root filesystem at ``<bundle>/rootfs``).

    ``user``: the uid and gid of the process (not root: no capabilities). ``fresh``:
    folders that get an empty tmpfs anyone may write (``/root``, ``/home`` of a minimal
    root)."""
    nofile_soft, nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    rlimits = [{"type": "RLIMIT_NOFILE", "soft": nofile_soft, "hard": nofile_hard}]
    if launch.pids_max is not None:
        rlimits.append({"type": "RLIMIT_NPROC", "soft": launch.pids_max, "hard": launch.pids_max})
    caps = list(DEFAULT_CAPS) if user[0] == 0 else []
    size = [f"size={launch.disk_mb}m"] if launch.disk_mb is not None else []  # each fresh one
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
    ]
    mounts += [_tmpfs(d, ["mode=1777", *size]) for d in dict.fromkeys(("/tmp", "/dev/shm", *fresh))]
    if readonly_root:
        mounts.append({"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": size})
        mounts += [{"destination": p, "type": "tmpfs", "source": "tmpfs"} for p in hidden]
    for b in launch.binds:
        options = ["rbind", "ro" if b.readonly else "rw"]
        mounts.append({"destination": b.dst, "type": "bind", "source": b.src, "options": options})
    if launch.channel_socket is not None:
        mounts.append(
            {"destination": CHANNEL_PATH, "type": "bind", "source": launch.channel_socket}
        )
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if launch.block_network:
        namespaces.append({"type": "network"})
    return {
        "ociVersion": "1.0.0",
        "process": {
            "terminal": False,
            "user": {"uid": user[0], "gid": user[1]},
            "args": list(launch.argv),
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": workdir,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": rlimits,
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": readonly_root},
        "hostname": launch.hostname or launch.container_id[:63],
        "mounts": mounts,
        "linux": {"namespaces": namespaces},
    }


SENTRY_OWN = ("/proc", "/dev", "/sys", "/tmp", "/run")
"""Where the sentry mounts folders of its own over the root (see :func:`build_spec`)."""


def _under(path: str, dirs: Iterable[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def served_with_root(root: Iterable[RootEntryLike], fresh: Iterable[str]) -> list[str]:
    """The read-only folders of a minimal root that are bound on the host, inside the
    root's tmpfs, rather than as OCI bind mounts: gVisor then serves them with the root
    (one gofer mount; each OCI bind is a gofer mount of its own, about 5 ms of the
    sandbox's start here), read-only all the same (the root is, and so is each host
    bind). Left as OCI binds: those the sentry would hide under a folder of its own
    (``/tmp``, ``/run``, a fresh ``/root``...: an interpreter under ``/root/.pyenv``)
    and those inside another one bound here."""
    own = [*SENTRY_OWN, *fresh]
    served: list[str] = []
    for e in sorted(root, key=lambda e: e.dst):
        if e.kind == "ro" and not _under(e.dst, own) and not _under(e.dst, served):
            served.append(e.dst)
    return served


def _hold_when_made(st: Launching, fut: asyncio.Future[Any], free: str) -> None:
    """Hold what ``fut`` makes in ``st`` (``free``: the name of its method that frees it,
    a blocking one) so that a failed start frees it; if it is still being made (the start
    was cancelled meanwhile), free it once it is made, in a thread."""
    if fut.done():
        if not fut.cancelled() and fut.exception() is None:
            st.hold(getattr(fut.result(), free))
        return

    def release(made: object) -> None:
        try:
            getattr(made, free)()
        except Exception:  # noqa: BLE001 - nothing waits for it
            log.exception("freeing what a cancelled start made failed")

    def when_made(f: asyncio.Future[Any]) -> None:
        if not f.cancelled() and f.exception() is None:
            threading.Thread(target=release, args=(f.result(),), daemon=True).start()

    fut.add_done_callback(when_made)


class GvisorContainer(SupervisedContainer):
    wraps_exit_status = True

    def __init__(self, st: Launching, runtime: GvisorRuntime) -> None:
        super().__init__(st)
        self._runtime = runtime
        self.container_dir: ContainerDir = st.container_dir
        self.egress: Egress | None = st.egress
        """The container's network namespace with egress (none with ``block_network``)."""

    def writable_layer(self) -> Path | None:
        return self.container_dir.writable_layer()

    def signal(self, sig: int) -> None:
        if sig == _signal.SIGKILL:
            if self.running:
                try:
                    os.kill(self.pid, sig)  # runsc run: the sandbox dies with it
                except ProcessLookupError:
                    pass
            self._kill_cgroup()
        elif self.running:
            netns = self.egress.path if self.egress is not None else None
            self._runtime.runsc_background(
                "kill", "--all", self.container_id, str(int(sig)), netns=netns
            )

    def _release(self) -> None:
        gone = self.cgroup is not None and not self.cgroup.pids()
        netns = self.egress.path if self.egress is not None else None
        self._runtime.delete_state(self.container_id, sandbox_gone=gone, netns=netns)
        self.container_dir.remove()
        if self.egress is not None:
            self.egress.close()


class GvisorRuntime(IsolatingRuntime[GvisorContainer]):
    """Runs each container in its own gVisor sandbox."""

    name = "gvisor"
    pids_extra = SANDBOX_PIDS

    def __init__(
        self,
        *,
        use_cgroups: bool = True,
        cgroup_parent: str = "strato",
        state_dir: str | os.PathLike[str] | None = None,
        hidden_paths: Iterable[str] = (),
        platform: str | None = None,
        runsc: str | None = None,
    ) -> None:
        found = find_tool(
            runsc,
            "runsc",
            "The 'gvisor' runtime needs runsc: install gVisor (apt-get install runsc) or "
            "choose another runtime with $STRATO_RUNTIME.",
        )
        if os.geteuid() != 0:
            raise InvalidError(
                "The 'gvisor' runtime runs sandboxes as root: start the worker as root."
            )
        self.runsc = found
        self.platform = platform or settings.GVISOR_PLATFORM.get() or DEFAULT_PLATFORM
        cgroups = (use_cgroups, cgroup_parent)
        super().__init__(*cgroups, state_dir, hidden_paths, gpu=False, snapshot=False)
        self.runsc_root = self.state_dir / "runsc"
        self._background: list[subprocess.Popen[bytes]] = []

    def describe(self) -> str:
        return f"gvisor ({self.runsc}, platform {self.platform}; {self.describe_limits()})"

    # ------------------------------------------------------------------ runsc

    def _runsc(self, *args: str, network: str = "none") -> list[str]:
        return [
            self.runsc,
            "--rootless=false",
            f"--root={self.runsc_root}",
            f"--platform={self.platform}",
            f"--network={network}",
            "--host-uds=open",
            "--ignore-cgroups",
            *args,
        ]

    def runsc_background(self, *args: str, netns: str | None = None) -> None:
        """Run a quick runsc command without waiting for it (it is reaped later). ``netns``:
        the sandbox's network namespace, where its control socket (an abstract one) is."""
        self._background = [p for p in self._background if p.poll() is None]
        argv = self._runsc(*args)
        if netns is not None:
            argv = [self.nsenter, f"--net={netns}", "--", *argv]
        self._background.append(
            subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def _state_files(self, container_id: str) -> list[Path]:
        return list(self.runsc_root.glob(f"{container_id}_sandbox:{container_id}.*"))

    def delete_state(
        self, container_id: str, sandbox_gone: bool = False, netns: str | None = None
    ) -> None:
        """Remove what runsc keeps of a container it did not clean up (``runsc run`` killed).

        ``sandbox_gone``: every process of the sandbox is known to have exited (its cgroup
        is empty), so the state files are simply deleted; ``runsc delete --force`` would
        take two seconds to find that out."""
        files = self._state_files(container_id)
        if not files:
            return
        if sandbox_gone:
            for f in files:
                f.unlink(missing_ok=True)
            return
        argv = self._runsc("delete", "--force", container_id)
        if netns is not None:
            argv = [self.nsenter, f"--net={netns}", "--", *argv]
        try:
            subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=_KILL_TIMEOUT_S,
                check=True,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            log.warning("runsc delete %s failed: %s", container_id, exc)

    # ------------------------------------------------------------------ start

    def check(self, launch: ContainerLaunch) -> None:
        super().check(launch)
        if launch.gpu_indices:
            raise InvalidError(
                "The 'gvisor' runtime cannot give a container GPUs; use the 'bwrap' runtime."
            )

    def _bundle(self, launch: ContainerLaunch, env: dict[str, str]) -> ContainerDir:
        """Mount the root filesystem and write the bundle (blocking: run in a thread)."""
        self.delete_state(launch.container_id)  # left by a worker that died, if any
        container_dir = ContainerDir.create(self.state_dir, launch.container_id)
        try:
            fresh: list[str] = []
            if launch.rootfs_layers:
                workdir = launch.workdir or "/"
                owned = [d for d in (env.get("HOME") or "/root", workdir) if d != "/"]
                rootfs = container_dir.mount(launch.rootfs_layers, owned, self.user, launch.disk_mb)
                (rootfs / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
                if not bound_program(launch):
                    find_executable(str(rootfs), launch.argv[0], env, workdir)
            else:
                root = minimal_root(launch.argv[0], sanitized_etc(self.state_dir))
                fresh = [e.dst for e in root if e.kind == "tmpfs"]
                served = served_with_root(root, fresh)
                rootfs = container_dir.mount_minimal_root(root, bind=served)
                extra = [Bind(e.src, e.dst) for e in root if e.kind == "ro" and e.dst not in served]
                launch = dataclasses.replace(launch, binds=[*extra, *launch.binds])
                workdir = minimal_workdir(launch, root)
                if not bound_program(launch):
                    resolve_executable(launch.argv[0], env, workdir)  # the host's, bound in
            spec = build_spec(
                launch,
                env=env,
                workdir=workdir,
                readonly_root=not launch.rootfs_layers,
                user=self.user,
                fresh=fresh,
            )
            config = container_dir.path / "config.json"
            fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(spec, f)
        except BaseException:
            container_dir.remove()
            raise
        return container_dir

    async def prepare(self, launch: ContainerLaunch, st: Launching) -> None:
        self.runsc_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # the network namespace and the bundle do not depend on each other: both are
        # made at once (each in a thread), and whatever of them was made is freed if the
        # start fails, even when it is cancelled meanwhile
        egress = None
        if not launch.block_network:
            egress = asyncio.ensure_future(asyncio.to_thread(self.take_egress, launch))
        bundle = asyncio.ensure_future(asyncio.to_thread(self._bundle, launch, st.env))
        made: list[tuple[asyncio.Future[Any], str]] = [(bundle, "remove")]
        if egress is not None:
            made.insert(0, (egress, "close"))  # (freed last, as it was made first before)
        try:
            await asyncio.wait([f for f, _ in made])
        finally:
            for fut, free in made:
                _hold_when_made(st, fut, free)
        if egress is not None:
            st.egress = egress.result()  # (its error first, as when it was made first)
        st.container_dir = bundle.result()
        network = "none" if launch.block_network else "host"
        argv = self._runsc(
            "run", f"--bundle={st.container_dir.path}", launch.container_id, network=network
        )
        # "host": the namespace of its own, with egress only
        st.argv = self.in_egress_netns(st.egress, argv)
        st.env, st.cwd = {"PATH": os.defpath}, "/"

    def wrap(self, st: Launching) -> GvisorContainer:
        return GvisorContainer(st, self)
