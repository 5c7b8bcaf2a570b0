"""Forking containers under ``bwrap``: the zygote's sandbox and each forked container's.

A zygote runs in a sandbox like a container's (a container's minimal root or its image, a
network namespace of its own: with egress for a template, whose snap hooks may download;
but root with no capability and no seccomp filter, as it makes namespaces) that also sees
an empty read-only proc and, for an image, the image's layers (under :data:`LAYERS`). Each
forked container makes its own user, mount, PID, IPC, UTS and cgroup namespaces (the
zygote's side: :mod:`strato.container.zygote`), with an image a root of its own (the
layers under a writable layer in memory), gets the runtime's seccomp filter and a network
namespace of its own (egress attached by the worker through :meth:`SandboxForking.
attach_egress`, or only a loopback for ``block_network``), and runs as the runtime's
unprivileged user (the same uid and gid on the host: :meth:`SandboxForking.map_ids`) with no
capability left. So that a start does not wait for slirp4netns (4-10 ms),
``$STRATO_ZYGOTE_NETNS_AHEAD`` (default 2) user and network namespaces are kept made ahead,
ids mapped and egress attached, that a forked container joins (the zygote, root, owns them:
no capability of the host's is needed); when none is ready it makes its own.

A forked container's PID namespace may mount its own proc only where a proc at least as
restrictive is fully visible in its mount namespace: the zygote binds an empty, read-only
proc (of a PID namespace with no process left) mounted in the runtime's state directory.
That mount is checked by its path at every start, not by the mount table: a bind of the
state directory onto itself (another runtime's host view does that) hides it while the
table still lists it, and forks then failed with ``mount proc: Operation not permitted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strato import settings
from strato.runtime.base import CHANNEL_PATH, Bind, ContainerLaunch
from strato.runtime.forking import Forking, ForkSandbox, ForkUnavailable, Helper, Namespaces
from strato.runtime.isolation import (
    DEFAULT_CAPS,
    host_workdir,
    interpreter_binds,
    let_container_reach,
)
from strato.runtime.supervise import Launching

if TYPE_CHECKING:
    from strato.runtime.bwrap import BwrapRuntime

log = logging.getLogger("strato.runtime")

IN_ZYGOTE = "/run/strato"
LAYERS = IN_ZYGOTE + "/layers"
"""Where an image's zygote sees the image's layers (the lower layers of each child)."""
PROC_SOURCE = IN_ZYGOTE + "/.proc"  # = strato.container.zygote_isolation.PROC_SOURCE
ZYGOTE_CAPS: tuple[str, ...] = ()
"""What a zygote or template keeps of root's capabilities: none. It runs user code (a
template's ``@enter(snap=True)`` hooks, an image's imports) as uid 0 of the host, so
Docker's default set would let that code make device nodes (``CAP_MKNOD``: the host's
disks), read any file bound in (``CAP_DAC_OVERRIDE``) or craft raw packets. Its children
need none of it either: each makes a user namespace of its own (no capability needed),
where it holds every capability over its own mounts, then becomes the container's user."""
_EMPTY_PROC_LOCK = threading.Lock()


