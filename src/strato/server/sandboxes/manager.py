"""Sandboxes in the control plane: create, the warm pool, wait, terminate, timeouts.

A sandbox is a container that the fleet places and starts like a function's (placement,
reservations, runtimes, images, cgroups, logs and quotas all apply) for a hidden function
of its own, whose spec carries ``SandboxConfig``: its container runs the sandbox agent
(``strato.container.sandbox_agent``). That function is not in the call manager, so the
autoscaler and input dispatch never see it. The fleet tells this manager when the
container is ready or gone (``Fleet.sandbox_watch``), and the control plane's channel
loop hands it the agent's frames (``on_frame``). What runs inside a sandbox (the agent's
frames, exec, output, stdin, files) is ``processes.py``; ports reached from outside are
``tunnels.py``; ``snapshot_filesystem()`` is ``snapshots.py``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
from sqlalchemy import Connection, select, update

from strato import exceptions as exc
from strato import settings
from strato.cidr import parse_allowlist
from strato.protocol import messages as m
from strato.protocol.gpu import parse_gpu

from ..calls.state import AppState, FunctionQueue
from ..containers import Container
from ..scheduler import place
from ..store import tables_sandboxes as t
from .buffers import StreamBuffer as StreamBufferT
from .processes import Process, SandboxProcesses
from .snapshots import Snapshots
from .tunnels import Tunnels

if TYPE_CHECKING:
    from ..control import ControlPlane

log = logging.getLogger("strato.sandboxes")

ENDED = ("success", "failure", "timeout", "terminated")
START_RETRY_S = 1.0
POOL_APP = "ap-sandbox-pool"  # the owner of pre-started sandboxes until handed out


@dataclass(eq=False)
class Sandbox:
    sandbox_id: str
    app_id: str
    name: str | None
    tags: dict[str, str]
    runtime: str
    spec: m.FunctionSpec
    timeout: float
    idle_timeout: float | None
    created_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    status: str = "starting"
    returncode: int | None = None
    reason: str = ""
    container: Container | None = None
    processes: dict[int, Process] = field(default_factory=dict)
    by_exec: dict[str, int] = field(default_factory=dict)
    next_pid: int = 2  # 1 is the entrypoint's
    files: dict[int, asyncio.Future[m.FileResult]] = field(default_factory=dict)
    # exits by SIGKILL held until the worker says whether the OOM killer did it
    held_exits: list[m.SbExit] = field(default_factory=list)
    oom_kills: int = 0  # what the worker last counted
    next_file: int = 1
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def info(self) -> m.SandboxInfo:
        return m.SandboxInfo(
            sandbox_id=self.sandbox_id,
            app_id=self.app_id,
            name=self.name,
            status=self.status,  # type: ignore[arg-type]
            returncode=self.returncode,
            reason=self.reason,
            tags=dict(self.tags),
            created_at=self.created_at,
            runtime=self.runtime,
        )

    @property
    def ended(self) -> bool:
        return self.status in ENDED


def default_runtime() -> tuple[str, str]:
    """(runtime, why): gVisor where runsc is installed, else bwrap (said in the log)."""
    chosen = settings.SANDBOX_RUNTIME.get()
    if chosen:
        return chosen, "STRATO_SANDBOX_RUNTIME"
    if shutil.which("runsc"):
        return "gvisor", "runsc is installed"
    return "bwrap", "runsc is not installed"


class Sandboxes(SandboxProcesses):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.fleet = cp.fleet
        self.store = cp.store
        self.live: dict[str, Sandbox] = {}
        self._by_container: dict[str, Sandbox] = {}
        self._ended: dict[str, Sandbox] = {}  # recently ended, still answering reads
        self.runtime, why = default_runtime()
        log.info("sandboxes run under %s by default (%s)", self.runtime, why)
        self.pool_size = settings.SANDBOX_WARM_POOL.get()
        self.pool: list[Sandbox] = []  # pre-started (default runtime, no image)
        self.tunnels = Tunnels(self)  # ports reachable from outside (tunnels.py)
        self.snapshots = Snapshots(self)  # snapshot_filesystem() (snapshots.py)

    # ------------------------------------------------------------------ store

    def _write(self, name: str, run: Callable[[Connection], object]):
        return self.store._write(name, run)

    def mark_earlier_ended(self) -> None:
        """At start: the sandboxes of an earlier run of the control plane are gone (their
        containers are killed by their workers); say so on each."""
        now = time.time()

        def run(c: Connection) -> None:
            c.execute(
                update(t.sandboxes)
                .where(t.sandboxes.c.status.in_(("starting", "running")))
                .values(
                    status="terminated",
                    returncode=137,
                    reason="the control plane restarted, which ends every sandbox it ran",
                    ended_at=now,
                )
            )

        self._write("sandboxes_restart", run)

    def _save(self, sb: Sandbox, insert: bool = False) -> None:
        if sb.app_id == POOL_APP:  # not a sandbox of anyone's yet
            return
        row = {
            "sandbox_id": sb.sandbox_id,
            "app_id": sb.app_id,
            "name": sb.name,
            "tags": msgspec.msgpack.encode(sb.tags),
            "status": sb.status,
            "returncode": sb.returncode,
            "reason": sb.reason,
            "runtime": sb.runtime,
            "container_id": sb.container.container_id if sb.container else None,
            "created_at": sb.created_at,
            "ended_at": time.time() if sb.ended else None,
        }

        def run(c: Connection) -> None:
            if insert:
                c.execute(t.sandboxes.insert().values(**row))
            else:
                c.execute(
                    update(t.sandboxes)
                    .where(t.sandboxes.c.sandbox_id == sb.sandbox_id)
                    .values(**row)
                )

        self._write("sandbox_save", run)

    async def _row(self, sandbox_id: str) -> m.SandboxInfo | None:
        def run(c: Connection) -> dict | None:
            r = c.execute(select(t.sandboxes).where(t.sandboxes.c.sandbox_id == sandbox_id)).first()
            return dict(r._mapping) if r is not None else None

        row = await self.store.aread(self.store._read, run)
        if row is None:
            return None
        return m.SandboxInfo(
            sandbox_id=row["sandbox_id"],
            app_id=row["app_id"],
            name=row["name"],
            status=row["status"],
            returncode=row["returncode"],
            reason=row["reason"] or "",
            tags=msgspec.msgpack.decode(row["tags"]),
            created_at=row["created_at"],
            runtime=row["runtime"] or "",
        )

    # ------------------------------------------------------------------ lookups

    def owns(self, s: Container) -> bool:
        """Whether ``s`` is a sandbox's container."""
        return s.container_id in self._by_container

    def get(self, sandbox_id: str) -> Sandbox:
        sb = self.live.get(sandbox_id) or self._ended.get(sandbox_id)
        if sb is None:
            raise exc.NotFoundError(f"sandbox {sandbox_id} does not exist (or has ended)")
        return sb

    async def info(self, sandbox_id: str) -> m.SandboxInfo:
        sb = self.live.get(sandbox_id) or self._ended.get(sandbox_id)
        if sb is not None:
            return sb.info()
        row = await self._row(sandbox_id)
        if row is None:
            raise exc.NotFoundError(f"sandbox {sandbox_id} does not exist")
        return row

    def by_name(self, app_id: str, name: str) -> Sandbox:
        for sb in self.live.values():
            if sb.app_id == app_id and sb.name == name and not sb.ended:
                return sb
        raise exc.NotFoundError(f"no running sandbox named {name!r} in app {app_id}")

    def list(self, app_id: str | None, tags: dict[str, str]) -> list[m.SandboxInfo]:
        return [
            sb.info()
            for sb in sorted(self.live.values(), key=lambda s: s.created_at)
            if not sb.ended
            and (app_id is None or sb.app_id == app_id)
            and all(sb.tags.get(k) == v for k, v in tags.items())
        ]

    # ------------------------------------------------------------------ create

    def create(self, req: m.CreateSandbox, app_state: str) -> Sandbox:
        if app_state == "stopped":
            raise exc.AppStoppedError(f"app {req.app_id} is stopped: run or deploy it first")
        if req.name is not None:
            for other in self.live.values():
                if other.app_id == req.app_id and other.name == req.name and not other.ended:
                    raise exc.AlreadyExistsError(
                        f"a sandbox named {req.name!r} already runs in app {req.app_id} "
                        f"({other.sandbox_id}); terminate it or choose another name"
                    )
        runtime = req.runtime or self.runtime
        if req.image is not None and runtime == "process":
            raise exc.InvalidError(
                "the 'process' runtime cannot run an image: use runtime='bwrap' or 'gvisor'"
            )
        if runtime == "process" and (req.ephemeral_disk_mb or req.cidr_allowlist is not None):
            raise exc.InvalidError(
                "the 'process' runtime cannot limit a sandbox's disk (ephemeral_disk) or "
                "network (cidr_allowlist): use runtime='bwrap' or 'gvisor'"
            )
        sid = "sb-" + secrets.token_hex(8)
        res = m.Resources(cpu=settings.SANDBOX_CPU.get())  # burstable: no limit
        if req.cidr_allowlist is not None:  # a clear error now, not at its container's start
            parse_allowlist(req.cidr_allowlist, req.block_network)
        disk = req.ephemeral_disk_mb or settings.SANDBOX_DISK_MB.get()
        if req.cpu is not None:
            res = msgspec.structs.replace(res, cpu=req.cpu, cpu_limit=max(req.cpu, 0.125))
        if req.memory_mb is not None:
            res = msgspec.structs.replace(
                res, memory_mb=req.memory_mb, memory_limit_mb=req.memory_mb
            )
        if req.gpu:
            try:
                res = msgspec.structs.replace(res, gpu=[str(parse_gpu(g)) for g in req.gpu])
            except ValueError as e:
                raise exc.InvalidError(f"gpu={req.gpu!r}: {e}") from None
        spec = m.FunctionSpec(
            name=f"sandbox {sid}",
            module="",
            qualname="",
            mount_id=req.mount_id,
            resources=res,
            timeout=req.timeout,
            env=dict(req.env),
            image=req.image,
            block_network=req.block_network,
            ephemeral_disk_mb=disk,
            cidr_allowlist=req.cidr_allowlist,
            runtime=runtime,
            volumes=list(req.volumes),
            secrets=list(req.secrets),
            sandbox=m.SandboxConfig(
                sandbox_id=sid, entrypoint=list(req.entrypoint), workdir=req.workdir
            ),
        )
        for hook in self.cp.apps.spec_hooks:  # secrets by name -> ids (NotFoundError else)
            spec = hook(spec, False)
        if spec.secrets:  # one that cannot be opened fails the create, not a later start
            if self.fleet.secret_env is None:
                raise exc.InvalidError("this control plane serves no secrets")
            self.fleet.secret_env(spec)  # (the values are not kept)
        request = self.fleet.request_for(spec)
        views = [v.emptied() for v in self.fleet.live_views()]
        if views and place(request, views) is None:
            raise exc.ResourceUnavailableError(
                f"no node of this cluster can run this sandbox (cpu={res.cpu}, "
                f"memory={res.memory_mb} MiB, gpu={res.gpu or None})"
            )
        pooled = self._from_pool(req, runtime)
        if pooled is not None:
            return pooled
        sb = Sandbox(
            sandbox_id=sid,
            app_id=req.app_id,
            name=req.name,
            tags=dict(req.tags),
            runtime=runtime,
            spec=spec,
            timeout=req.timeout,
            idle_timeout=req.idle_timeout,
        )
        if req.entrypoint:
            sb.processes[1] = Process(1, "", StreamBufferT(), StreamBufferT())
        self.live[sid] = sb
        self._save(sb, insert=True)
        self._start(sb)
        return sb

    # ------------------------------------------------------------------ the warm pool

    def _poolable(self, req: m.CreateSandbox, runtime: str) -> bool:
        return (
            self.pool_size > 0
            and runtime == self.runtime
            and req.image is None
            and req.cpu is None
            and req.memory_mb is None
            and not req.gpu
            and not req.block_network
            and req.ephemeral_disk_mb is None
            and req.cidr_allowlist is None
            and req.mount_id is None
            and not req.volumes
            and not req.secrets
        )

    def _from_pool(self, req: m.CreateSandbox, runtime: str) -> Sandbox | None:
        """A pre-started sandbox handed to ``req``'s driver, if one is up (and the app's
        quota allows one more container)."""
        if not self._poolable(req, runtime):
            return None
        for sb in self.pool:
            s = sb.container
            if sb.status == "running" and not sb.ended and s is not None and s.peer is not None:
                break
        else:
            return None
        fn = self._function(sb, req.app_id)
        quota = self.fleet.quota
        if quota is not None and quota.blocks(
            fn, s.request, self.fleet.registry.values(), self.fleet.live_views()
        ):
            return None
        self.pool.remove(sb)
        now = time.monotonic()
        sb.app_id, sb.name, sb.tags = req.app_id, req.name, dict(req.tags)
        sb.timeout, sb.idle_timeout = req.timeout, req.idle_timeout
        sb.created_at, sb.started, sb.last_active = time.time(), now, now
        sb.spec = msgspec.structs.replace(sb.spec, env=dict(req.env), timeout=req.timeout)
        s.app_id = req.app_id  # its container is the app's now (quotas, logs)
        if req.entrypoint:
            sb.processes[1] = Process(1, "", StreamBufferT(), StreamBufferT())
        s.send(m.SbConfigure(dict(req.env), req.workdir, list(req.entrypoint)))
        self.live[sb.sandbox_id] = sb
        self._save(sb, insert=True)
        self._fill_pool()
        return sb

    def _fill_pool(self) -> None:
        """Start pool sandboxes until ``pool_size`` are up or starting."""
        self.pool = [sb for sb in self.pool if not sb.ended]
        while len(self.pool) < self.pool_size:
            sid = "sb-" + secrets.token_hex(8)
            spec = m.FunctionSpec(
                name=f"sandbox {sid}",
                module="",
                qualname="",
                timeout=float(m.MAX_TIMEOUT_S),
                resources=m.Resources(cpu=settings.SANDBOX_CPU.get()),  # as create()'s
                ephemeral_disk_mb=settings.SANDBOX_DISK_MB.get(),
                runtime=self.runtime,
                sandbox=m.SandboxConfig(sandbox_id=sid),
            )
            sb = Sandbox(sid, POOL_APP, None, {}, self.runtime, spec, m.MAX_TIMEOUT_S, None)
            self.pool.append(sb)
            self._start(sb)
            if sb.container is None:  # no room: the tick tries again
                self.pool.remove(sb)
                return

    @staticmethod
    def _function(sb: Sandbox, app_id: str) -> FunctionQueue:
        return FunctionQueue(
            function_id="fn-" + sb.sandbox_id,
            app_id=app_id,
            name=f"sandbox {sb.sandbox_id}",
            spec=sb.spec,
            app_state=AppState.EPHEMERAL,
        )

    def _start(self, sb: Sandbox) -> None:
        s = self.fleet.start_container(self._function(sb, sb.app_id))
        if s is None:
            return  # no room now: the tick tries again
        sb.container = s
        self._by_container[s.container_id] = sb
        self._save(sb)

    # ------------------------------------------------------------------ fleet events

    def ready(self, s: Container) -> None:
        sb = self._by_container.get(s.container_id)
        if sb is None or sb.ended:
            return
        s.note_busy()  # never idle: the fleet must not stop it to make room for another
        sb.status = "running"
        sb.last_active = time.monotonic()
        self._save(sb)
        sb.notify()

    def gone(self, s: Container, description: str, oom: bool) -> None:
        sb = self._by_container.pop(s.container_id, None)
        if sb is None:
            return
        if sb.held_exits:  # their worker is gone with them, or has answered too late
            self._release_held(sb, sb.oom_kills + 1 if oom else None)
        if not sb.ended:
            entry = sb.processes.get(1)
            if entry is not None and entry.returncode is not None and not oom:
                sb.status = "success" if entry.returncode == 0 else "failure"
                sb.returncode = entry.returncode
                sb.reason = entry.reason
            else:
                sb.status, sb.returncode = "terminated", 137
                sb.reason = description
                if oom:
                    limit = sb.spec.resources.memory_limit_mb
                    sb.reason = f"ran out of memory (limit {limit} MiB)" if limit else description
        for p in sb.processes.values():
            if p.returncode is None:
                p.returncode, p.reason = 137, f"the sandbox ended: {sb.reason}"
            p.stdout.eof = p.stderr.eof = True
        self._end(sb)

    def _end(self, sb: Sandbox) -> None:
        self.tunnels.close(sb.sandbox_id)
        if sb.app_id == POOL_APP:
            if sb in self.pool:
                self.pool.remove(sb)
            return
        for fut in sb.files.values():
            if not fut.done():
                fut.set_exception(
                    exc.SandboxTerminatedError(f"sandbox {sb.sandbox_id} ended: {sb.reason}")
                )
        sb.files.clear()
        self.live.pop(sb.sandbox_id, None)
        self._ended[sb.sandbox_id] = sb
        while len(self._ended) > 1000:  # the oldest are answered from the store
            self._ended.pop(next(iter(self._ended)))
        self._save(sb)
        sb.notify()
        log.info("sandbox %s ended: %s (%s)", sb.sandbox_id, sb.status, sb.reason)

    def terminate(self, sb: Sandbox, status: str, returncode: int, reason: str) -> None:
        if sb.ended:
            return
        sb.status, sb.returncode, sb.reason = status, returncode, reason
        if sb.container is not None and sb.container.container_id in self._by_container:
            self._save(sb)
            sb.notify()
            self.fleet.kill(sb.container.container_id, reason)  # then gone() ends it
            return
        for p in sb.processes.values():  # never placed: nothing runs
            if p.returncode is None:
                p.returncode, p.reason = returncode, reason
            p.stdout.eof = p.stderr.eof = True
        self._end(sb)

    def tick(self, now: float) -> None:
        """Timeouts, idle timeouts, and starts that found no room."""
        if len(self.pool) < self.pool_size and self.fleet.live_views():
            self._fill_pool()
        for sb in list(self.live.values()):
            if sb.ended:
                continue
            if now - sb.started > sb.timeout:
                self.terminate(sb, "timeout", 124, f"it outlived its timeout of {sb.timeout:g}s")
            elif (
                sb.idle_timeout is not None
                and sb.status == "running"
                and not any(p.returncode is None for p in sb.processes.values())
                and now - sb.last_active > sb.idle_timeout
            ):
                self.terminate(
                    sb, "timeout", 124, f"it was idle for its idle_timeout of {sb.idle_timeout:g}s"
                )
            elif sb.container is None and now - sb.last_active > START_RETRY_S:
                sb.last_active = now
                self._start(sb)

    def stop_app(self, app_id: str) -> None:
        for sb in list(self.live.values()):
            if sb.app_id == app_id:
                self.terminate(sb, "terminated", 137, "its app was stopped")

    async def wait(self, sandbox_id: str, wait_s: float) -> m.SandboxInfo:
        sb = self.live.get(sandbox_id)
        if sb is None:
            return await self.info(sandbox_id)
        deadline = time.monotonic() + wait_s
        while not sb.ended:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(sb.changed.wait(), left)
            except TimeoutError:
                break
        return sb.info()
