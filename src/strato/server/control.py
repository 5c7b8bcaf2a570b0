"""The control plane: wires the store, call manager, container registry, fleet, scaler,
apps, gateway and logs, serves the channel that worker agents and containers dial, and
runs the background loops (scaling, timeouts, expiry, silent ephemeral apps). Every loop
stops with ``close()``."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec

from strato import exceptions as exc
from strato.exceptions import InvalidError
from strato.protocol import frames
from strato.protocol import messages as m

from .api.channel import ChannelRequests, ClientFrames
from .apps import Apps
from .calls.manager import CallManager
from .calls.uploads import Uploads
from .config import ServerConfig
from .containers import ContainerRegistry
from .fleet import Fleet, Peer
from .gateway import Gateway, GatewayConfig
from .listeners import guard_channel
from .logs import LogHub
from .scaling import Scaler
from .scheduler.quota import AppQuota, QuotaGate
from .store import Store
from .store.blobs import BlobStore
from .workspaces import INSTALLATION, Caller, Workspaces

if TYPE_CHECKING:
    from .api.router import Router
    from .cluster.agents import AgentListener
    from .sandboxes import Sandboxes

log = logging.getLogger("strato.control")

SCALE_TICK_S = 0.25
# containers send values over frames.CHUNK in chunks, and cut long error texts: their
# frames stay a few MiB (STRATO_MAX_FRAME overrides)
DEFAULT_MAX_FRAME = 16 << 20
# what a worker agent may send after its hello (anything else drops it)
WORKER_SENDS = (
    m.ContainerExited,
    m.ContainerStartFailed,
    m.ContainerStarted,
    m.Heartbeat,
    m.SbOomCount,  # --- sandboxes
    m.SbSnapshotDone,
)
EXPIRY_EVERY_S = 60.0


class ControlPlane:
    def __init__(self, config: ServerConfig, http_url: str) -> None:
        config.ensure_dirs()
        self.config = config
        self.http_url = http_url
        self.token = config.load_or_create_token()
        self.epoch = secrets.token_hex(6)
        url = config.database_url
        # accepted inputs are durable in the intake journal before the database has them
        # (SQLite keeps it beside its file; elsewhere it lives in STRATO_HOME)
        self.store = Store(
            url, journal=True if url.startswith("sqlite") else config.home / "store.intake"
        )
        self.workspaces = Workspaces(self.store, self.token)  # tokens, app -> workspace
        self.blobs = BlobStore(config.home / "blobs")
        self.logs = LogHub(self.store)
        self._wake = asyncio.Event()
        self.containers = ContainerRegistry()  # the fleet's: only it changes a container
        self.calls = CallManager(
            self.store,
            self.blobs,
            containers=self.containers,
            blob_threshold=config.blob_threshold,
            max_payload=config.max_payload,
            retention_s=config.output_retention_s,
            kill_container=lambda cid, why: self.fleet.kill(cid, why),
            wake_scaler=self._wake.set,
            on_arrival=lambda function_id, now: self.scaler.arrival(function_id, now),
        )
        self.fleet = Fleet(
            self.store,
            self.calls,
            self.containers,
            token=self.token,
            epoch=self.epoch,
            http_url=http_url,
            channel_address=lambda node_id: f"unix:{config.channel_socket}",
            runtime=config.runtime,
            on_change=self._wake.set,
            tell=lambda app_id, text, cid: self.logs.system(app_id, text, cid),
        )
        # per-app quotas and channel frame limits
        self.quota = AppQuota.from_env()
        self.fleet.quota = QuotaGate(self.quota, log, self.fleet._tell)
        self.max_frame = config.max_frame or DEFAULT_MAX_FRAME
        self.worker_max_frame = max(self.max_frame, 64 << 20)
        # web endpoints: the gateway's listener is its own port (default: ours + 1)
        self.gateway = Gateway(
            GatewayConfig.from_env(config.home, config.host, urlsplit(http_url).port or 0),
            calls=self.calls,
            fleet=self.fleet,
            store=self.store,
            logs=self.logs,
            wake=self._wake.set,
        )
        self.scaler = Scaler(
            self.calls,
            self.fleet,
            self.quota,
            self.fleet.quota,
            web_stats=self.gateway.stats,
            tell=lambda app_id, text: self.logs.system(app_id, text),
        )
        # --- broker: nodes bought from providers ($STRATO_HOME/providers.toml)
        from strato.providers.config import ConfigWatch, config_path

        from .broker.service import Broker

        self.broker = Broker(
            ConfigWatch(config_path(config.home)),
            self.fleet,
            self.calls,
            home=config.home,
            channel=f"unix:{config.channel_socket}",
            token=self.token,
            tell=lambda app_id, text: self.logs.system(app_id, text),
            unmet=self.scaler.unmet,  # containers the autoscaler wants and no node took
        )
        self.fleet.supply = self.broker.can_supply
        from .metering import Meter

        self.meter = Meter(self.store)  # usage per container, durable
        self.fleet.meter = self.meter
        self.apps = Apps(
            self.store,
            self.blobs,
            self.calls,
            self.fleet,
            self.gateway,
            self.scaler,
            self.quota,
            self.logs,
            self._wake.set,
            app_ws=self.workspaces.app_ws,
        )
        self.api: Router | None = None  # set by api.routes.build_app
        self.sandboxes: Sandboxes | None = None  # set by api/routes_sandboxes.py
        self._tasks: list[asyncio.Task] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._closing = False
        self.agents: AgentListener | None = None  # --- cluster: agents of other machines

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        stale = self.store.stop_live_containers("the control plane restarted")
        if stale:
            log.info("marked %d containers of an earlier run as stopped", len(stale))
        self.apps.recover()
        self.meter.recover()  # --- broker: usage rows an earlier run left open
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
        await self.gateway.start()  # web endpoints
        from .cluster.agents import agent_listener  # --- cluster: joined worker agents

        self.agents = agent_listener(self)
        if self.agents is not None:
            await self.agents.start()
        self._tasks.append(asyncio.create_task(self._scale_loop(), name="scale-loop"))
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))

    def spawn_loop(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a background loop of a feature until ``close()`` (on the running loop)."""
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for srv in self._servers:
            srv.close()
        if self.agents is not None:  # --- cluster
            self.agents.close()
        self.broker.close()  # --- broker: its nodes are given back
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

    async def _on_channel(self, reader, writer, via_node: str | None = None) -> None:
        """One channel connection (``via_node``: relayed by that node's joined agent,
        see ``cluster/relay.py``; only its own containers may speak over it). Every frame
        is hostile until proven otherwise: the first one (before the peer has shown a
        secret) may be at most ``frames.HELLO_MAX_FRAME``; a frame that is too large,
        does not decode, fails a range check or is not a message that peer may send ends
        that connection (and a container's session), logged, and nothing else."""
        peer = Peer(writer)
        adopted = False  # a web tunnel: the gateway owns the connection now
        try:
            first = await asyncio.wait_for(frames.read_frame(reader, frames.HELLO_MAX_FRAME), 10.0)
            if via_node is not None and not self._relayed_hello(first, via_node):
                # --- cluster: a relayed connection carries a container's channel or web
                # tunnel only, and only for a container of the relaying node
                log.warning("relay of %s: first frame %s refused", via_node, type(first).__name__)
            elif isinstance(first, m.WorkerHello):
                if not hmac.compare_digest(first.token.encode(), self.token.encode()):
                    log.warning("channel: a worker hello with a wrong token; closed")
                    return
                await self._worker_loop(first, peer, reader)
            elif isinstance(first, m.ContainerHello):
                await self._container_loop(first, peer, reader, via_node)
            elif isinstance(first, m.ClientHello):  # a local client's API requests
                try:
                    caller = await self.workspaces.authenticate(
                        first.token.encode(), first.workspace or None
                    )
                    refusal = None
                except exc.AuthError as e:  # a valid token, a workspace it may not act in
                    caller, refusal = INSTALLATION, e
                if caller is None and not first.token.startswith("st_"):
                    log.warning("channel: a client hello with a wrong token; closed")
                    return
                if caller is None:  # a workspace token, revoked or wrong: told, as HTTP's 401
                    refusal = exc.AuthError("wrong or revoked token: set STRATO_TOKEN to another")
                    caller = INSTALLATION  # (every request is refused)
                await self._client_loop(peer, reader, caller, refusal)
            elif isinstance(first, m.WebTunnelHello):  # a web endpoint's tunnel: raw HTTP now
                adopted = self.gateway.adopt_tunnel(first, writer)
            elif isinstance(first, m.SbTunnelHello) and self.sandboxes is not None:
                await self.sandboxes.tunnels.on_hello(first, reader, writer)  # sandbox port
            elif first is not None:
                log.warning("channel: first frame %s is not a hello; closed", type(first).__name__)
        except frames.FrameError as e:
            log.warning("channel: dropped a peer before its hello: %s", e)
        except (TimeoutError, ConnectionError) as e:
            log.debug("channel closed: %s", e)
        finally:
            if not adopted:
                peer.close()

    def _relayed_hello(self, first: object, via_node: str) -> bool:
        if isinstance(first, m.ContainerHello):
            return True  # (_container_loop checks its node)
        if isinstance(first, (m.WebTunnelHello, m.SbTunnelHello)):
            s = self.fleet.container(first.container_id)
            return s is not None and s.node_id == via_node
        return False

    async def agent_session(
        self, hello: m.WorkerHello, peer: Peer, reader, join_token_id: str
    ) -> None:
        """--- cluster: a worker agent that joined over TCP (``cluster/agents.py``) with
        the join token ``join_token_id``: a local agent's messages plus the relay of its
        containers' channel connections; its welcome carries its node's credential."""
        from .cluster.relay import RelayHub

        assert self.agents is not None  # (its listener called)
        credentials = self.agents.credentials
        await self._worker_loop(
            hello,
            peer,
            reader,
            credential=lambda node_id: credentials.issue(node_id, join_token_id),
            relay=RelayHub,
        )

    async def _worker_loop(
        self, hello: m.WorkerHello, peer: Peer, reader, credential=None, relay=None
    ) -> None:
        node_id = self.fleet.worker_hello(hello, peer, credential=credential)
        hub = None
        if relay is not None:  # --- cluster: its containers' connections, relayed
            hub = relay(node_id, peer.send, lambda r, w: self._on_channel(r, w, via_node=node_id))
        try:
            while (msg := await frames.read_frame(reader, self.worker_max_frame)) is not None:
                if hub is not None and isinstance(msg, (m.RelayOpen, m.RelayData, m.RelayClose)):
                    self.fleet.on_worker_message(node_id, None)  # it is alive
                    await hub.on_frame(msg)
                elif isinstance(msg, m.Logs):
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
            if hub is not None:
                await hub.close()

    async def _client_loop(
        self, peer: Peer, reader, caller: Caller, refusal: exc.AuthError | None
    ) -> None:
        """A client on this machine that showed a token: its API requests, as over HTTP
        (bodies as large as HTTP's) as ``caller``, and nothing else (each refused with
        ``refusal`` if given)."""
        assert self.api is not None, "build_app(cp) wires the API before clients dial"
        requests = ChannelRequests(self.api, peer, caller=caller, refusal=refusal)
        limit = self.api.max_body + (1 << 16)
        transport: Any = getattr(peer.writer, "transport", None)
        pending: bytearray | None = getattr(reader, "_buffer", None)  # (what came with the hello)
        if pending is not None and hasattr(transport, "set_protocol"):
            # from here on its frames are parsed as they arrive (no reader task per frame)
            frames_in = ClientFrames(requests, limit, transport)
            buffered = bytes(pending)
            pending.clear()
            transport.set_protocol(frames_in)
            if getattr(reader, "_paused", False):  # (its buffer was full)
                transport.resume_reading()
            try:
                if buffered:
                    frames_in.data_received(buffered)
                if reader.at_eof() or transport.is_closing():
                    return
                await frames_in.done
            finally:
                requests.close()
            return
        try:
            while (msg := await frames.read_frame(reader, limit)) is not None:
                if not isinstance(msg, m.ApiRequest):
                    raise frames.FrameError(f"a client may not send {type(msg).__name__}")
                await requests.take(msg)
        except frames.FrameError as e:
            log.warning("channel: dropped a client: %s", e)
        finally:
            requests.close()

    def _route_logs(self, lines: list[m.LogLine]) -> None:
        by_app: dict[str, list[m.LogLine]] = {}
        for line in lines:
            s = self.fleet.container(line.container_id)
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

    async def _container_loop(
        self, hello: m.ContainerHello, peer: Peer, reader, via_node: str | None = None
    ) -> None:
        known = self.fleet.container(hello.container_id)
        if via_node is not None and (known is None or known.node_id != via_node):
            # --- cluster: a relaying agent speaks only for the containers of its node
            log.warning(
                "relay of %s: a hello for container %r of another node",
                via_node,
                hello.container_id,
            )
            peer.send(m.StopContainer(0.0))
            return
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
        assert self.api is not None, "build_app(cp) wires the API before containers dial"
        requests = ChannelRequests(self.api, peer, s, uploads)  # its own API calls
        # --- sandboxes: a sandbox's agent may send only its own frames (no API requests)
        sandbox = self.sandboxes if self.sandboxes and self.sandboxes.owns(s) else None
        try:
            while (msg := await frames.read_frame(reader, self.max_frame)) is not None:
                if sandbox is not None and not isinstance(msg, m.ContainerReady):
                    sandbox.on_frame(s, msg)  # (raises FrameError for any other message)
                elif isinstance(msg, m.TaskOutputs):
                    sizes = {}  # of values that came in chunks, written off the loop
                    for i, o in enumerate(msg.outputs):
                        if o.blob is not None:
                            sizes[i] = (await uploads.take_async(o.blob))[1]
                        elif o.data is not None and (
                            self.config.blob_threshold < len(o.data) <= self.config.max_payload
                        ):  # a large value sent inline: hashed and written off the loop too
                            key = await self.blobs.aput(o.data)
                            msg.outputs[i] = msgspec.structs.replace(o, data=None, blob=key)
                            sizes[i] = len(o.data)
                    self.calls.on_outputs(s, msg.outputs, sizes)
                elif isinstance(msg, m.BlobChunk):
                    await uploads.chunk_async(msg.data, msg.last)
                elif isinstance(msg, m.ApiRequest):
                    await requests.take(msg)
                elif isinstance(msg, m.ContainerReady):
                    self.fleet.container_ready(s)
                    self.gateway.container_ready(s)
                elif isinstance(msg, m.ContainerInitFailed):
                    self.fleet.container_init_failed(s, msg)
                else:
                    raise frames.FrameError(f"a container may not send {type(msg).__name__}")
        except (frames.FrameError, InvalidError, TimeoutError) as e:
            # a container runs the user's code: a bad frame ends it, and only it
            log.warning("channel: dropping container %s: %s", s.container_id, e)
            why = f"it sent a malformed frame ({e})"
            if isinstance(e, TimeoutError):  # the blob threads did not keep up with it
                why = "a chunked value it sent was not written in time"
            elif isinstance(e, frames.FrameTooLarge):
                why = (
                    f"it sent a frame over the channel limit of {self.max_frame} bytes "
                    "(STRATO_MAX_FRAME); return large data through a Volume"
                )
            self.logs.system(s.app_id, f"container dropped: {why}", s.container_id)
            self.fleet.kill(s.container_id, why)
        finally:
            requests.close()
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
        for step in (
            self.calls.check_timeouts,
            self.fleet.check_startups,
            self.gateway.tick,
            self.scaler.tick,
            self.broker.tick,  # --- broker
            self.meter.tick,
        ):
            try:
                step(now)
            except Exception:  # each step on its own: one bug must not stop scaling
                log.exception("scaling step %s failed", getattr(step, "__name__", step))

    async def _housekeeping(self) -> None:
        last_expiry = 0.0
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            try:
                self.apps.stop_silent(now, self.config.ephemeral_app_timeout_s)
                if now - last_expiry > EXPIRY_EVERY_S:
                    last_expiry = now
                    n = await self.store.queue_expire(time.time())  # off the loop
                    if n:
                        log.info("expired %d calls past their retention", n)
            except Exception:
                log.exception("housekeeping failed")


def default_http_url(config: ServerConfig) -> str:
    return f"http://{config.host}:{config.port}"


def server_info_path(home: Path) -> Path:
    return home / "server.json"
