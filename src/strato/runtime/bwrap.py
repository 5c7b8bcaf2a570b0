"""The ``bwrap`` runtime: each container in its own namespaces with bubblewrap.

A container gets new PID, mount, IPC, UTS, network and (where possible) cgroup namespaces,
a private ``/tmp`` and ``/dev/shm``, its own ``/proc`` and a minimal ``/dev``. Its root is

- with an image (``rootfs_layers``): the layers as one overlayfs with a writable layer of its
  own on top (:mod:`strato.runtime.rootfs`; bubblewrap 0.8 cannot build overlays itself, so
  the runtime mounts it, as root, and removes it when the container has exited); its home
  and working directory are made in the writable layer for the container's user;
- without: a minimal root (:func:`strato.runtime.isolation.minimal_root`): ``/usr`` and the
  ``/bin``, ``/lib*`` links, the interpreter's own folders, a prepared copy of the few
  ``/etc`` files a program needs (no secrets), fresh ``/tmp``, ``/root``, ``/home`` and
  ``/run``, the launch's binds; read-only but for those. Nothing else of the host.

**User.** bwrap sets the sandbox up as root, then runs util-linux's ``setpriv``, which drops
to ``$STRATO_CONTAINER_UID``:``$STRATO_CONTAINER_GID`` (65534:65534 by default: the same
uid inside and on the host), no supplementary groups, no capabilities (bounding set
emptied) before it ``exec``s the program. In an image the host's ``setpriv`` runs with its
own libraries and loader, bound at ``/run/strato/priv``. The channel socket is made
connectable by that user (its folder on the host stays private).

**Seccomp.** Every container gets :mod:`strato.runtime.seccomp`'s filter (Docker's default
profile as a deny-list: keyrings, ``bpf``, ``ptrace``, mounts, new namespaces, modules,
``kexec``, clock setting, ``userfaultfd``... fail with ``EPERM``) through ``--seccomp``,
with ``no_new_privs``.

**Network.** Always a namespace of its own: with ``block_network`` a new one holding only
``lo``; otherwise one taken from :func:`strato.runtime.network.default_pool`, made ahead
with slirp4netns attached (egress only: no host loopback, no other container), which bwrap
is started in (``nsenter --net=``) and shares.

**Disk.** With ``disk_mb`` each writable folder is a tmpfs of that size: the image's
writable layer (the container's directory is mounted as one before the overlay), ``/tmp``,
``/dev/shm`` and, without an image, ``/root``, ``/home`` and ``/run`` (bwrap's ``--size``).
A write past it fails with ``ENOSPC``; the host's disk is never written; the pages count
against the container's memory cgroup.

The main process is ``sh`` (joining the cgroup) ``exec``ing (``nsenter``, then) ``bwrap``,
which stays outside the namespaces as a monitor; in the new PID namespace bwrap's init is
pid 1 and the program pid 2. When the program exits, the monitor exits with its code and
everything left in the namespace is killed (the kernel ends a PID namespace with its init).
bwrap reports death by signal N as code 128+N, read back as that signal. The environment
reaches the program through bwrap's own (not ``--setenv``, which would show secrets in
``ps``); bwrap adds ``PWD``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal as _signal
import subprocess
from collections.abc import Iterable
from pathlib import Path

from strato.exceptions import InvalidError
from strato.runtime.base import CHANNEL_PATH, Bind, ContainerLaunch
from strato.runtime.devices import cuda_visible_devices, gpu_device_nodes
from strato.runtime.isolation import (
    DEFAULT_CAPS,
    OWN_DIRS,
    IsolatingRuntime,
    RootEntry,
    bound_program,
    find_tool,
    minimal_root,
    minimal_workdir,
    sanitized_etc,
)
from strato.runtime.network import Egress, egress_unavailable_reason
from strato.runtime.rootfs import ContainerDir, default_state_dir, find_executable
from strato.runtime.seccomp import filter_bpf, filter_fd
from strato.runtime.supervise import (
    Launching,
    SupervisedContainer,
    node_has_gpus,
    resolve_executable,
)

log = logging.getLogger("strato.runtime")

HELPERS = 2
"""bwrap's monitor and init share the container's cgroup: its pids limit is raised by 2."""


def bind_args(binds: Iterable[Bind]) -> list[str]:
    args: list[str] = []
    for b in binds:
        args += ["--ro-bind" if b.readonly else "--bind", b.src, b.dst]
    return args


SETPRIV = "/usr/bin/setpriv"
PRIV_INSIDE = "/run/strato/priv"
"""Where the host's ``setpriv``, its libraries and dynamic loader are bound into an image
(which may have no ``setpriv``, or another C library)."""


def setpriv_bundle(state_dir: Path) -> tuple[str, list[str]]:
    """Copy the host's ``setpriv`` with the libraries and loader it needs (from ``ldd``) to
    ``<state dir>/priv``; returns that folder and the command that runs it from
    :data:`PRIV_INSIDE` whatever the image holds."""
    out = state_dir / "priv"
    found = subprocess.run(["ldd", SETPRIV], capture_output=True, text=True, check=True).stdout
    libs: dict[str, str] = {}
    loader = None
    for line in found.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs[parts[0]] = parts[2]
        elif parts and parts[0].startswith("/"):
            loader = parts[0]
    if loader is None:
        raise InvalidError(f"cannot find the dynamic loader of {SETPRIV} (ldd: {found!r})")
    tmp = state_dir / f".priv-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o755)
    for name, src in [("setpriv", SETPRIV), ("ld.so", loader), *libs.items()]:
        shutil.copyfile(os.path.realpath(src), tmp / name)
        os.chmod(tmp / name, 0o755)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    inside = PRIV_INSIDE
    return str(out), [f"{inside}/ld.so", "--library-path", inside, f"{inside}/setpriv"]


def user_argv(user: tuple[int, int], setpriv: list[str] | None = None) -> list[str]:
    """The prefix that runs a program as ``user`` (uid, gid) with no capability left:
    util-linux's ``setpriv`` (``setpriv``: how to run it; default the host's, for a root
    that has the host's ``/usr``), exec'd by bwrap (as root in the sandbox, after it has
    set it up) and exec'ing the program in turn under the same pid."""
    uid, gid = user
    return [
        *(setpriv or [SETPRIV]),
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]


