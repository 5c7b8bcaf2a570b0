"""The worker agent's zygotes and templates (:class:`ZygotePool`)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from strato import settings
from strato.exceptions import SettingError
from strato.protocol import frames
from strato.protocol import messages as m
from strato.protocol import zygote as zp
from strato.runtime.base import Bind, ContainerLaunch, RunningContainer, Runtime
from strato.runtime.forking import Forking

from ..launch import ENTRY_ARGS, IN_CONTAINER, MOUNTS, STRATO_SRC, isolated_path
from . import criu, templates
from .channel import Channel, socketpair
from .forked import ForkedContainer, fork
from .zygotes import ForkFailed, Zygote

log = logging.getLogger("strato.worker")

STRATO_PACKAGE = Path(__file__).resolve().parents[2]  # strato's own, bound in
HOSTMOUNTS = IN_CONTAINER + "/hostmounts"  # the node's code mounts, in a zygote (never a child)
READY_TIMEOUT_S = 300.0
SWEEP_EVERY_S = 30.0
BROKEN_RETRY_S = 300.0  # after a fork's set-up failed, start normally this long, then retry
FAILED_RETRY_S = 30.0  # after a zygote failed to start, none is started this long
DEFAULT_PREIMPORT = "strato.sdk.app"
"""What every app module imports (``import strato; app = strato.App(...)``): strato's SDK."""


