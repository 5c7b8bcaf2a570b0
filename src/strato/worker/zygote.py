"""Cold starts on the worker: zygotes, memory-snapshot templates, and CRIU.

A *zygote* is a process that has imported strato's container runtime, its SDK (what app
modules import) and the declared imports (``$STRATO_PREIMPORT`` of the worker, and of an
image: ``Image.env({"STRATO_PREIMPORT": "torch,numpy"})``; comma-separated module names),
kept warm: one per (runtime, Python, channel) for containers without an image, started
with the worker; one per (image, app code) for an image's containers, because it runs the
image's files and so may see only the code its containers see. A container is then forked
from it instead of starting a new interpreter. A *template* is the same for one function with
``enable_memory_snapshot=True``: it also imported the function's code and ran its
``@enter(snap=True)`` hooks, so containers forked from it skip both. Templates are keyed by
the hash of the runtime, the Python, the image, the code's mount id and the whole function
spec, so new code or a new image makes a new template; an idle one is dropped after
``$STRATO_SNAPSHOT_TTL`` seconds (default 900), and at most ``$STRATO_SNAPSHOT_MAX``
(default 8) idle ones are kept.

The fork itself and the sandbox each container gets are in :mod:`strato.container.zygote`.
Under ``bwrap`` a zygote runs in a sandbox like a container's (a container's minimal root
or its image, a network namespace of its own: with egress for a template, whose snap hooks
may download; but root with Docker's default capabilities and no seccomp filter, as it
makes namespaces) that also sees the node's materialised code mounts (read-only) and an
empty read-only proc; each forked container
makes its own user, mount, PID, IPC, UTS and cgroup namespaces and is moved into its own
cgroup before any of its code runs; with an image, it gets a root of its own (the image's
layers under a writable layer in memory). Like a container bwrap starts, it gets the
runtime's seccomp filter (loaded last, before strato's entrypoint) and a network namespace
of its own: egress through the user-mode stack of :mod:`strato.runtime.network`, attached
by the worker while the container's mounts are made, or only a loopback for
``block_network``. It runs as the runtime's unprivileged user (the same uid and gid on the
host: the worker, root, maps them in its user namespace) with no capability left. So that
a start does not wait for slirp4netns (4-10 ms), the worker keeps
``$STRATO_ZYGOTE_NETNS_AHEAD`` (default 2) user and network namespaces made ahead, ids
mapped and egress attached, that a forked container joins (the zygote, root, owns them:
no capability of the host's is needed); when none is ready it makes its own. Under
``process`` a forked container gets its cgroup and nothing else,
as that runtime's containers do. Not forked (they start normally): the ``gvisor`` runtime,
containers with GPUs, and whatever fails along the way. A fork whose set-up fails turns
forking off for ``BROKEN_RETRY_S`` for that runtime and image only (:meth:`ZygotePool.
fallback_key`), never for the worker; why is said once in the worker's log and once per
function in the app's logs. ``$STRATO_ZYGOTE=0`` turns forking off.

A forked container's PID namespace may mount its own proc only where a proc at least as
restrictive is fully visible in its mount namespace: the zygote binds an empty, read-only
proc (of a PID namespace with no process left) that the worker mounts in the runtime's
state directory. That mount is checked by its path at every start, not by the mount table:
a bind of the state directory onto itself (another runtime's host view does that) hides it
while the table still lists it, and forks then failed with ``mount proc: Operation not
permitted`` (images: their zygote sees no other proc).

Memory snapshots use CRIU where ``criu check`` passes (checked once per worker): the
template is checkpointed to disk after its snap hooks (``criu dump --leave-running``,
before it forked anything and without any socket to the control plane) and restored with
``criu restore`` when the template is gone (evicted, or the worker restarted), so the hooks
do not run again. Where CRIU is unusable the in-memory template alone serves, and the
function's logs say why, once.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import secrets
import shutil
import signal as _signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from strato.protocol import frames
from strato.protocol import messages as m
from strato.runtime.base import CHANNEL_PATH, Bind, ContainerLaunch, ExitStatus, RunningContainer
from strato.runtime.base import Runtime as _Runtime
from strato.runtime.cgroups import ContainerCgroup
from strato.runtime.supervise import STREAM_LIMIT, cgroup_join_argv

from .launch import IN_CONTAINER, MOUNTS, STRATO_SRC

log = logging.getLogger("strato.worker")

ZYGOTE_MODULE = "strato.container.zygote"
STRATO_PACKAGE = Path(__file__).resolve().parent.parent  # strato's own, bound in
HOSTMOUNTS = IN_CONTAINER + "/hostmounts"  # the node's code mounts, in a zygote (never a child)
LAYERS = IN_CONTAINER + "/layers"  # an image's layers, in its zygote: lower layers of each child
PROC_SOURCE = IN_CONTAINER + "/.proc"  # = strato.container.zygote.PROC_SOURCE
READY_TIMEOUT_S = 300.0
ZYGOTE_CAPS: tuple[str, ...] = ()
"""What a zygote or template keeps of root's capabilities under bwrap: none. It runs user
code (a template's ``@enter(snap=True)`` hooks, an image's imports) as uid 0 of the host, so
Docker's default set would let that code make device nodes (``CAP_MKNOD``: the host's
disks), read any file bound in (``CAP_DAC_OVERRIDE``) or craft raw packets. Its children
need none of it either: each makes a user namespace of its own (no capability needed), where
it holds every capability over its own mounts, then becomes the container's user."""
FORK_TIMEOUT_S = 10.0
SWEEP_EVERY_S = 30.0
BROKEN_RETRY_S = 300.0  # after a fork's set-up failed, start normally this long, then retry
CRIU_TIMEOUT_S = 120.0
_EMPTY_PROC_LOCK = threading.Lock()
DEFAULT_PREIMPORT = "strato.sdk.app"
"""What every app module imports (``import strato; app = strato.App(...)``): strato's SDK."""


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


class ForkFailed(Exception):
    """A container could not be forked; it starts normally instead."""


# ----------------------------------------------------------------------------- channels