def tmpfs_args(dst: str, disk_mb: int | None, perms: str = "01777") -> list[str]:
    """A fresh tmpfs at ``dst`` (of ``disk_mb`` MiB at most where given)."""
    size = ["--size", str(disk_mb << 20)] if disk_mb is not None else []
    return ["--perms", perms, *size, "--tmpfs", dst]


def root_args(entries: Iterable[RootEntry], disk_mb: int | None = None) -> list[str]:
    """bwrap arguments that build a :func:`~strato.runtime.isolation.minimal_root` (its
    fresh folders of ``disk_mb`` MiB each where given)."""
    args: list[str] = []
    for e in entries:
        if e.kind == "symlink":
            args += ["--symlink", e.src, e.dst]
        elif e.kind == "tmpfs":
            args += tmpfs_args(e.dst, disk_mb)
        else:
            args += ["--ro-bind", e.src, e.dst]
    return args


_MOUNTS = {"--ro-bind", "--bind", "--dev-bind", "--tmpfs", "--symlink", "--proc", "--dev"}


def _with_parents(args: list[str]) -> list[str]:
    """``args`` with ``--perms 0755 --dir P`` before each mount for each parent folder P that
    nothing mounted yet (bwrap would make those 0700: unreadable to the container's user)."""
    out: list[str] = []
    mounted: list[str] = []  # binds: their folders are theirs (tmpfs ones are bwrap's)
    made: set[str] = set()
    i = 0
    while i < len(args):
        a = args[i]
        width = 3 if a in ("--ro-bind", "--bind", "--dev-bind", "--symlink") else 2
        if a in _MOUNTS:
            dst = os.path.normpath(args[i + width - 1])
            parents = []
            p = os.path.dirname(dst)
            while p != "/":
                parents.append(p)
                p = os.path.dirname(p)
            for p in reversed(parents):
                if p in made or any(p == m or p.startswith(m + "/") for m in mounted):
                    continue  # made already, or inside a bind (its own folders)
                out += ["--perms", "0755", "--dir", p]
                made.add(p)
            if a not in ("--tmpfs", "--symlink"):
                mounted.append(dst)
            out += args[i : i + width]
            i += width
            continue
        out.append(a)
        i += 1
    return out