class SandboxForking(Forking):
    isolates = True
    runtime: BwrapRuntime

    def __init__(self, runtime: BwrapRuntime) -> None:
        super().__init__(runtime)
        self._empty_proc: dict[str, int] = {}  # its path -> its device, when seen
        self._ahead = NamespacePool(settings.ZYGOTE_NETNS_AHEAD.get())

    @property
    def empty_proc(self) -> Path:
        return Path(self.runtime.state_dir) / "emptyproc"

    def _user(self) -> tuple[int, int] | None:
        """The container's user where the worker is root (which the mapping needs), else
        ``None``: root of its own user namespace, as the runtime's containers then."""
        return self.runtime.user if os.geteuid() == 0 else None

    # ------------------------------------------------------------------ checks

    def unforkable(self, launch: ContainerLaunch) -> str | None:
        if launch.cidr_allowlist is not None:
            return "a container with a cidr_allowlist starts normally"
        return self.check_empty_proc()

    def check_empty_proc(self) -> str | None:
        """The empty proc a zygote binds (the proof a forked container's PID namespace may
        mount its own proc): checked by its path at each start (a stat), mounted again when
        something hid it (e.g. the state directory bound onto itself by another runtime)."""
        path = self.empty_proc
        known = self._empty_proc.get(str(path))
        if known is not None:
            with contextlib.suppress(OSError):
                if os.stat(path).st_dev == known:
                    return None
        with _EMPTY_PROC_LOCK:  # checks run in threads: mount one, not one each
            why = ensure_empty_proc(path)
        if why is None:
            with contextlib.suppress(OSError):
                self._empty_proc[str(path)] = os.stat(path).st_dev
        return why

    # ------------------------------------------------------------------ zygotes

    async def start_helper(
        self, launch: ContainerLaunch, control_fd: int, *, network: bool = False
    ) -> Helper:
        rt = self.runtime
        st = Launching(launch, [], rt.environment(launch), "/")
        st.pass_fds.append(control_fd)
        net: tuple[int, int] | None = None  # (info r, block w): this side's
        if network:
            # a network namespace of its own (bwrap's): egress, attached before its snap
            # hooks run (they may download what they load)
            info, block = os.pipe(), os.pipe()
            net = (info[0], block[1])
            st.own_fds += [info[1], block[0]]
        try:
            helper = await rt.launch_helper(st, self._helper_command(launch, st, net))
        except BaseException:
            _close(net)
            raise
        helper.tree_root = _pid_namespace_init
        if net is not None:
            egress = await self._attach_network(launch.container_id, *net)
            if egress is not None:
                helper.holds.append(egress.close)
        return helper

    async def _helper_command(
        self, launch: ContainerLaunch, st: Launching, net: tuple[int, int] | None
    ) -> None:
        """bwrap's command line for a zygote: a container's sandbox (its image mounted with a
        writable layer of its own), plus the empty proc and, for an image, its layers."""
        from strato.runtime.bwrap import build_args
        from strato.runtime.rootfs import ContainerDir

        rt = self.runtime
        why = await asyncio.to_thread(self.check_empty_proc)  # (prewarm: not checked)
        if why is not None:
            raise ForkUnavailable(why)
        binds = [*launch.binds, Bind(str(self.empty_proc), PROC_SOURCE)]
        rootfs = None
        if launch.rootfs_layers:
            binds += [Bind(layer, f"{LAYERS}/{i}") for i, layer in enumerate(launch.rootfs_layers)]
            container_dir = ContainerDir.create(Path(rt.state_dir), launch.container_id)
            st.hold(container_dir.remove)
            rootfs = str(await asyncio.to_thread(container_dir.mount, launch.rootfs_layers))
            workdir = launch.workdir or "/"
        else:
            binds[:0] = interpreter_binds(launch, rt.hidden_paths)
            workdir = host_workdir(launch, rt.hidden_paths)
        info_w, block_r = (st.own_fds[-2], st.own_fds[-1]) if net is not None else (None, None)
        args = build_args(
            dataclasses.replace(launch, binds=binds),
            rootfs=rootfs,
            workdir=workdir,
            gpu_nodes=[],
            hidden=rt.hidden_paths,
            caps=ZYGOTE_CAPS,
            info_fd=info_w,
            block_fd=block_r,
        )
        st.argv = [rt.bwrap, *args, "--", *launch.argv]

    async def _attach_network(self, name: str, info_r: int, block_w: int) -> Any:
        """Give a template's network namespace (bwrap's) egress once bwrap made it, then let
        it go on (bwrap waits for a byte on ``block_w``). If that fails, it goes on without
        network, and the worker's log says why."""
        from strato.runtime.network import attach_egress

        try:
            pid = await asyncio.to_thread(read_child_pid, info_r)
            if pid is not None and await asyncio.to_thread(wait_loopback, pid):
                return await asyncio.to_thread(attach_egress, pid)
        except Exception as e:  # noqa: BLE001 - it runs on, without network
            log.warning("%s: no network: %s", name, e)
        finally:
            os.close(info_r)
            with contextlib.suppress(OSError):
                os.write(block_w, b"1")
            os.close(block_w)
        return None

    # ------------------------------------------------------------------ forks

    def sandbox(self, launch: ContainerLaunch, binds: list[tuple[str, str]]) -> ForkSandbox:
        from strato.runtime import seccomp
        from strato.runtime.bwrap import owned_dirs

        rt = self.runtime
        env = rt.environment(launch)
        try:
            bpf = seccomp.filter_bpf()
        except seccomp.SeccompUnavailable as e:
            raise ForkUnavailable(f"no seccomp filter: {e}") from None
        user = self._user()
        if user is not None and launch.channel_socket is not None:
            let_container_reach(launch.channel_socket)
        # a network namespace of its own: only a loopback with block_network, else egress
        # through a user-mode stack the worker attaches (runtime/network.py)
        egress = not launch.block_network
        if egress:
            from strato.runtime.network import egress_unavailable_reason

            if (why := egress_unavailable_reason()) is not None:
                raise ForkUnavailable(why)
        made = ForkSandbox(
            env,
            workdir="/",
            hostname=(launch.hostname or launch.container_id)[:63],
            isolate=True,
            block_network=launch.block_network,
            netns=True,
            egress=egress,
            user=user,
            caps=list(DEFAULT_CAPS),
            seccomp=bpf,
            binds=list(binds),
            spec_path=settings.CONTAINER_SPEC.get(env) or None,
            disk_mb=launch.disk_mb,
        )
        if launch.channel_socket is not None:
            made.binds.append((CHANNEL_PATH, CHANNEL_PATH))
        if launch.rootfs_layers:  # a root of its own: the image's layers, top first
            made.layers = [f"{LAYERS}/{i}" for i in reversed(range(len(launch.rootfs_layers)))]
            made.workdir = launch.workdir or "/"
            made.owned = owned_dirs(launch, made.workdir)
        else:
            made.workdir = host_workdir(launch, rt.hidden_paths)
            # the interpreter, when it lives under /tmp or /run: the zygote has it bound
            made.binds += [(b.src, b.dst) for b in interpreter_binds(launch, rt.hidden_paths)]
            resolv = os.path.realpath("/etc/resolv.conf")
            if resolv.startswith("/run/") and os.path.exists(resolv):
                made.binds.append((resolv, resolv))
        return made

    def prewarm(self) -> None:
        user = self._user()
        if user is not None:
            self._ahead.fill(user)

    def namespaces_ahead(self, sandbox: ForkSandbox) -> Namespaces | None:
        if sandbox.egress and sandbox.user is not None:
            return self._ahead.take(sandbox.user)
        return None

    def map_ids(self, pid: int, user: tuple[int, int]) -> None:
        """Map, as root outside, root (the set-up) and the container's user (the same ids on
        the host) in the user namespace ``pid`` made."""
        map_ids(pid, user)

    def attach_egress(self, pid: int) -> Any:
        from strato.runtime.network import NetworkUnavailable, attach_egress

        try:
            return attach_egress(pid)
        except NetworkUnavailable as e:
            raise OSError(str(e)) from None

    async def close(self) -> None:
        await self._ahead.close()