class _Channel:
    """The worker's end of a ``SOCK_SEQPACKET`` socket: msgpack maps, each with the pid of
    the process that sent it (``SO_PASSCRED``: in this worker's PID namespace)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self._queue: asyncio.Queue[tuple[dict, int | None] | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self._open = True

    def _readable(self) -> None:
        space = socket.CMSG_SPACE(12)
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(1 << 16, space)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, ancdata = b"", []
            if not data:
                self._eof()
                return
            pid = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = int.from_bytes(payload[:4], sys.byteorder, signed=True)
            try:
                msg = msgspec.msgpack.decode(data)
            except msgspec.DecodeError:
                continue
            if isinstance(msg, dict):
                self._queue.put_nowait((msg, pid))

    def _eof(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self.sock.fileno())
            self._queue.put_nowait(None)

    async def get(self, timeout: float | None = None) -> tuple[dict, int | None] | None:
        """The next message, or ``None`` at end of file."""
        return await asyncio.wait_for(self._queue.get(), timeout)

    def send(self, msg: dict, fds: list[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.setblocking(True)
        try:
            self.sock.sendmsg([msgspec.msgpack.encode(msg)], anc)
        finally:
            self.sock.setblocking(False)

    def close(self) -> None:
        self._eof()
        self.sock.close()


def _socketpair() -> tuple[socket.socket, socket.socket]:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return mine, theirs


async def _pipe_reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
    pipe = os.fdopen(fd, "rb", buffering=0)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
    return reader


def _join_files(cgroup: ContainerCgroup) -> list[str]:
    """The files a process writes ``0`` to, to move itself (one thread) into ``cgroup``."""
    if cgroup.version == 1:
        return [p[: -len("cgroup.procs")] + "tasks" for p in cgroup.procs_paths]
    return list(cgroup.procs_paths)


def _kill(pid: int | None, sig: int) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


# ----------------------------------------------------------------------------- zygotes


@dataclasses.dataclass(eq=False)
class Zygote:
    """A zygote or template process and the control socket to it."""

    key: str
    name: str  # also its cgroup's and hostname's
    kind: str  # "zygote" | "template"
    proc: asyncio.subprocess.Process | None = None
    chan: _Channel | None = None
    cgroup: ContainerCgroup | None = None
    home: Path | None = None  # a template's own directory (spec), removed with it
    ready: asyncio.Future | None = None
    children: int = 0
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    dead: bool = False
    pumps: list[asyncio.Task] = dataclasses.field(default_factory=list)
    restored: bool = False  # a CRIU restore (no proc of ours: watched by its channel)
    pid: int | None = None
    container_dir: Any = None  # an image's root, mounted for the zygote (bwrap)
    ctl_fd: int | None = None  # the number of its control socket, in it
    own_code: bool = False  # started with one app's code bound in place (not every app's)
    egress: Any = None  # a template's user-mode network stack (its snap hooks may need it)

    @property
    def alive(self) -> bool:
        if self.dead:
            return False
        if self.proc is not None and self.proc.returncode is not None:
            self.dead = True
        return not self.dead

    async def stop(self) -> None:
        self.dead = True
        if self.chan is not None:
            self.chan.close()
        if self.proc is not None and self.proc.returncode is None:
            _kill(self.proc.pid, _signal.SIGKILL)
        _kill(self.pid, _signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.proc.wait(), 5.0)
        for t in self.pumps:
            t.cancel()
        cgroup, home, root = self.cgroup, self.home, self.container_dir
        egress, self.egress = self.egress, None
        self.cgroup = self.home = self.container_dir = None

        def cleanup() -> None:
            if egress is not None:
                egress.close()
            if cgroup is not None:
                cgroup.kill_all()
                cgroup.remove()
            if home is not None and not (home / "criu" / "done").exists():
                shutil.rmtree(home, ignore_errors=True)  # a checkpoint on disk is kept
            if root is not None:
                root.remove()

        await asyncio.to_thread(cleanup)


class ForkedContainer(RunningContainer):
    """A container forked from a zygote: ``pid`` is its main process (PID 1 of its own PID
    namespace under ``bwrap``), whose parent, the monitor, reports how it ended."""

    def __init__(
        self,
        container_id: str,
        pid: int,
        monitor: int | None,
        chan: _Channel,
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
        self.egress: Any = None  # its user-mode network stack (runtime/network.py), if any

    async def wait(self) -> ExitStatus:
        if self._wait_task is None:
            self._wait_task = asyncio.ensure_future(self._wait())
        return await asyncio.shield(self._wait_task)

    async def _wait(self) -> ExitStatus:
        code: int | None = None
        sig: int | None = _signal.SIGKILL  # no report: the monitor itself was killed
        while (got := await self._chan.get()) is not None:
            msg, _ = got
            if "exit" in msg:
                code, sig = msg.get("exit"), msg.get("signal")
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
            _kill(self.pid, sig)
            _kill(self.monitor, sig)
            return
        if self._done:
            return
        try:
            os.killpg(self.pid, sig)  # it leads its own session
        except (ProcessLookupError, PermissionError):
            _kill(self.pid, sig)


# ----------------------------------------------------------------------------- made ahead


@dataclasses.dataclass(eq=False)
class _Premade:
    """A user namespace (root and the container's user mapped to themselves on the host)
    with a network namespace of its own, egress attached, held by a small process until a
    forked container joins them (their file descriptors keep them alive meanwhile)."""

    holder: subprocess.Popen
    userns: int
    netns: int
    egress: Any
    user: tuple[int, int]

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
        """Unused (or its container failed): all of it goes."""
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
        uid, gid = user
        for name, own in (("uid_map", uid), ("gid_map", gid)):
            with open(f"/proc/{holder.pid}/{name}", "w") as f:
                f.write(f"0 0 1\n{own} {own} 1\n")
        made.userns = os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        made.netns = os.open(f"/proc/{holder.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        made.egress = attach_egress(holder.pid)
    except BaseException:
        made.discard()
        raise
    return made


class _PremadePool:
    """A few :class:`_Premade` kept ready, so that a forked container's start does not wait
    for its network stack (slirp4netns takes 4-10 ms to start); refilled in the
    background after each one taken. Empty: the container makes its own namespaces."""

    def __init__(self, size: int) -> None:
        self.size = max(0, size)
        self.ready: list[_Premade] = []
        self._filling: asyncio.Task | None = None
        self._broken: str | None = None
        self._closed = False

    def take(self, user: tuple[int, int]) -> _Premade | None:
        found = None
        for p in self.ready:
            if p.user == user:
                found = p
                break
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


# ----------------------------------------------------------------------------- the pool


class ZygotePool:
    """The worker agent's zygotes and templates."""

    def __init__(
        self,
        cache: Path,
        *,
        tell: Callable[[str, str], None] = lambda cid, text: None,
        output: Callable[[str, str, str], None] = lambda cid, stream, text: None,
    ) -> None:
        self.cache = cache
        self._tell = tell  # (container id, text): a system line in the app's logs
        self._output = output  # (container id, stream, text): a line of the container's
        self.enabled = os.environ.get("STRATO_ZYGOTE", "1") not in ("0", "false", "no")
        self.preimport = f"{DEFAULT_PREIMPORT} {os.environ.get('STRATO_PREIMPORT', '')}".strip()
        self.ttl_s = _env_float("STRATO_SNAPSHOT_TTL", 900.0)
        self.max_templates = int(_env_float("STRATO_SNAPSHOT_MAX", 8))
        self.zygotes: dict[str, Zygote] = {}
        self.templates: dict[str, Zygote] = {}
        self._told: set[str] = set()  # function ids told why they start without a snapshot
        self._warned: set[str] = set()  # reasons for not forking already in the worker's log
        self._failed: dict[str, tuple[float, str]] = {}  # key -> (until, why)
        self._empty_proc: dict[str, int] = {}  # empty proc's path -> its device, when seen
        self._broken: dict[str, tuple[float, str]] = {}  # (runtime, image) -> (since, why)
        self._criu: tuple[bool, str] | None = None
        self._premade = _PremadePool(int(_env_float("STRATO_ZYGOTE_NETNS_AHEAD", 2)))
        self._sweeper: asyncio.Task | None = None
        self._closed = False

    # ------------------------------------------------------------------ public

    def prewarm(self, runtime: _Runtime, channel: str) -> None:
        """Start the zygote for containers without an image, if there is none yet."""
        if not self.enabled or runtime.name not in ("bwrap", "process"):
            return
        family, path = frames.parse_address(channel)
        sock = path if family == "unix" else None
        key = self._zygote_key(runtime, sys.executable, channel, [])
        if key not in self.zygotes:
            asyncio.ensure_future(self._prewarm(runtime, channel, sock))
        if runtime.name == "bwrap":
            with contextlib.suppress(ForkFailed):
                user = _container_user()
                if user is not None:
                    self._premade.fill(user)

    async def _prewarm(self, runtime: _Runtime, channel: str, sock: str | None) -> None:
        try:
            await self._get_zygote(runtime, channel, sock)
        except ForkFailed as e:
            log.warning("no zygote: %s (containers start normally)", e)

    async def start(
        self, msg: m.ContainerStart, launch: ContainerLaunch, runtime: _Runtime
    ) -> RunningContainer | None:
        """Fork the container from a template or zygote; ``None``: start it normally."""
        snap = msg.spec.enable_memory_snapshot
        if not self.enabled:
            if snap:
                self._tell_once(msg, "memory snapshots are off on this worker (STRATO_ZYGOTE=0)")
            return None
        why = await asyncio.to_thread(self._unforkable, launch, runtime, msg.spec)
        if why is not None:
            if snap:
                self._tell_once(msg, f"no memory snapshot: {why}; the container starts normally")
            return None
        where = self.fallback_key(runtime, launch)
        try:
            since, broken = self._broken.get(where, (0.0, None))
            if broken is not None:
                if time.monotonic() - since < BROKEN_RETRY_S:
                    raise ForkFailed(broken)
                del self._broken[where]  # tried again after a while
            if snap:
                zygote = await self._get_template(msg, launch, runtime)
            else:
                zygote = await self._get_zygote(
                    runtime, msg.channel, launch.channel_socket, launch, msg.spec.env
                )
            return await self._fork(zygote, msg, launch, runtime, where)
        except Exception as e:  # noqa: BLE001 - whatever fails, the container starts normally
            if not isinstance(e, ForkFailed):
                log.exception("forking container %s failed", msg.container_id)
            self._fell_back(msg, runtime, launch, str(e), snap)
            return None

    @staticmethod
    def fallback_key(runtime: _Runtime, launch: ContainerLaunch) -> str:
        """What a fork failure turns forking off for (a while): this runtime with this
        image (its layers; none: the host's files), never every container of the worker."""
        return "\0".join(
            [runtime.name, launch.argv[0] if launch.argv else "", *launch.rootfs_layers]
        )

    def _fell_back(
        self,
        msg: m.ContainerStart,
        runtime: _Runtime,
        launch: ContainerLaunch,
        why: str,
        snap: bool,
    ) -> None:
        """Say once why containers of this (runtime, image) start normally: in the worker's
        log once per reason, in the app's logs once per function."""
        image = (
            "no image" if not launch.rootfs_layers else f"image {launch.rootfs_layers[-1][-12:]}"
        )
        said = f"{runtime.name}, {image}: {why}"
        if said not in self._warned:
            self._warned.add(said)
            log.warning("containers are not forked (%s); they start normally", said)
        if snap:
            self._tell_once(msg, f"no memory snapshot: {why}; the container starts normally")
        else:
            self._tell_once(msg, f"not forked from a zygote: {why}; the container starts normally")

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        everyone = [*self.zygotes.values(), *self.templates.values()]
        self.zygotes.clear()
        self.templates.clear()
        await asyncio.gather(*(z.stop() for z in everyone), return_exceptions=True)
        await self._premade.close()

    # ------------------------------------------------------------------ checks

    def _unforkable(
        self, launch: ContainerLaunch, runtime: _Runtime, spec: m.FunctionSpec | None = None
    ) -> str | None:
        """Why this launch cannot be forked here (``None``: it can). Runs in a thread."""
        if runtime.name not in ("bwrap", "process"):
            return f"the {runtime.name} runtime cannot fork containers"
        if launch.gpu_indices:
            return "containers with GPUs are not forked"
        if launch.argv[1:] != ["-m", "strato.container"]:
            return "the container does not run strato's entrypoint"
        if runtime.name == "bwrap":
            # (a web server on a port below 1024 binds it: its network namespace is its own)
            for b in launch.binds:
                if self._bind_source(b) is None:
                    return f"the bind {b.src} -> {b.dst} cannot be made in a forked container"
            return self._check_empty_proc(runtime)
        return None

    def _bind_source(self, b: Bind, template: bool = False) -> str | None:
        """Where a zygote sees a bind's source ("" for the container dir: written instead).
        A template was started with the function's own binds: it sees them in place."""
        if b.dst == IN_CONTAINER + "/container":
            return ""
        if b.dst == STRATO_SRC + "/strato":
            return b.dst  # an image's zygote has strato's own package in place
        mounts = str(self.cache / "mounts") + "/"
        if b.src.startswith(mounts) and b.dst.startswith(MOUNTS + "/"):
            return b.dst if template else HOSTMOUNTS + "/" + b.src[len(mounts) :]
        return None

    def _check_empty_proc(self, runtime: _Runtime) -> str | None:
        """The empty proc a zygote binds (the proof a forked container's PID namespace may
        mount its own proc): checked by its path at each start (a stat), mounted again when
        something hid it (e.g. the state directory bound onto itself by another runtime)."""
        path = Path(runtime.state_dir) / "emptyproc"  # type: ignore[attr-defined]
        known = self._empty_proc.get(str(path))
        if known is not None:
            with contextlib.suppress(OSError):
                if os.stat(path).st_dev == known:
                    return None
        with _EMPTY_PROC_LOCK:  # checks run in threads: mount one, not one each
            why = _ensure_empty_proc(path)
        if why is None:
            with contextlib.suppress(OSError):
                self._empty_proc[str(path)] = os.stat(path).st_dev
        return why

    def criu_status(self) -> tuple[bool, str]:
        """(usable, why not): ``criu check``, run once per worker."""
        if self._criu is None:
            self._criu = criu_check()
            if not self._criu[0]:
                log.info("memory snapshots without CRIU: %s", self._criu[1])
        return self._criu

    def _tell_once(self, msg: m.ContainerStart, text: str) -> None:
        if msg.function_id in self._told:
            return
        self._told.add(msg.function_id)
        log.info("%s (%s): %s", msg.spec.name, msg.function_id, text)
        self._tell(msg.container_id, text)

    # ------------------------------------------------------------------ zygotes

    @staticmethod
    def _zygote_key(runtime: _Runtime, python: str, channel: str, layers: list[str]) -> str:
        raw = "\0".join(["zygote", runtime.name, python, channel, *layers])
        return hashlib.sha256(raw.encode()).hexdigest()

    async def _get_zygote(
        self,
        runtime: _Runtime,
        channel: str,
        channel_socket: str | None,
        like: ContainerLaunch | None = None,
        private_env: dict[str, str] | None = None,
    ) -> Zygote:
        """The zygote for containers like ``like`` (its runtime, Python and image; ``None``:
        no image, this Python), started if there is none. ``private_env``: the function's
        own variables in ``like.env``, which a zygote shared by every function must not get.
        """
        python = like.argv[0] if like is not None else sys.executable
        layers = list(like.rootfs_layers) if like is not None else []
        # An image's zygote runs the image's files (its Python, its packages): it sees the
        # code of one app version only, as its containers do, never every app's code.
        code = [b for b in like.binds if b.dst.startswith(MOUNTS + "/")] if layers else []
        key = self._zygote_key(runtime, python, channel, [*layers, *(b.src for b in code)])
        z = self.zygotes.get(key)
        if z is not None and z.alive:
            await self._await_ready(z)
            return z
        if z is not None:  # it died: free what it held
            asyncio.ensure_future(z.stop())
        self._check_failed(key)
        z = Zygote(key, f"zy-{key[:10]}-{secrets.token_hex(3)}", "zygote")
        self.zygotes[key] = z
        z.ready = asyncio.get_running_loop().create_future()
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        binds = []
        workdir = None
        preimport = self.preimport
        if layers and like is not None:  # the image's environment, not the function's
            private = private_env or {}
            image_env = {k: v for k, v in like.env.items() if private.get(k) != v}
            env = {k: v for k, v in image_env.items() if not k.startswith("STRATO_")}
            # the image's declared imports: Image.env({"STRATO_PREIMPORT": "torch,numpy"})
            preimport = f"{preimport} {image_env.get('STRATO_PREIMPORT', '')}".strip()
            binds += [b for b in like.binds if b.dst == STRATO_SRC + "/strato"]
            binds += code
            workdir = like.workdir
            z.own_code = True
        env.update(STRATO_CHANNEL=channel, STRATO_ZYGOTE_MODE="zygote", STRATO_PREIMPORT=preimport)
        if runtime.name == "bwrap" and not z.own_code:
            (self.cache / "mounts").mkdir(parents=True, exist_ok=True)
            binds.append(Bind(str(self.cache / "mounts"), HOSTMOUNTS))
            # its root is a container's minimal one (the interpreter, not the checkout):
            # strato's own package in place, as its containers have it (launch.py)
            binds.append(Bind(str(STRATO_PACKAGE), STRATO_SRC + "/strato", readonly=True))
            env["PYTHONPATH"] = STRATO_SRC
        launch = ContainerLaunch(
            container_id=z.name,
            argv=[python, "-m", ZYGOTE_MODULE],
            env=env,
            cwd="/",
            binds=binds,
            channel_socket=channel_socket,
            rootfs_layers=layers,
            workdir=workdir,
        )
        await self._spawn(z, launch, runtime, log_to=None)
        return z

    def _check_failed(self, key: str) -> None:
        until, why = self._failed.get(key, (0.0, ""))
        if time.monotonic() < until:
            raise ForkFailed(why)

    async def _await_ready(self, z: Zygote) -> None:
        assert z.ready is not None
        try:
            await asyncio.shield(z.ready)
        except ForkFailed:
            raise
        except Exception as e:  # noqa: BLE001
            raise ForkFailed(f"{type(e).__name__}: {e}") from None

    async def _spawn(
        self,
        z: Zygote,
        launch: ContainerLaunch,
        runtime: _Runtime,
        log_to: str | None,
        set_ready: bool = True,
    ) -> None:
        """Start ``z`` as ``launch`` says, wait until it is ready (or raise ForkFailed)."""
        rt: Any = runtime  # bwrap's or process's own attributes
        mine, theirs = _socketpair()
        sent: list[int] = []  # file descriptors for bwrap, closed here once it started
        mine_fds: list[int] = []  # their other ends
        try:
            launch.env["STRATO_ZYGOTE_FD"] = str(theirs.fileno())
            z.ctl_fd = theirs.fileno()
            env = rt._environment(launch)
            if rt.cgroups is not None:
                z.cgroup = await asyncio.to_thread(
                    rt.cgroups.create, z.name, launch.cpu, launch.memory_mb, None
                )
            net: tuple[int, int, int, int] | None = None  # info r/w, block r/w
            if runtime.name == "bwrap":
                if z.kind == "template" and not launch.block_network:
                    # a network namespace of its own (bwrap's): egress, attached before its
                    # snap hooks run (they may download what they load)
                    info, block = os.pipe(), os.pipe()
                    net = (info[0], info[1], block[0], block[1])
                    sent += [info[1], block[0]]
                    mine_fds += [info[0], block[1]]
                argv = await self._bwrap_argv(z, launch, rt, net)
                cwd = "/"
            else:
                argv = list(launch.argv)
                cwd = launch.cwd
            z.proc = await asyncio.create_subprocess_exec(
                *cgroup_join_argv(z.cgroup, argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=cwd,
                start_new_session=True,
                pass_fds=[theirs.fileno(), *sent],
                limit=STREAM_LIMIT,
            )
        except BaseException as e:
            mine.close()
            for fd in mine_fds:
                os.close(fd)
            await self._failed_start(z, f"cannot start the {z.kind}: {type(e).__name__}: {e}")
            raise ForkFailed(f"cannot start the {z.kind}: {e}") from None
        finally:
            theirs.close()
            for fd in sent:
                os.close(fd)
        if net is not None:
            await self._attach_template_network(z, net[0], net[3])
        z.chan = _Channel(mine)
        z.pumps = [
            asyncio.ensure_future(self._pump(z, z.proc.stdout, "stdout", log_to)),
            asyncio.ensure_future(self._pump(z, z.proc.stderr, "stderr", log_to)),
        ]
        await self._handshake(z, set_ready)

    async def _attach_template_network(self, z: Zygote, info_r: int, block_w: int) -> None:
        """Give a template's network namespace (bwrap's) egress once bwrap made it, then let
        it go on (bwrap waits for a byte on ``block_w``). If that fails, it goes on without
        network, and the worker's log says why."""
        from strato.runtime.network import attach_egress

        try:
            pid = await asyncio.to_thread(_read_child_pid, info_r)
            if pid is not None and await asyncio.to_thread(_wait_loopback, pid):
                z.egress = await asyncio.to_thread(attach_egress, pid)
        except Exception as e:  # noqa: BLE001 - it runs on, without network
            log.warning("%s %s: no network: %s", z.kind, z.name, e)
        finally:
            os.close(info_r)
            with contextlib.suppress(OSError):
                os.write(block_w, b"1")
            os.close(block_w)

    async def _bwrap_argv(
        self,
        z: Zygote,
        launch: ContainerLaunch,
        rt: Any,
        net: tuple[int, int, int, int] | None = None,
    ) -> list[str]:
        """bwrap's command line for a zygote: a container's sandbox (its image mounted with a
        writable layer of its own), plus the empty proc and, for an image, its layers.
        ``net``: pipes (info r/w, block r/w) for bwrap to report its pid and wait on."""
        from strato.runtime.bwrap import build_args
        from strato.runtime.isolation import host_workdir, interpreter_binds
        from strato.runtime.rootfs import ContainerDir

        why = await asyncio.to_thread(self._check_empty_proc, rt)  # (prewarm: not checked)
        if why is not None:
            raise ForkFailed(why)
        launch.binds.append(Bind(str(Path(rt.state_dir) / "emptyproc"), PROC_SOURCE))
        rootfs = None
        if launch.rootfs_layers:
            for i, layer in enumerate(launch.rootfs_layers):
                launch.binds.append(Bind(layer, f"{LAYERS}/{i}"))
            z.container_dir = ContainerDir.create(Path(rt.state_dir), z.name)
            rootfs = str(await asyncio.to_thread(z.container_dir.mount, launch.rootfs_layers))
            workdir = launch.workdir or "/"
        else:
            launch.binds[:0] = interpreter_binds(launch, rt.hidden_paths)
            workdir = host_workdir(launch, rt.hidden_paths)
        extra = {} if net is None else {"info_fd": net[1], "block_fd": net[2]}
        args = build_args(
            launch,
            rootfs=rootfs,
            workdir=workdir,
            gpu_nodes=[],
            hidden=rt.hidden_paths,
            caps=ZYGOTE_CAPS,
            **extra,
        )
        return [rt.bwrap, *args, "--", *launch.argv]

    async def _handshake(self, z: Zygote, set_ready: bool) -> None:
        assert z.chan is not None and z.ready is not None
        try:
            got = await z.chan.get(READY_TIMEOUT_S)
        except TimeoutError:
            got = ({"ready": False, "error": f"not ready after {READY_TIMEOUT_S:g}s"}, None)
        if got is None:
            code = await z.proc.wait() if z.proc is not None else None
            got = ({"ready": False, "error": f"it exited (code {code}) before it was ready"}, None)
        msg, _ = got
        if not msg.get("ready"):
            why = f"the {z.kind} failed to start: {msg.get('error')}"
            if msg.get("tb"):
                log.info("%s %s failed:\n%s", z.kind, z.name, msg["tb"])
            await self._failed_start(z, why)
            raise ForkFailed(why)
        if msg.get("missing"):
            log.warning("%s %s could not import %s", z.kind, z.name, ", ".join(msg["missing"]))
        log.info("%s %s ready", z.kind, z.name)
        z.pumps.append(asyncio.ensure_future(self._watch(z)))
        if set_ready:
            z.ready.set_result(True)
        if self._sweeper is None and not self._closed:
            self._sweeper = asyncio.ensure_future(self._sweep())

    @staticmethod
    async def _watch(z: Zygote) -> None:
        """Its control socket closes when it exits (a CRIU restore is no child of ours)."""
        assert z.chan is not None
        while await z.chan.get() is not None:
            pass
        z.dead = True

    async def _failed_start(self, z: Zygote, why: str) -> None:
        self._failed[z.key] = (time.monotonic() + 30.0, why)
        if z.ready is not None and not z.ready.done():
            z.ready.set_exception(ForkFailed(why))
            z.ready.exception()  # retrieved: no warning if nobody else waits
        for table in (self.zygotes, self.templates):
            if table.get(z.key) is z:
                del table[z.key]
        await z.stop()

    async def _pump(
        self, z: Zygote, stream: asyncio.StreamReader | None, name: str, log_to: str | None
    ) -> None:
        if stream is None:
            return
        while True:
            try:
                line = await stream.readline()
            except ValueError:
                line = await stream.read(STREAM_LIMIT)
            if not line:
                z.dead = True
                return
            text = line.decode("utf-8", "replace").rstrip("\n")
            if log_to is not None and (z.ready is None or not z.ready.done()):
                self._output(log_to, name, text)  # the template's start-up: snap hooks
            else:
                log.info("%s %s: %s", z.kind, z.name, text)

    # ------------------------------------------------------------------ templates

    @staticmethod
    def template_key(msg: m.ContainerStart, launch: ContainerLaunch, runtime: _Runtime) -> str:
        """Runtime, Python, image, channel and the whole spec (with its mount id)."""
        h = hashlib.sha256()
        for part in (runtime.name, launch.argv[0], *launch.rootfs_layers, msg.channel):
            h.update(part.encode() + b"\0")
        h.update(msgspec.msgpack.encode(msg.spec))
        return h.hexdigest()

    async def _get_template(
        self, msg: m.ContainerStart, launch: ContainerLaunch, runtime: _Runtime
    ) -> Zygote:
        key = self.template_key(msg, launch, runtime)
        z = self.templates.get(key)
        if z is not None and z.alive:
            await self._await_ready(z)
            return z
        if z is not None:  # it died: free what it held
            asyncio.ensure_future(z.stop())
        self._check_failed(key)
        z = Zygote(key, f"zt-{key[:10]}-{secrets.token_hex(3)}", "template")
        self.templates[key] = z  # before any wait: a concurrent start waits for this one
        z.ready = asyncio.get_running_loop().create_future()
        home = self.cache / "templates" / key[:32]
        z.home = home
        try:
            usable, why = await asyncio.to_thread(self.criu_status)
            if not usable:
                self._tell_once(
                    msg,
                    f"memory snapshot kept in memory (CRIU is unusable here: {why}); "
                    "containers are forked from a template that ran the snap hooks",
                )
            if usable and (home / "criu" / "done").exists():
                try:
                    await self._criu_restore(z, runtime)
                    return z
                except ForkFailed as e:
                    self._tell_once(msg, f"memory snapshot not restored: {e}; it is taken again")
            await asyncio.to_thread(self._write_template_home, home, msg)
        except OSError as e:
            await self._failed_start(z, f"cannot prepare the template: {e}")
            raise ForkFailed(f"cannot prepare the template: {e}") from None
        spec_path = home / "spec.msgpack"
        env = dict(launch.env)
        env.update(
            STRATO_CONTAINER_ID=z.name,
            STRATO_CONTAINER_TOKEN="",
            STRATO_ZYGOTE_MODE="template",
            STRATO_PREIMPORT=self.preimport,
        )
        binds = []
        for b in launch.binds:
            if b.dst == IN_CONTAINER + "/container":
                binds.append(Bind(str(home), b.dst))
            else:
                binds.append(b)
        if runtime.name != "bwrap":
            env["STRATO_CONTAINER_SPEC"] = str(spec_path)
        tl = dataclasses.replace(
            launch,
            container_id=z.name,
            argv=[launch.argv[0], "-m", ZYGOTE_MODULE],
            env=env,
            cwd=str(home),
            binds=binds,
            pids_max=None,
        )
        self._evict(keep=key)
        await self._spawn(z, tl, runtime, log_to=msg.container_id, set_ready=not usable)
        if usable:  # checkpoint it before it forks anything (nobody forks until ready)
            try:
                await self._criu_dump(z, runtime)
            except Exception as e:  # noqa: BLE001 - the template in memory serves
                self._tell_once(msg, f"memory snapshot kept in memory only: {e}")
            finally:
                if not z.ready.done():
                    z.ready.set_result(True)
        return z

    @staticmethod
    def _write_template_home(home: Path, msg: m.ContainerStart) -> None:
        home.mkdir(parents=True, exist_ok=True)
        (home / "spec.msgpack").write_bytes(msgspec.msgpack.encode(msg.spec))

    def _evict(self, keep: str) -> None:
        """Drop idle templates beyond the limit, least recently used first."""
        idle = sorted(
            (z for k, z in self.templates.items() if k != keep and z.children == 0),
            key=lambda z: z.last_used,
        )
        excess = len(self.templates) + 1 - self.max_templates
        for z in idle[: max(0, excess)]:
            self._drop(z)

    def _drop(self, z: Zygote) -> None:
        for table in (self.zygotes, self.templates):
            if table.get(z.key) is z:
                del table[z.key]
        log.info("%s %s dropped (idle)", z.kind, z.name)
        asyncio.ensure_future(z.stop())

    async def _sweep(self) -> None:
        while not self._closed:
            await asyncio.sleep(SWEEP_EVERY_S)
            now = time.monotonic()
            evictable = [
                *self.templates.values(),
                *(z for z in self.zygotes.values() if z.own_code),
            ]
            for z in evictable:
                if z.children == 0 and now - z.last_used > self.ttl_s:
                    self._drop(z)
            for table in (self.zygotes, self.templates):
                for key, z in list(table.items()):
                    if not z.alive and z.children == 0:
                        del table[key]
                        asyncio.ensure_future(z.stop())
            live = {z.home for z in self.templates.values()}
            await asyncio.to_thread(self._prune_checkpoints, live)

    def _prune_checkpoints(self, live: set[Path | None]) -> None:
        """Delete checkpoints on disk unused for ``$STRATO_SNAPSHOT_KEEP`` seconds (default a
        week): those of old code, mostly."""
        keep_s = _env_float("STRATO_SNAPSHOT_KEEP", 7 * 86400.0)
        try:
            homes = list((self.cache / "templates").iterdir())
        except OSError:
            return
        for home in homes:
            try:
                old = time.time() - home.stat().st_mtime > keep_s
            except OSError:
                continue
            if old and home not in live:
                shutil.rmtree(home, ignore_errors=True)

    # ------------------------------------------------------------------ forking

    async def _fork(
        self,
        z: Zygote,
        msg: m.ContainerStart,
        launch: ContainerLaunch,
        runtime: _Runtime,
        where: str = "",
    ) -> ForkedContainer:
        cid = launch.container_id
        env = runtime._environment(launch)  # type: ignore[attr-defined]
        isolate = runtime.name == "bwrap"
        req: dict = {
            "cid": cid,
            "env": env,
            "isolate": isolate,
            "block_network": launch.block_network,
            "hostname": (launch.hostname or cid)[:63],
            "argv0": "strato.container",
        }
        if isolate:
            from strato.runtime.isolation import DEFAULT_CAPS, host_workdir, interpreter_binds

            req["seccomp"] = _seccomp_filter()
            user = _container_user()
            if user is not None:  # an unprivileged user, the same uid on the host
                req["user"] = list(user)
                if launch.channel_socket is not None:
                    _let_reach(launch.channel_socket)
            # a network namespace of its own: only a loopback with block_network, else
            # egress through a user-mode stack the worker attaches (runtime/network.py)
            req["netns"] = True
            req["egress"] = not launch.block_network
            if req["egress"]:
                from strato.runtime.network import egress_unavailable_reason

                if (why := egress_unavailable_reason()) is not None:
                    raise ForkFailed(why)

            binds = []
            for b in launch.binds:
                src = self._bind_source(b, template=z.kind == "template" or z.own_code)
                if src:
                    binds.append([src, b.dst])
            if launch.channel_socket is not None:
                binds.append([CHANNEL_PATH, CHANNEL_PATH])
            if launch.rootfs_layers:  # a root of its own: the image's layers, top first
                n = len(launch.rootfs_layers)
                req["layers"] = [f"{LAYERS}/{i}" for i in reversed(range(n))]
                workdir = launch.workdir or "/"
                req["owned"] = _owned_dirs(launch, workdir)
            else:
                workdir = host_workdir(launch, runtime.hidden_paths)  # type: ignore[attr-defined]
                # the interpreter, when it lives under /tmp or /run: the zygote has it bound
                hidden = runtime.hidden_paths  # type: ignore[attr-defined]
                binds += [[b.src, b.dst] for b in interpreter_binds(launch, hidden)]
                resolv = os.path.realpath("/etc/resolv.conf")
                if resolv.startswith("/run/") and os.path.exists(resolv):
                    binds.append([resolv, resolv])
            req.update(
                binds=binds,
                caps=list(DEFAULT_CAPS),
                workdir=workdir,
                spec_path=env.get("STRATO_CONTAINER_SPEC"),
                spec=msgspec.msgpack.encode(msg.spec),
            )
        else:
            req["workdir"] = launch.cwd
        cgroup: ContainerCgroup | None = None
        manager = getattr(runtime, "cgroups", None)
        send: list[int] = []
        mine, theirs = _socketpair()
        out_r = err_r = -1
        premade: _Premade | None = None
        try:
            if manager is not None:
                pids = None if launch.pids_max is None else launch.pids_max + 1  # + the monitor
                cgroup = manager.create(cid, launch.cpu, launch.memory_mb, pids)
                send += [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in _join_files(cgroup)]
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            fds = [out_w, err_w, theirs.fileno(), *send]
            send += [out_w, err_w]
            if z.chan is None or not z.alive:
                raise ForkFailed(f"the {z.kind} is gone")
            if req.get("egress") and req.get("user"):
                premade = self._premade.take(tuple(req["user"]))
            if premade is not None:  # its user and network namespaces, made ahead
                req["premade"] = True
                fds += [premade.userns, premade.netns]
            z.chan.send(req, fds)
        except BaseException as e:
            mine.close()
            for fd in (out_r, err_r):
                if fd >= 0:
                    os.close(fd)
            if cgroup is not None:
                cgroup.remove(timeout_s=0.5)
            if premade is not None:
                asyncio.ensure_future(asyncio.to_thread(premade.discard))
            if isinstance(e, ForkFailed):
                raise
            raise ForkFailed(f"{type(e).__name__}: {e}") from None
        finally:
            theirs.close()
            for fd in send:
                os.close(fd)
        z.children += 1
        z.last_used = time.monotonic()
        chan = _Channel(mine)
        monitor = pid = egress = None
        if premade is not None:
            egress = premade.egress
            premade.close_fds()  # the monitor has its own
        try:
            while pid is None:
                got = await chan.get(FORK_TIMEOUT_S)
                if got is None:
                    raise ForkFailed(f"the {z.kind}'s fork ended before the container started")
                data, sender = got
                if data.get("ns") and monitor is not None and egress is None:
                    if req.get("user"):
                        _map_ids(chan, monitor, req["user"])
                    if req.get("egress"):
                        egress = await self._attach_egress(chan, monitor)
                    continue
                if "error" in data:  # strato's own set-up failed: it would fail again
                    why = f"a forked container could not be set up: {data['error']}"
                    self._broken[where] = (time.monotonic(), why)
                    raise ForkFailed(why)
                if data.get("monitor"):
                    monitor = sender
                elif data.get("started"):
                    pid = sender
        except BaseException as e:
            z.children -= 1
            chan.close()
            os.close(out_r)
            os.close(err_r)
            _kill(monitor, _signal.SIGKILL)
            if premade is not None:
                await asyncio.to_thread(premade.discard)
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
        stdout = await _pipe_reader(out_r)
        stderr = await _pipe_reader(err_r)
        memory_mb = launch.memory_mb if cgroup is not None else None
        ahead = " (namespaces made ahead)" if premade is not None else ""
        log.debug("container %s forked from %s %s (pid %s)%s", cid, z.kind, z.name, pid, ahead)
        forked = ForkedContainer(cid, pid, monitor, chan, stdout, stderr, cgroup, memory_mb, z)
        forked.egress = egress
        if premade is not None:  # its namespaces live on in the container: the holder goes
            asyncio.ensure_future(asyncio.to_thread(premade.end_holder))
        return forked

    @staticmethod
    async def _attach_egress(chan: _Channel, monitor: int) -> Any:
        """Attach the user-mode network stack to the network namespace the monitor made,
        then tell it to go on (or why not: it then fails, and the container starts
        normally)."""
        from strato.runtime.network import NetworkUnavailable, attach_egress

        try:
            egress = await asyncio.to_thread(attach_egress, monitor)
        except (NetworkUnavailable, OSError) as e:
            chan.send({"egress": False, "error": str(e)})
            return None
        chan.send({"egress": True})
        return egress

    # ------------------------------------------------------------------ CRIU

    async def _criu_dump(self, z: Zygote, runtime: _Runtime) -> None:
        """Checkpoint a ready template (before it forked anything) to disk, leaving it
        running; raise ForkFailed (the in-memory template still serves) on failure."""
        assert z.home is not None and z.proc is not None
        images = z.home / "criu"
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir(parents=True)
        root = _tree_root(z.proc.pid, runtime.name)
        server = _fork_server_pid(z.proc.pid)
        # what CRIU calls the template's end of its control socket, to hand a new one in its
        # place on restore (--inherit-fd)
        fds = {"ctl": _fd_resource(server, z.ctl_fd) if server and z.ctl_fd else ""}
        ok, out = await asyncio.to_thread(_run, criu_dump_argv(root, images), CRIU_TIMEOUT_S)
        if not ok:
            raise ForkFailed(f"criu dump failed: {out}")
        (images / "fds.json").write_text(msgspec.json.encode(fds).decode())
        (images / "done").write_text(str(time.time()))
        log.info("template %s checkpointed to %s", z.name, images)

    async def _criu_restore(self, z: Zygote, runtime: _Runtime) -> None:
        """Bring a checkpointed template back (``criu restore``): a new control socket takes
        the place of the old one; its stdout/stderr go to the worker's log."""
        assert z.home is not None
        images = z.home / "criu"
        try:
            old = msgspec.json.decode((images / "fds.json").read_bytes())
        except (OSError, msgspec.DecodeError) as e:
            raise ForkFailed(f"the checkpoint is incomplete ({e})") from None
        mine, theirs = _socketpair()
        pidfile = images / "restored.pid"
        argv = criu_restore_argv(images, pidfile, {old.get("ctl", ""): theirs.fileno()})
        try:
            ok, out = await asyncio.to_thread(_run, argv, CRIU_TIMEOUT_S, (theirs.fileno(),))
        finally:
            theirs.close()
        if not ok:
            mine.close()
            shutil.rmtree(images, ignore_errors=True)
            raise ForkFailed(f"criu restore failed: {out}")
        try:
            z.pid = int(pidfile.read_text())
        except (OSError, ValueError):
            z.pid = None
        z.restored = True
        with contextlib.suppress(OSError):
            os.utime(images.parent)  # in use: not pruned
        z.chan = _Channel(mine)
        z.pumps.append(asyncio.ensure_future(self._watch(z)))
        assert z.ready is not None
        z.ready.set_result(True)
        log.info("template %s restored from %s", z.name, images)


# ----------------------------------------------------------------------------- helpers


def _read_child_pid(fd: int) -> int | None:
    """The ``child-pid`` bwrap writes on its ``--info-fd`` (``None`` if it exits first)."""
    data = b""
    while b"}" not in data:
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
    try:
        return int(msgspec.json.decode(data[: data.index(b"}") + 1])["child-pid"])
    except (msgspec.DecodeError, KeyError, TypeError, ValueError):
        return None


def _wait_loopback(pid: int, timeout_s: float = 2.0) -> bool:
    """Wait until bwrap has brought ``lo`` up in the network namespace of ``pid`` (before it
    waits on ``--block-fd``): configuring ``tap0`` meanwhile makes its netlink requests fail
    now and then (as the bwrap runtime waits). False if the sandbox is gone."""
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


def _container_user() -> tuple[int, int] | None:
    """The unprivileged (uid, gid) bwrap containers run as (inside and on the host), from
    :func:`strato.runtime.isolation.container_ids` where the runtime has it and the worker
    is root (which the mapping needs); ``None``: root, as the runtime's containers then."""
    from strato.runtime import isolation

    ids = getattr(isolation, "container_ids", None)
    if ids is None or os.geteuid() != 0:
        return None
    try:
        return ids()
    except Exception as e:  # noqa: BLE001 - a bad setting: the runtime says it on start
        raise ForkFailed(f"no container user: {e}") from None


def _owned_dirs(launch: ContainerLaunch, workdir: str) -> list[str]:
    """Folders of an image that its container's user gets to write (as the bwrap runtime
    gives them): its home and workdir."""
    from strato.runtime.isolation import OWN_DIRS

    dirs = [launch.env.get("HOME") or "/root"]
    if workdir != "/":
        dirs.append(workdir)
    own = [d.rstrip("/") + "/" for d in OWN_DIRS]
    return [d for d in dirs if os.path.isabs(d) and d != "/" and not any(
        (d + "/").startswith(o) for o in own)]  # fmt: skip


def _map_ids(chan: _Channel, monitor: int, user: list[int]) -> None:
    """Map, as root outside, root (the set-up) and the container's user (the same ids on
    the host) in the user namespace the monitor made; tell it to go on (or why not)."""
    uid, gid = user
    try:
        for name, own in (("uid_map", uid), ("gid_map", gid)):
            with open(f"/proc/{monitor}/{name}", "w") as f:
                f.write(f"0 0 1\n{own} {own} 1\n")
    except OSError as e:
        chan.send({"mapped": False, "error": f"cannot map the container's ids: {e}"})
        return
    chan.send({"mapped": True})


def _let_reach(socket_path: str) -> None:
    """The channel socket, bound into a container whose unprivileged user must connect to
    it: read-writable by all (the control plane authenticates each container by its token;
    the bwrap runtime does the same)."""
    with contextlib.suppress(OSError):
        mode = os.stat(socket_path).st_mode & 0o777
        if mode & 0o006 != 0o006:
            os.chmod(socket_path, mode | 0o666)


def _seccomp_filter() -> bytes:
    """The seccomp filter a bwrap container gets (:mod:`strato.runtime.seccomp`), which a
    forked one loads last, just before strato's entrypoint; ForkFailed when there is none
    (the container then starts normally, as the runtime makes it)."""
    from strato.runtime import seccomp

    try:
        return seccomp.filter_bpf()
    except seccomp.SeccompUnavailable as e:
        raise ForkFailed(f"no seccomp filter: {e}") from None


def _run(argv: list[str], timeout: float, pass_fds: tuple[int, ...] = ()) -> tuple[bool, str]:
    try:
        p = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, pass_fds=pass_fds, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    text = (p.stderr or p.stdout or "").strip().splitlines()
    return p.returncode == 0, (text[-1] if text else f"exit code {p.returncode}")


def criu_check(criu: str | None = None) -> tuple[bool, str]:
    """(usable, why not): whether ``criu check`` passes on this kernel."""
    criu = criu or _criu_binary()
    if criu is None:
        return False, "criu is not installed (apt-get install criu)"
    if os.geteuid() != 0:
        return False, "criu needs root"
    p_ok, out = _run([criu, "check"], 60.0)
    if p_ok:
        return True, ""
    return False, f"`criu check` failed: {out}"


def _criu_binary() -> str | None:
    """``$STRATO_CRIU`` (a path), else ``criu`` on the PATH."""
    return os.environ.get("STRATO_CRIU") or shutil.which("criu")


def criu_dump_argv(pid: int, images: Path) -> list[str]:
    return [
        _criu_binary() or "criu",
        "dump",
        "--tree",
        str(pid),
        "--images-dir",
        str(images),
        "--leave-running",
        "--shell-job",
        "--ext-unix-sk",
        "--manage-cgroups=ignore",
        "--ext-mount-map",
        "auto",
        "--enable-external-masters",
        "--enable-external-sharing",
        "--log-file",
        "dump.log",
    ]


def criu_restore_argv(images: Path, pidfile: Path, inherit: dict[str, int]) -> list[str]:
    argv = [
        _criu_binary() or "criu",
        "restore",
        "--images-dir",
        str(images),
        "--restore-detached",
        "--shell-job",
        "--ext-unix-sk",
        "--manage-cgroups=ignore",
        "--ext-mount-map",
        "auto",
        "--pidfile",
        str(pidfile),
        "--log-file",
        "restore.log",
    ]
    for resource, fd in inherit.items():
        if resource:
            argv += ["--inherit-fd", f"fd[{fd}]:{resource}"]
    return argv


def _fd_resource(pid: int, fd: int) -> str:
    """What ``fd`` of process ``pid`` is, as CRIU names it (``socket:[INODE]``)."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


def _fork_server_pid(pid: int) -> int | None:
    """The zygote's Python process: ``pid`` or its descendant running the fork server."""
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            if ZYGOTE_MODULE.encode() in Path(f"/proc/{p}/cmdline").read_bytes():
                return p
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return None


def _tree_root(pid: int, runtime: str) -> int:
    """The process to checkpoint: under bwrap, the init of the template's PID namespace
    (the child of bwrap's monitor, which is ``pid``); else ``pid`` itself."""
    if runtime != "bwrap":
        return pid
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return int(kids[0]) if kids else pid


def _ensure_empty_proc(path: Path) -> str | None:
    """Mount a read-only proc of a PID namespace with no process left at ``path`` unless
    one is there (as this process resolves the path: a bind mounted over a parent directory
    since, e.g. of the state directory onto itself, hides it); ``None`` when it is there,
    else why not."""
    if _proc_root_at(path):
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
    ok, out = _run(argv, 10.0)
    if not _proc_root_at(path):
        return f"cannot mount an empty proc at {path}: {out if not ok else 'not visible'}"
    return None


def _proc_root_at(path: Path) -> bool:
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