class ZygotePool:
    """The worker agent's zygotes and templates; :meth:`start` forks a container from one
    (or says it cannot: the container then starts normally)."""

    def __init__(
        self,
        cache: Path,
        *,
        tell: Callable[[str, str], None] = lambda cid, text: None,
        output: Callable[[str, m.LogStream, str], None] = lambda cid, stream, text: None,
    ) -> None:
        self.cache = cache
        self._tell = tell  # (container id, text): a system line in the app's logs
        self._output = output  # (container id, stream, text): a line of the container's
        self.enabled = settings.ZYGOTE.get()
        self.preimport = " ".join((DEFAULT_PREIMPORT, *settings.PREIMPORT.get()))
        self.ttl_s = settings.SNAPSHOT_TTL.get()
        self.max_templates = settings.SNAPSHOT_MAX.get()
        self.zygotes: dict[str, Zygote] = {}
        self.templates: dict[str, Zygote] = {}
        self._told: set[str] = set()  # function ids told why they start without a snapshot
        self._warned: set[str] = set()  # reasons for not forking already in the worker's log
        self._failed: dict[str, tuple[float, str]] = {}  # key -> (until, why)
        self._broken: dict[str, tuple[float, str]] = {}  # (runtime, image) -> (since, why)
        self._forkings: set[Forking] = set()  # those used (closed with the pool)
        self._criu: tuple[bool, str] | None = None
        self._sweeper: asyncio.Future[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ public

    def prewarm(self, runtime: Runtime, channel: str) -> None:
        """Start the zygote for containers without an image, if there is none yet."""
        forking = runtime.forking
        if not self.enabled or forking is None:
            return
        family, path = frames.parse_address(channel)
        sock = path if family == "unix" and isinstance(path, str) else None
        key = self._zygote_key(runtime, sys.executable, channel, [])
        if key not in self.zygotes:
            asyncio.ensure_future(self._prewarm(runtime, channel, sock))
        self._forkings.add(forking)
        forking.prewarm()

    async def _prewarm(self, runtime: Runtime, channel: str, sock: str | None) -> None:
        try:
            await self._get_zygote(runtime, channel, sock)
        except ForkFailed as e:
            log.warning("no zygote: %s (containers start normally)", e)

    async def start(
        self, msg: m.ContainerStart, launch: ContainerLaunch, runtime: Runtime
    ) -> RunningContainer | None:
        """Fork the container from a template or zygote; ``None``: start it normally."""
        snap = msg.spec.enable_memory_snapshot
        if msg.spec.sandbox is not None and launch.rootfs_layers:
            return None  # its writable layer stays where the node reads it (a snapshot)
        if not self.enabled:
            if snap:
                self.tell_once(msg, "memory snapshots are off on this worker (STRATO_ZYGOTE=0)")
            return None
        why = await asyncio.to_thread(self.unforkable, launch, runtime, snap)
        if why is not None:
            if snap:
                self.tell_once(msg, f"no memory snapshot: {why}; the container starts normally")
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
                    runtime,
                    msg.channel,
                    launch.channel_socket,
                    launch,
                    {**msg.spec.env, **msg.secret_env},  # never in a shared zygote
                )
            return await self._fork(zygote, msg, launch, runtime)
        except Exception as e:  # noqa: BLE001 - whatever fails, the container starts normally
            if isinstance(e, ForkFailed) and e.broken:
                self._broken[where] = (time.monotonic(), str(e))
            elif not isinstance(e, ForkFailed):
                log.exception("forking container %s failed", msg.container_id)
            self._fell_back(msg, runtime, launch, str(e), snap)
            return None

    @staticmethod
    def fallback_key(runtime: Runtime, launch: ContainerLaunch) -> str:
        """What a fork failure turns forking off for (a while): this runtime with this
        image (its layers; none: the host's files), never every container of the worker."""
        return "\0".join(
            [runtime.name, launch.argv[0] if launch.argv else "", *launch.rootfs_layers]
        )

    template_key = staticmethod(templates.template_key)

    def unforkable(
        self, launch: ContainerLaunch, runtime: Runtime, snapshot: bool = False
    ) -> str | None:
        """Why this launch cannot be forked here (``None``: it can). Blocking (cheap)."""
        forking = runtime.forking
        if forking is None:
            return f"the {runtime.name} runtime cannot fork containers"
        if snapshot and not runtime.capabilities.snapshot:
            return f"the {runtime.name} runtime cannot snapshot memory"
        if launch.gpu_indices:
            return "containers with GPUs are not forked"
        if launch.argv[1:] not in ENTRY_ARGS:  # (a fork runs runner.main: it runs either)
            return "the container does not run strato's entrypoint"
        if forking.isolates:
            # (a web server on a port below 1024 binds it: its network namespace is its own)
            for b in launch.binds:
                if self.bind_source(b) is None:
                    return f"the bind {b.src} -> {b.dst} cannot be made in a forked container"
        return forking.unforkable(launch)

    def bind_source(self, b: Bind, sees_code: bool = False) -> str | None:
        """Where a zygote of an isolating runtime sees a bind's source ("" for the
        container's directory: written instead; ``None``: nowhere). ``sees_code``: it was
        started with the app's code bound in place (a template, an image's zygote)."""
        if b.dst == IN_CONTAINER + "/container":
            return ""
        if b.dst == STRATO_SRC + "/strato":
            return b.dst  # an image's zygote has strato's own package in place
        mounts = str(self.cache / "mounts") + "/"
        if b.src.startswith(mounts) and b.dst.startswith(MOUNTS + "/"):
            return b.dst if sees_code else HOSTMOUNTS + "/" + b.src[len(mounts) :]
        return None

    def tell_once(self, msg: m.ContainerStart, text: str) -> None:
        """Say ``text`` in the function's logs (and the worker's), once per function."""
        if msg.function_id in self._told:
            return
        self._told.add(msg.function_id)
        log.info("%s (%s): %s", msg.spec.name, msg.function_id, text)
        self._tell(msg.container_id, text)

    def criu_status(self) -> tuple[bool, str]:
        """(usable, why not): ``criu check``, run once per worker."""
        if self._criu is None:
            self._criu = criu.criu_check()
            if not self._criu[0]:
                log.info("memory snapshots without CRIU: %s", self._criu[1])
        return self._criu

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        everyone = [*self.zygotes.values(), *self.templates.values()]
        self.zygotes.clear()
        self.templates.clear()
        await asyncio.gather(*(z.stop() for z in everyone), return_exceptions=True)
        for forking in self._forkings:
            await forking.close()

    def _fell_back(
        self,
        msg: m.ContainerStart,
        runtime: Runtime,
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
            self.tell_once(msg, f"no memory snapshot: {why}; the container starts normally")
        else:
            self.tell_once(msg, f"not forked from a zygote: {why}; the container starts normally")

    # ------------------------------------------------------------------ zygotes

    @staticmethod
    def _zygote_key(runtime: Runtime, python: str, channel: str, layers: list[str]) -> str:
        raw = "\0".join(["zygote", runtime.name, python, channel, *layers])
        return hashlib.sha256(raw.encode()).hexdigest()

    async def _get_zygote(
        self,
        runtime: Runtime,
        channel: str,
        channel_socket: str | None,
        like: ContainerLaunch | None = None,
        private_env: dict[str, str] | None = None,
    ) -> Zygote:
        """The zygote for containers like ``like`` (its runtime, Python and image; ``None``:
        no image, this Python), started if there is none. ``private_env``: the function's
        own variables in ``like.env``, which a zygote shared by every function must not get.
        """
        forking = runtime.forking
        assert forking is not None
        python = like.argv[0] if like is not None else sys.executable
        layers = list(like.rootfs_layers) if like is not None else []
        # An image's zygote runs the image's files (its Python, its packages): it sees the
        # code of one app version only, as its containers do, never every app's code.
        code = [b for b in like.binds if b.dst.startswith(MOUNTS + "/")] if like and layers else []
        key = self._zygote_key(runtime, python, channel, [*layers, *(b.src for b in code)])
        z, new = await self._found_or_new(self.zygotes, key, "zygote")
        if not new:
            return z
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
            try:
                preimport = " ".join((preimport, *settings.PREIMPORT.get(image_env)))
            except SettingError as e:
                raise ForkFailed(f"the image's {e}") from None
            binds += [b for b in like.binds if b.dst == STRATO_SRC + "/strato"]
            binds += code
            workdir = like.workdir
            z.own_code = True
        env.update(STRATO_CHANNEL=channel, STRATO_ZYGOTE_MODE="zygote", STRATO_PREIMPORT=preimport)
        if forking.isolates and not z.own_code:
            (self.cache / "mounts").mkdir(parents=True, exist_ok=True)
            binds.append(Bind(str(self.cache / "mounts"), HOSTMOUNTS))
            # its root is a container's minimal one (the interpreter, not the checkout):
            # strato's own package in place, as its containers have it (launch.py)
            binds.append(Bind(str(STRATO_PACKAGE), STRATO_SRC + "/strato", readonly=True))
            env["PYTHONPATH"] = STRATO_SRC
            env["PATH"] = isolated_path()  # (as launch.py gives its containers)
        launch = ContainerLaunch(
            container_id=z.name,
            argv=[python, "-m", criu.ZYGOTE_MODULE],
            env=env,
            cwd="/",
            binds=binds,
            channel_socket=channel_socket,
            rootfs_layers=layers,
            workdir=workdir,
        )
        await self._spawn(z, launch, forking, log_to=None)
        return z

    async def _found_or_new(
        self, table: dict[str, Zygote], key: str, kind: str
    ) -> tuple[Zygote, bool]:
        """(the live zygote or template of ``key``, once ready; False) or (a new one, in
        ``table`` before any wait: a concurrent start waits for it; True). Raises
        ForkFailed while one of ``key`` failed to start lately."""
        z = table.get(key)
        if z is not None and z.alive:
            await self._await_ready(z)
            return z, False
        if z is not None:  # it died: free what it held
            asyncio.ensure_future(z.stop())
        until, why = self._failed.get(key, (0.0, ""))
        if time.monotonic() < until:
            raise ForkFailed(why)
        prefix = "zt" if kind == "template" else "zy"
        z = Zygote(key, f"{prefix}-{key[:10]}-{secrets.token_hex(3)}", kind)
        table[key] = z
        z.ready = asyncio.get_running_loop().create_future()
        return z, True

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
        forking: Forking,
        log_to: str | None,
        set_ready: bool = True,
    ) -> None:
        """Start ``z`` as ``launch`` says, wait until it is ready (or raise ForkFailed)."""
        mine, theirs = socketpair()
        try:
            launch.env["STRATO_ZYGOTE_FD"] = str(theirs.fileno())
            z.ctl_fd = theirs.fileno()
            network = z.kind == "template" and not launch.block_network
            z.helper = await forking.start_helper(launch, theirs.fileno(), network=network)
        except BaseException as e:
            mine.close()
            await self._failed_start(z, f"cannot start the {z.kind}: {type(e).__name__}: {e}")
            raise ForkFailed(f"cannot start the {z.kind}: {e}") from None
        finally:
            theirs.close()
        z.chan = Channel(mine)
        proc = z.helper.proc
        z.pumps = [
            asyncio.ensure_future(self._pump(z, proc.stdout, "stdout", log_to)),
            asyncio.ensure_future(self._pump(z, proc.stderr, "stderr", log_to)),
        ]
        await self._handshake(z, set_ready)

    async def _handshake(self, z: Zygote, set_ready: bool) -> None:
        assert z.chan is not None and z.ready is not None
        ready: zp.Ready
        try:
            got = await z.chan.get(READY_TIMEOUT_S)
        except TimeoutError:
            got = (zp.Ready(False, error=f"not ready after {READY_TIMEOUT_S:g}s"), None)
        if got is None:
            code = await z.proc.wait() if z.proc is not None else None
            ready = zp.Ready(False, error=f"it exited (code {code}) before it was ready")
        elif isinstance(got[0], zp.Ready):
            ready = got[0]
        else:
            ready = zp.Ready(False, error=f"it said {type(got[0]).__name__} before it was ready")
        if not ready.ok:
            why = f"the {z.kind} failed to start: {ready.error}"
            if ready.tb:
                log.info("%s %s failed:\n%s", z.kind, z.name, ready.tb)
            await self._failed_start(z, why)
            raise ForkFailed(why)
        if ready.missing:
            log.warning("%s %s could not import %s", z.kind, z.name, ", ".join(ready.missing))
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
        self._failed[z.key] = (time.monotonic() + FAILED_RETRY_S, why)
        if z.ready is not None and not z.ready.done():
            z.ready.set_exception(ForkFailed(why))
            z.ready.exception()  # retrieved: no warning if nobody else waits
        for table in (self.zygotes, self.templates):
            if table.get(z.key) is z:
                del table[z.key]
        await z.stop()

    async def _pump(
        self,
        z: Zygote,
        stream: asyncio.StreamReader | None,
        name: m.LogStream,
        log_to: str | None,
    ) -> None:
        if stream is None:
            return
        while True:
            try:
                line = await stream.readline()
            except ValueError:
                line = await stream.read(1 << 20)
            if not line:
                z.dead = True
                return
            text = line.decode("utf-8", "replace").rstrip("\n")
            if log_to is not None and (z.ready is None or not z.ready.done()):
                self._output(log_to, name, text)  # the template's start-up: snap hooks
            else:
                log.info("%s %s: %s", z.kind, z.name, text)

    # ------------------------------------------------------------------ templates

    async def _get_template(
        self, msg: m.ContainerStart, launch: ContainerLaunch, runtime: Runtime
    ) -> Zygote:
        forking = runtime.forking
        assert forking is not None
        key = self.template_key(msg, launch, runtime)
        z, new = await self._found_or_new(self.templates, key, "template")
        if not new:
            return z
        home = self.cache / "templates" / key[:32]
        z.home = home
        try:
            usable, why = await asyncio.to_thread(self.criu_status)
            if not usable:
                self.tell_once(
                    msg,
                    f"memory snapshot kept in memory (CRIU is unusable here: {why}); "
                    "containers are forked from a template that ran the snap hooks",
                )
            if usable and criu.checkpointed(home):
                try:
                    await self._criu_restore(z)
                    return z
                except criu.CheckpointFailed as e:
                    self.tell_once(msg, f"memory snapshot not restored: {e}; it is taken again")
            await asyncio.to_thread(templates.write_home, home, msg)
        except OSError as e:
            await self._failed_start(z, f"cannot prepare the template: {e}")
            raise ForkFailed(f"cannot prepare the template: {e}") from None
        tl = templates.template_launch(
            launch, z.name, home, self.preimport, sandboxed=runtime.capabilities.isolation
        )
        self._evict(keep=key)
        await self._spawn(z, tl, forking, log_to=msg.container_id, set_ready=not usable)
        if usable:  # checkpoint it before it forks anything (nobody forks until ready)
            assert z.ready is not None
            try:
                assert z.helper is not None
                root, top = z.helper.checkpoint_root(), z.helper.proc.pid
                images = await criu.dump(home, root, top, z.ctl_fd)
                log.info("template %s checkpointed to %s", z.name, images)
            except Exception as e:  # noqa: BLE001 - the template in memory serves
                self.tell_once(msg, f"memory snapshot kept in memory only: {e}")
            finally:
                if not z.ready.done():
                    z.ready.set_result(True)
        return z

    async def _criu_restore(self, z: Zygote) -> None:
        assert z.home is not None and z.ready is not None
        z.chan, z.pid = await criu.restore(z.home)
        z.restored = True
        z.pumps.append(asyncio.ensure_future(self._watch(z)))
        z.ready.set_result(True)
        log.info("template %s restored from %s", z.name, z.home / "criu")

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
            keep_s = settings.SNAPSHOT_KEEP.get()
            await asyncio.to_thread(
                templates.prune_checkpoints, self.cache / "templates", live, keep_s
            )

    # ------------------------------------------------------------------ forking

    async def _fork(
        self, z: Zygote, msg: m.ContainerStart, launch: ContainerLaunch, runtime: Runtime
    ) -> ForkedContainer:
        forking = runtime.forking
        assert forking is not None
        self._forkings.add(forking)  # what it makes ahead goes with the pool
        binds: list[tuple[str, str]] = []
        if forking.isolates:
            sees_code = z.kind == "template" or z.own_code
            for b in launch.binds:
                if src := self.bind_source(b, sees_code):
                    binds.append((src, b.dst))
        return await fork(z, launch, forking, binds, msgspec.msgpack.encode(msg.spec))