# ----------------------------------------------------------------------------- made ahead


def map_ids(pid: int, user: tuple[int, int]) -> None:
    uid, gid = user
    for name, own in (("uid_map", uid), ("gid_map", gid)):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 0 1\n{own} {own} 1\n")


@dataclasses.dataclass(eq=False)
class _Premade(Namespaces):
    """A user namespace (root and the container's user mapped to themselves on the host)
    with a network namespace of its own, egress attached, held by a small process until a
    forked container joins them (their file descriptors keep them alive meanwhile)."""

    holder: subprocess.Popen
    userns: int
    netns: int
    egress: Any
    user: tuple[int, int]

    @property
    def fds(self) -> list[int]:
        return [self.userns, self.netns]

    def close_fds(self) -> None:
        for fd in (self.userns, self.netns):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.userns = self.netns = -1

    def end_holder(self) -> None:
        if self.holder.stdin is not None and not self.holder.stdin.closed:
            self.holder.stdin.close()
        try:
            self.holder.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.holder.kill()
            self.holder.wait()

    def discard(self) -> None:
        self.close_fds()
        if self.egress is not None:
            self.egress.close()
        self.end_holder()


def _premake(user: tuple[int, int]) -> _Premade:
    """Make a :class:`_Premade` (blocking: a few ms, mostly slirp4netns starting)."""
    from strato.runtime.network import attach_egress

    unshare = shutil.which("unshare")
    if unshare is None:
        raise OSError("util-linux's unshare is missing")
    holder = subprocess.Popen(
        [unshare, "--user", "--net", "--", "cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    made = _Premade(holder, -1, -1, None, user)
    try:
        mine = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 10.0
        while True:  # until it is in its namespaces (unshare, then exec)
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{holder.pid}/ns/user") != mine:
                    break
            if holder.poll() is not None or time.monotonic() > deadline:
                raise OSError("could not make a user and network namespace")
            time.sleep(0.0005)
        map_ids(holder.pid, user)
        made.userns = os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        made.netns = os.open(f"/proc/{holder.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        made.egress = attach_egress(holder.pid)
    except BaseException:
        made.discard()
        raise
    return made


class NamespacePool:
    """A few :class:`_Premade` kept ready, so that a forked container's start does not wait
    for its network stack (slirp4netns takes 4-10 ms to start); refilled in the
    background after each one taken. Empty: the container makes its own namespaces."""

    def __init__(self, size: int) -> None:
        self.size = max(0, size)
        self.ready: list[_Premade] = []
        self._filling: asyncio.Future[None] | None = None
        self._broken: str | None = None
        self._closed = False

    def take(self, user: tuple[int, int]) -> _Premade | None:
        found = next((p for p in self.ready if p.user == user), None)
        if found is not None:
            self.ready.remove(found)
        self.fill(user)
        return found

    def fill(self, user: tuple[int, int]) -> None:
        if self.size and not self._closed and self._broken is None:
            if self._filling is None or self._filling.done():
                self._filling = asyncio.ensure_future(self._fill(user))

    async def _fill(self, user: tuple[int, int]) -> None:
        while not self._closed and sum(p.user == user for p in self.ready) < self.size:
            try:
                made = await asyncio.to_thread(_premake, user)
            except Exception as e:  # noqa: BLE001 - containers make their own, as before
                self._broken = str(e)
                log.warning("network namespaces are not made ahead: %s", e)
                return
            if self._closed:
                await asyncio.to_thread(made.discard)
                return
            self.ready.append(made)

    async def close(self) -> None:
        self._closed = True
        if self._filling is not None:  # it discards what it is making
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._filling), 15.0)
        ready, self.ready = self.ready, []
        for p in ready:
            await asyncio.to_thread(p.discard)


# ----------------------------------------------------------------------------- helpers


def _close(fds: tuple[int, ...] | None) -> None:
    for fd in fds or ():
        with contextlib.suppress(OSError):
            os.close(fd)


def _pid_namespace_init(pid: int) -> int:
    """The process to checkpoint: the init of the zygote's PID namespace (the child of
    bwrap's monitor, which is ``pid``)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return int(kids[0]) if kids else pid


def read_child_pid(fd: int) -> int | None:
    """The ``child-pid`` bwrap writes on its ``--info-fd`` (``None`` if it exits first)."""
    import json

    data = b""
    while b"}" not in data:
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
    try:
        return int(json.loads(data[: data.index(b"}") + 1])["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


def wait_loopback(pid: int, timeout_s: float = 2.0) -> bool:
    """Wait until bwrap has brought ``lo`` up in the network namespace of ``pid`` (before it
    waits on ``--block-fd``): configuring ``tap0`` meanwhile makes its netlink requests fail
    now and then. False if the sandbox is gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/net/fib_trie", "rb") as f:
                if b"127.0.0.1" in f.read():
                    return True
        except OSError:
            return False
        time.sleep(0.0005)
    return True  # attach anyway: the worst is a template without network, said in the log


def ensure_empty_proc(path: Path) -> str | None:
    """Mount a read-only proc of a PID namespace with no process left at ``path`` unless
    one is there (as this process resolves the path: a bind mounted over a parent directory
    since, e.g. of the state directory onto itself, hides it); ``None`` when it is there,
    else why not."""
    if proc_root_at(path):
        return None
    unshare, mount = shutil.which("unshare"), shutil.which("mount")
    if unshare is None or mount is None:
        return "util-linux's unshare and mount are needed"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create {path}: {e.strerror}"
    opts = "ro,nosuid,nodev,noexec"
    argv = [unshare, "--pid", "--fork", mount, "-t", "proc", "-o", opts, "proc", str(path)]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10.0, check=False)
        lines = (p.stderr or p.stdout or "").strip().splitlines()
        out = lines[-1] if lines else f"exit code {p.returncode}"
        ok = p.returncode == 0
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, out = False, str(e)
    if not proc_root_at(path):
        return f"cannot mount an empty proc at {path}: {out if not ok else 'not visible'}"
    return None


def proc_root_at(path: Path) -> bool:
    """Whether ``path`` leads (now, from this process) to the root of a proc mount. The
    mount table's mount point strings are not enough: a mount that a later bind covers is
    still listed there, but the path leads to what covers it."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) > 4 and fields[2] == dev and fields[3] == "/":
                    return right.startswith("proc ")
    except OSError:
        pass
    return False
