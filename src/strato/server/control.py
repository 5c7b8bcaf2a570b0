"""The control plane: wires the store, call manager, fleet and logs, serves the channel
that worker agents and containers dial, and runs the background loops (autoscaling,
timeouts, expiry, abandoned ephemeral apps). Every loop stops with ``close()``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from strato.exceptions import InvalidError, NotFoundError
from strato.protocol import frames
from strato.protocol import messages as m
from strato.protocol.mounts import encode_manifest, mount_id, validate_manifest

from .autoscaler import (
    AutoscalerConfig,
    ContainerStat,
    FunctionStats,
    PolicyState,
    keepalive_for,
    observe_arrival,
    observe_drained,
    scale,
)
from .calls.manager import CallManager
from .calls.specs import check_spec
from .calls.uploads import Uploads
from .config import ServerConfig
from .fleet import Fleet, Peer
from .gateway import Gateway, GatewayConfig
from .listeners import guard_channel
from .logs import LogHub
from .scheduler import NodeView, place
from .scheduler.quota import AppQuota, QuotaGate, fair_share_surplus
from .store import Store
from .store.blobs import BlobStore

log = logging.getLogger("strato.control")

SCALE_TICK_S = 0.25
# containers send values over frames.CHUNK in chunks, and cut long error texts: their
# frames stay a few MiB (STRATO_MAX_FRAME overrides)
DEFAULT_MAX_FRAME = 16 << 20
# what a worker agent may send after its hello (issue 14: anything else drops it)
WORKER_SENDS = (m.ContainerExited, m.ContainerStartFailed, m.ContainerStarted, m.Heartbeat)
# what `with_options` / `with_concurrency` / `with_batching` may change in a variant (never
# its code, mount or image: those belong to the app that deployed it)
BINDABLE = frozenset(
    {
        "resources",
        "timeout",
        "retries",
        "env",
        "scaling",
        "runtime",
        "max_inputs",
        "target_inputs",
        "batch_max_size",
        "batch_wait_ms",
        "block_network",
    }
)
EXPIRY_EVERY_S = 60.0


class ControlPlane:
    def __init__(self, config: ServerConfig, http_url: str) -> None:
        config.ensure_dirs()
        self.config = config
        self.http_url = http_url
        self.token = config.load_or_create_token()
        self.epoch = secrets.token_hex(6)
        self.store = Store(config.database_url)
        self.blobs = BlobStore(config.home / "blobs")
        self.logs = LogHub(self.store)
        self._wake = asyncio.Event()
        self.calls = CallManager(
            self.store,
            self.blobs,
            blob_threshold=config.blob_threshold,
            max_payload=config.max_payload,
            retention_s=config.output_retention_s,
            kill_container=lambda cid, why: self.fleet.kill(cid, why),
            wake_scaler=self._wake.set,
        )
        self.fleet = Fleet(
            self.store,
            self.calls,
            token=self.token,
            epoch=self.epoch,
            http_url=http_url,
            channel_address=lambda node_id: f"unix:{config.channel_socket}",
            runtime=config.runtime,
            on_change=self._wake.set,
            tell=lambda app_id, text, cid: self.logs.system(app_id, text, cid),
        )
        # per-app quotas and channel frame limits (issue 14)
        self.quota = AppQuota.from_env()
        self.fleet.quota = QuotaGate(self.quota, log, self.fleet._tell)
        self.max_frame = config.max_frame or DEFAULT_MAX_FRAME
        self.worker_max_frame = max(self.max_frame, 64 << 20)
        self._warm_capped: set[str] = set()
        # web endpoints (issue 5): the gateway's listener is its own port (default: ours + 1)
        self.gateway = Gateway(
            GatewayConfig.from_env(config.home, config.host, urlsplit(http_url).port or 0),
            calls=self.calls,
            fleet=self.fleet,
            store=self.store,
            logs=self.logs,
            wake=self._wake.set,
        )
        self.app_heartbeats: dict[str, float] = {}
        self._tasks: list[asyncio.Task] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._closing = False
        self._scale_failed: set[str] = set()  # functions whose scaling raised (logged once)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        stale = self.store.stop_live_containers("the control plane restarted")
        if stale:
            log.info("marked %d containers of an earlier run as stopped", len(stale))
        now = time.monotonic()
        for app in self.store.apps():
            if app["state"] == "ephemeral":
                self.app_heartbeats[app["app_id"]] = now  # its client gets time to come back
        recovered = self.calls.recover()
        if recovered:
            log.info("recovered %d inputs without outputs", recovered)
        sock = self.config.channel_socket
        if sock.exists():
            sock.unlink()
        self._servers.append(
            await asyncio.start_unix_server(
                guard_channel(self._on_channel), path=str(sock), limit=1 << 20
            )  # guard_channel: the channel's connection limit (listeners.py)
        )
        os.chmod(sock, 0o600)
        await self.gateway.start()  # web endpoints (issue 5)
        self._tasks.append(asyncio.create_task(self._scale_loop(), name="scale-loop"))
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for srv in self._servers:
            srv.close()
        for node in self.fleet.nodes.values():
            if node.peer is not None:
                node.peer.close()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        await self.gateway.close()
        self.store.close()

    # ------------------------------------------------------------------ channel

    async def _on_channel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        """One channel connection. Every frame is hostile until proven otherwise: the
        first one (before the peer has shown a secret) may be at most
        ``frames.HELLO_MAX_FRAME``; a frame that is too large, does not decode, fails a
        range check or is not a message that peer may send ends that connection (and a
        container's session), logged, and nothing else."""
        peer = Peer(writer)
        try:
            first = await asyncio.wait_for(frames.read_frame(reader, frames.HELLO_MAX_FRAME), 10.0)
            if isinstance(first, m.WorkerHello):
                if not hmac.compare_digest(first.token.encode(), self.token.encode()):
                    log.warning("channel: a worker hello with a wrong token; closed")
                    return
                await self._worker_loop(first, peer, reader)
            elif isinstance(first, m.ContainerHello):
                await self._container_loop(first, peer, reader)
            elif isinstance(first, m.WebTunnelHello):  # web endpoints (issue 5): raw HTTP now
                if self.gateway.adopt_tunnel(first, writer):
                    peer = None
            elif first is not None:
                log.warning("channel: first frame %s is not a hello; closed", type(first).__name__)
        except frames.FrameError as e:
            log.warning("channel: dropped a peer before its hello: %s", e)
        except (TimeoutError, ConnectionError) as e:
            log.debug("channel closed: %s", e)
        finally:
            if peer is not None:
                peer.close()

    async def _worker_loop(self, hello: m.WorkerHello, peer: Peer, reader) -> None:
        node_id = self.fleet.worker_hello(hello, peer)
        try:
            while (msg := await frames.read_frame(reader, self.worker_max_frame)) is not None:
                if isinstance(msg, m.Logs):
                    self._route_logs(msg.lines)
                elif isinstance(msg, WORKER_SENDS):
                    self.fleet.on_worker_message(node_id, msg)
                else:
                    raise frames.FrameError(f"a worker may not send {type(msg).__name__}")
        except frames.FrameError as e:
            log.warning("channel: dropped the worker agent of %s: %s", node_id, e)
        finally:
            if not self._closing:
                self.fleet.worker_gone(node_id, peer)

    def _route_logs(self, lines: list[m.LogLine]) -> None:
        by_app: dict[str, list[m.LogLine]] = {}
        for line in lines:
            s = self.fleet.containers.get(line.container_id)
            app_id = s.app_id if s is not None else self._app_of_container(line.container_id)
            if app_id:
                by_app.setdefault(app_id, []).append(line)
        for app_id, ls in by_app.items():
            self.logs.append(app_id, ls)

    def _app_of_container(self, container_id: str) -> str | None:
        for row in self.store.containers(live_only=False):
            if row["container_id"] == container_id:
                return row["app_id"]
        return None

    async def _container_loop(self, hello: m.ContainerHello, peer: Peer, reader) -> None:
        known = self.fleet.containers.get(hello.container_id)
        before = known.peer if known is not None else None
        s = self.fleet.container_hello(hello, peer)
        if s is not None and before is not None and before is not peer:
            # one connection per container: the newest wins, so a container cannot
            # multiply what the control plane buffers for it by dialling again
            log.warning(
                "container %s dialled the channel again; closed its older connection",
                s.container_id,
            )
            before.close()
        if s is None:
            log.warning("channel: a hello for container %r without its secret", hello.container_id)
            peer.send(m.StopContainer(0.0))
            return
        uploads = Uploads(self.blobs, self.config.max_payload)
        try:
            while (msg := await frames.read_frame(reader, self.max_frame)) is not None:
                if isinstance(msg, m.TaskOutputs):
                    sizes = {
                        i: uploads.take(o.blob)[1]
                        for i, o in enumerate(msg.outputs)
                        if o.blob is not None
                    }
                    self.calls.on_outputs(s, msg.outputs, sizes)
                elif isinstance(msg, m.BlobChunk):
                    uploads.chunk(msg.data, msg.last)
                elif isinstance(msg, m.ContainerReady):
                    self.fleet.container_ready(s)
                    self.gateway.container_ready(s)
                elif isinstance(msg, m.ContainerInitFailed):
                    self.fleet.container_init_failed(s, msg)
                else:
                    raise frames.FrameError(f"a container may not send {type(msg).__name__}")
        except (frames.FrameError, InvalidError) as e:
            # a container runs the user's code: a bad frame ends it, and only it
            log.warning("channel: dropping container %s: %s", s.container_id, e)
            why = f"it sent a malformed frame ({e})"
            if isinstance(e, frames.FrameTooLarge):
                why = (
                    f"it sent a frame over the channel limit of {self.max_frame} bytes "
                    "(STRATO_MAX_FRAME); return large data through a Volume"
                )
            self.logs.system(s.app_id, f"container dropped: {why}", s.container_id)
            self.fleet.kill(s.container_id, why)
        finally:
            uploads.close()
            if not self._closing and s.peer is peer:  # not when a newer connection took over
                self.fleet.channel_lost(s)

    # ------------------------------------------------------------------ loops

    async def _scale_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), SCALE_TICK_S)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                self.scale_once(time.monotonic())
            except Exception:  # a bug here must not stop scaling for everyone
                log.exception("autoscaler tick failed")

    def scale_once(self, now: float) -> None:
        for step in (self.calls.check_timeouts, self.fleet.check_startups, self.gateway.tick):
            try:
                step(now)
            except Exception:  # each step on its own: one bug must not stop scaling
                log.exception("scaling step %s failed", getattr(step, "__name__", step))
        for fn in list(self.calls.functions.values()):
            if fn.app_state == "stopped":
                continue
            due = fn.recheck_at is not None and now >= fn.recheck_at
            idle = not fn.queue and not fn.sessions and fn.spec.scaling.min_containers == 0
            if idle and not due and fn.arrival_at is None:
                continue
            try:
                self._scale_function(fn, now)
            except Exception:  # one function's failure must not stop the others' scaling
                if fn.function_id not in self._scale_failed:
                    self._scale_failed.add(fn.function_id)
                    log.exception("scaling %s (%s) failed", fn.name, fn.function_id)
            else:
                self._scale_failed.discard(fn.function_id)
        try:
            self._fair_share()
        except Exception:
            log.exception("the fair-share check failed")

    def _fair_share(self) -> None:
        """Per-app quotas under contention (issue 14): a function with work and no
        container after a scaling pass starves; apps over STRATO_APP_FAIR_SHARE start
        nothing new and give back their surplus until it has a container."""
        views = [n.view for n in self.fleet.nodes.values() if n.peer is not None]
        empty = [
            NodeView(
                v.node_id, v.provider, v.region, v.price_per_hour, v.cpu_total, v.memory_mb, v.gpus
            )
            for v in views
        ]
        starving = set()
        for fn in self.calls.functions.values():
            if (
                not fn.queue
                or fn.app_state == "stopped"
                or fn.spec.web is not None
                or fn.function_id in self.fleet.backoff  # its own start-up fails
                or any(s.state in ("starting", "ready") for s in fn.sessions.values())
            ):
                continue
            request = self.fleet.request_for(fn.spec)
            # it waits for capacity only: it fits an empty cluster, not this one
            if place(request, empty) is not None and place(request, views) is None:
                starving.add(fn.app_id)
        gate = self.fleet.quota
        over, surplus = fair_share_surplus(
            list(self.fleet.containers.values()), starving, views, self.quota.fair_share
        )
        for app_id in over - gate.over_fair_share:
            log.info("app %s is over its fair share while %s wait", app_id, sorted(starving))
        gate.over_fair_share = over
        for s in surplus:
            if s.state in ("starting", "ready"):
                log.info("stopping %s: its app is over its fair share", s.container_id)
                self.fleet.stop(s.container_id)

    def _scale_function(self, fn, now: float) -> None:
        state = fn.policy if fn.policy is not None else PolicyState()
        if fn.arrival_at is not None:  # what the adaptive keep-alive learns from
            state = observe_arrival(state, fn.arrival_at)
            fn.arrival_at = None
        # a web endpoint's load is its requests (waiting, in flight), from the gateway
        web = self.gateway.stats(fn, now) if fn.spec.web is not None else None
        queued, inflight = (web.queued, web.inflight) if web else (len(fn.queue), fn.inflight)
        if not queued and not inflight:
            state = observe_drained(state, now)
        sc = fn.spec.scaling
        min_c, buffer_c = sc.min_containers, sc.buffer_containers
        if min_c or buffer_c:  # the warm pool may hold only a share of the cluster (issue 14)
            views = [n.view for n in self.fleet.nodes.values() if n.peer is not None]
            cap = self.quota.warm_cap(self.fleet.request_for(fn.spec), views)
            if min_c + buffer_c > cap:
                min_c = min(min_c, cap)
                buffer_c = max(0, min(buffer_c, cap - min_c))
                if fn.function_id not in self._warm_capped:
                    self._warm_capped.add(fn.function_id)
                    why = (
                        f"{fn.name}: min_containers={sc.min_containers} and buffer_containers="
                        f"{sc.buffer_containers} capped to {min_c} and {buffer_c}: an app's warm "
                        f"pool may hold {self.quota.warm_share:g} of the cluster "
                        "(STRATO_APP_WARM_SHARE)"
                    )
                    log.warning("%s", why)
                    self.logs.system(fn.app_id, why)
        config = AutoscalerConfig(
            min_containers=min_c,
            max_containers=sc.max_containers,
            buffer_containers=buffer_c,
            scaledown_window=sc.scaledown_window or 60.0,
            target_inputs=self.calls.target_inputs(fn),
            keepalive=keepalive_for(sc.scaledown_window),
            memory_mb=float(fn.spec.resources.memory_mb),
        )
        stats = web or FunctionStats(
            now=now,
            queued=len(fn.queue),
            inflight=fn.inflight,
            containers=[
                ContainerStat(
                    container_id=s.container_id,
                    state=s.state if s.state in ("starting", "ready") else "stopping",
                    inflight=len(s.inflight),
                    idle_since=s.idle_since if s.state == "ready" else None,
                    started_at=s.started_at,
                )
                for s in fn.sessions.values()
            ],
        )
        result = scale(stats, config, state)
        fn.policy, fn.recheck_at = result.state, result.recheck_at
        for _ in range(result.decision.start):
            if self.fleet.start_container(fn) is None:
                break
        for cid in result.decision.stop:
            self.fleet.stop(cid)

    async def _housekeeping(self) -> None:
        last_expiry = 0.0
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            try:
                for app_id, seen in list(self.app_heartbeats.items()):
                    if now - seen > self.config.ephemeral_app_timeout_s:
                        log.info(
                            "stopping app %s: its client has been silent for %.0fs",
                            app_id,
                            now - seen,
                        )
                        self.stop_app(app_id)
                if now - last_expiry > EXPIRY_EVERY_S:
                    last_expiry = now
                    n = self.store.expire(time.time())
                    if n:
                        log.info("expired %d calls past their retention", n)
            except Exception:
                log.exception("housekeeping failed")

    # ------------------------------------------------------------------ apps

    def create_app(self, req: m.CreateApp) -> m.AppInfo:
        mount = None
        if req.mount is not None:
            validate_manifest(req.mount)
            missing = [
                f.sha256 for root in req.mount.roots for f in root if not self.blobs.has(f.sha256)
            ]
            if missing:
                raise InvalidError(
                    f"the app's source files are not all uploaded ({len(missing)} "
                    "missing); upload them to /blobs first"
                )
            mount = (mount_id(req.mount), encode_manifest(req.mount))
        names = [f.name for f in req.functions]
        if len(set(names)) != len(names):
            raise InvalidError("two functions of the app share one name")
        for spec in req.functions:
            check_spec(spec)
            self.quota.check_spec(spec)
        # web endpoints: one label each, URLs unique across apps
        self.gateway.check_app(req.functions, req.name, req.deployed)
        if req.deployed and not req.name:
            raise InvalidError("a deployed app needs a name: strato.App('my-app')")
        app_id = "ap-" + secrets.token_hex(8)
        fns = []
        for spec in req.functions:
            if mount is not None:
                spec = msgspec.structs.replace(spec, mount_id=mount[0])
            fns.append(("fu-" + secrets.token_hex(8), spec.name, msgspec.msgpack.encode(spec)))
        state = "deployed" if req.deployed else "ephemeral"
        replaced = self.store.create_app(
            app_id, req.name, state, fns, mount, replace_deployed=req.deployed
        )
        self.gateway.app_created(app_id, req.name, req.deployed)  # before the old stop
        for old in replaced:
            self._stop_in_memory(old)
        if not req.deployed and not req.detached:
            self.app_heartbeats[app_id] = time.monotonic()
        warm = [
            fid
            for fid, _, raw in fns
            if msgspec.msgpack.decode(raw, type=m.FunctionSpec).scaling.min_containers
        ]
        for fid in warm:  # a warm pool starts at deploy, not at the first call
            self.calls.function(fid)
        if warm:
            self._wake.set()
        specs = {s.name: s for s in req.functions}
        refs = [
            m.FunctionRef(
                fid, name, self.gateway.web_url(app_id, req.name, req.deployed, specs.get(name))
            )
            for fid, name, _ in fns
        ]
        return m.AppInfo(app_id, req.name, state, time.time(), refs)

    def app_info(self, row: dict) -> m.AppInfo:
        fns = self.store.functions_of(row["app_id"])
        n = sum(1 for s in self.fleet.containers.values() if s.app_id == row["app_id"])
        refs = []
        for f in fns:
            spec = msgspec.msgpack.decode(f["spec"], type=m.FunctionSpec) if f["spec"] else None
            url = self.gateway.web_url(row["app_id"], row["name"], row["state"] == "deployed", spec)
            refs.append(m.FunctionRef(f["function_id"], f["name"], url))
        return m.AppInfo(row["app_id"], row["name"], row["state"], row["created_at"], refs, n)

    def find_app(self, ref: str) -> dict:
        rows = self.store.apps([ref]) if ref.startswith("ap-") else []
        row = rows[0] if rows else self.store.find_app(ref)
        if row is None:
            raise NotFoundError(
                f"no running or deployed app named {ref!r}; deploy it with `strato deploy FILE`"
            )
        return row

    def stop_app(self, app_id: str) -> None:
        self.store.set_app_state(app_id, "stopped")
        self._stop_in_memory(app_id)

    def _stop_in_memory(self, app_id: str) -> None:
        self.app_heartbeats.pop(app_id, None)
        self.calls.stop_app(app_id)
        # web containers of an app that a newer one replaces drain instead (issue 5)
        draining = self.gateway.retire_app(app_id)
        for s in [s for s in self.fleet.containers.values() if s.app_id == app_id]:
            if s.container_id not in draining:
                self.fleet.kill(s.container_id, "the app was stopped")
        self.logs.system(app_id, "app stopped")

    def heartbeat(self, app_id: str) -> None:
        if app_id in self.app_heartbeats:
            self.app_heartbeats[app_id] = time.monotonic()

    def bind_function(self, function_id: str, req: m.BindFunction) -> m.FunctionRef:
        """The function of one parameter set / options variant of a class (or function),
        created on first use: each is its own pool of containers."""
        parent = self.calls.function(function_id)
        key = hashlib.sha256((req.params or b"") + b"\0" + (req.overrides or b"")).hexdigest()
        name = f"{parent.name}[{key[:12]}]"
        for f in self.store.functions_of(parent.app_id):
            if f["name"] == name:
                return m.FunctionRef(f["function_id"], name)
        changes: dict = {"name": name, "params": req.params}
        if req.overrides:
            types = {f.name: f.type for f in msgspec.structs.fields(m.FunctionSpec)}
            try:
                raw = msgspec.msgpack.decode(req.overrides)
            except msgspec.DecodeError as e:
                raise InvalidError(f"option overrides are not msgpack: {e}") from None
            if not isinstance(raw, dict) or not all(
                isinstance(k, str) and k in BINDABLE for k in raw
            ):
                raise InvalidError(
                    "bad option overrides for the function variant: a map of some of "
                    + ", ".join(sorted(BINDABLE))
                )
            try:
                changes.update({k: msgspec.convert(v, types[k]) for k, v in raw.items()})
            except msgspec.ValidationError as e:
                raise InvalidError(f"bad option overrides: {e}") from None
        spec = check_spec(msgspec.structs.replace(parent.spec, **changes))
        self.quota.check_spec(spec)
        fid = "fu-" + secrets.token_hex(8)
        self.store.add_function(parent.app_id, fid, name, msgspec.msgpack.encode(spec))
        return m.FunctionRef(fid, name)

    def update_autoscaler(self, function_id: str, req: m.UpdateAutoscaler) -> None:
        fn = self.calls.function(function_id)
        sc = fn.spec.scaling
        changes = {k: v for k, v in msgspec.structs.asdict(req).items() if v is not None}
        scaling = msgspec.structs.replace(sc, **changes)
        spec = check_spec(msgspec.structs.replace(fn.spec, scaling=scaling))
        self.quota.check_spec(spec)
        self._warm_capped.discard(function_id)
        self.store.update_function_spec(function_id, msgspec.msgpack.encode(spec))
        self.calls.replace_spec(function_id, spec)
        self._wake.set()


def default_http_url(config: ServerConfig) -> str:
    return f"http://{config.host}:{config.port}"


def server_info_path(home: Path) -> Path:
    return home / "server.json"