def build_args(
    launch: ContainerLaunch,
    *,
    rootfs: str | None,
    workdir: str,
    gpu_nodes: list[str],
    hidden: Iterable[str] = (),
    root: Iterable[RootEntry] | None = None,
    seccomp_fd: int | None = None,
    info_fd: int | None = None,
    block_fd: int | None = None,
    share_net: bool = False,
    caps: Iterable[str] = DEFAULT_CAPS,
) -> list[str]:
    """The bwrap command line (without the program) for ``launch``.

    ``rootfs``: the mounted image, or ``None`` for a minimal root: ``root``'s entries (by
    default :func:`~strato.runtime.isolation.minimal_root` of the launch's program), then
    ``/run``, ``/proc``, ``/dev`` and the binds, then made read-only but for its tmpfs
    folders (``/tmp``, ``/root``, ``/home``, ``/run``). ``hidden`` is unused (kept for
    callers of the earlier host view). The program starts as root with Docker's default
    capabilities: put :func:`user_argv` before it to run it unprivileged.
    ``seccomp_fd``: the filter (a file descriptor passed to bwrap). ``info_fd`` and
    ``block_fd``: bwrap reports the sandbox's pid on the first and waits for a byte on the
    second before it runs the program (for a caller that attaches the network in
    between). ``share_net``: stay in bwrap's network namespace (the runtime starts bwrap in
    one made for the container, with egress); else a new one with only ``lo``.
    """
    args = [
        "--die-with-parent",
        "--new-session",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
    ]
    if not share_net:
        args.append("--unshare-net")
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    if info_fd is not None:
        args += ["--info-fd", str(info_fd)]
    if block_fd is not None:
        args += ["--block-fd", str(block_fd)]
    args += ["--hostname", launch.hostname or launch.container_id[:63]]
    disk = launch.disk_mb
    if rootfs is not None:
        args += ["--bind", rootfs, "/", "--ro-bind", "/sys", "/sys"]
        args += ["--proc", "/proc", "--dev", "/dev", *tmpfs_args("/tmp", disk)]
        mounts = bind_args(launch.binds)
        if launch.channel_socket is not None:
            mounts += ["--bind", launch.channel_socket, CHANNEL_PATH]
        args += _with_parents(mounts)
    else:
        if root is None:
            root = minimal_root(launch.argv[0], sanitized_etc(default_state_dir()))
        mounts = root_args(root, disk)
        mounts += [*tmpfs_args("/run", disk, "0755"), "--proc", "/proc", "--dev", "/dev"]
        mounts += bind_args(launch.binds)
        if launch.channel_socket is not None:
            mounts += ["--bind", launch.channel_socket, CHANNEL_PATH]
        args += _with_parents(mounts)
    args += tmpfs_args("/dev/shm", disk)
    for node in gpu_nodes:
        args += ["--dev-bind", node, node]
    if workdir != "/":
        args += ["--dir", workdir]
    if rootfs is None:
        args += ["--remount-ro", "/"]
    args += ["--chdir", workdir, "--cap-drop", "ALL"]
    for cap in caps:
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

    def __init__(self, st: Launching) -> None:
        super().__init__(st)
        self.container_dir: ContainerDir | None = st.container_dir
        self.egress: Egress | None = st.egress
        """The container's user-mode network stack (none with ``block_network``)."""
        self._program_pid: int | None = None

    def writable_layer(self) -> Path | None:
        return self.container_dir.writable_layer() if self.container_dir else None

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
        if self.egress is not None:
            self.egress.close()
        if self.container_dir is not None:
            self.container_dir.remove()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class BwrapRuntime(IsolatingRuntime[BwrapContainer]):
    """Runs each container in its own namespaces with bubblewrap."""

    name = "bwrap"
    container_class = BwrapContainer
    pids_extra = HELPERS

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
        found = find_tool(
            bwrap,
            "bwrap",
            "The 'bwrap' runtime needs bubblewrap: install it (apt-get install bubblewrap) "
            "or choose another runtime with $STRATO_RUNTIME.",
        )
        if not os.access(SETPRIV, os.X_OK):
            raise InvalidError(
                f"The 'bwrap' runtime needs {SETPRIV} (util-linux) to run containers "
                "unprivileged: install util-linux."
            )
        self.bwrap = found
        cgroups = (use_cgroups, cgroup_parent)
        super().__init__(*cgroups, state_dir, hidden_paths, gpu=True, snapshot=True)
        self.gpus_present = node_has_gpus() if gpus_present is None else gpus_present
        self.priv_dir, self.priv_argv = setpriv_bundle(self.state_dir)
        filter_bpf()  # compiled once, here rather than in the first container's start
        why = egress_unavailable_reason()
        if why is not None:
            log.warning("bwrap runtime: %s", why)
        from strato.runtime.bwrap_fork import SandboxForking

        self.forking = SandboxForking(self)

    def describe(self) -> str:
        uid, gid = self.user
        return (
            f"bwrap ({self.bwrap}; namespaces, uid {uid}:{gid}, seccomp, egress-only "
            f"network, overlay images; {self.describe_limits()})"
        )

    def cuda_devices(self, indices: list[int]) -> str:
        return cuda_visible_devices(indices)

    async def prepare(self, launch: ContainerLaunch, st: Launching) -> None:
        gpu_nodes = gpu_device_nodes(launch.gpu_indices)
        rootfs: str | None = None
        root: list[RootEntry] | None = None
        if launch.rootfs_layers:
            workdir = launch.workdir or "/"
            st.container_dir = ContainerDir.create(self.state_dir, launch.container_id)
            st.hold(st.container_dir.remove)
            owned = owned_dirs(launch, workdir)
            mounted = await asyncio.to_thread(
                st.container_dir.mount, launch.rootfs_layers, owned, self.user, launch.disk_mb
            )
            rootfs = str(mounted)
            if not bound_program(launch):
                find_executable(rootfs, launch.argv[0], st.env, workdir)
        else:
            root = minimal_root(launch.argv[0], sanitized_etc(self.state_dir))
            workdir = minimal_workdir(launch, root)
            if not bound_program(launch):
                resolve_executable(launch.argv[0], st.env, workdir)
        seccomp_fd = filter_fd()
        st.own_fds.append(seccomp_fd)
        if not launch.block_network:
            st.egress = await asyncio.to_thread(self.take_egress, launch)
            st.hold(st.egress.close)
        args = build_args(
            launch,
            rootfs=rootfs,
            workdir=workdir,
            gpu_nodes=gpu_nodes,
            root=root,
            seccomp_fd=seccomp_fd,
            share_net=st.egress is not None,
        )
        if rootfs is not None:
            args += ["--ro-bind", self.priv_dir, PRIV_INSIDE]
            drop = user_argv(self.user, self.priv_argv)
        else:
            drop = user_argv(self.user)
        # bwrap starts in the container's network namespace, where it has one with egress
        program = [self.bwrap, *args, "--", *drop, *launch.argv]
        st.argv, st.cwd = self.in_egress_netns(st.egress, program), "/"


def owned_dirs(launch: ContainerLaunch, workdir: str) -> list[str]:
    """Folders of an image its container's user gets to write: its home and workdir (not
    those a container has of its own anyway)."""
    dirs = [launch.env.get("HOME") or "/root"]
    if workdir != "/":
        dirs.append(workdir)
    return [d for d in dirs if os.path.isabs(d) and d != "/" and not _under_own(d)]


def _under_own(path: str) -> bool:
    return any(path == d or path.startswith(d + "/") for d in OWN_DIRS)
