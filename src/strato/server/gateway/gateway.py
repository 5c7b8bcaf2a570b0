"""The web gateway: one HTTP listener inside the control plane that routes each request
to a container of its endpoint.

- **Routing** (``routes.py``): ``/<app>/<label>/...`` and ``<app>-<label>.localhost``,
  by app name and label, so URLs survive redeploys.
- **Transport**: a web container dials the control plane's channel socket (the one it
  already reaches, even with ``block_network=True``) several times, sends a
  ``WebTunnelHello`` on each, and then serves raw HTTP/1.1 on those connections with its
  own server (uvicorn's protocol for ASGI/WSGI/FastAPI, a byte pipe to the user's port
  for ``web_server``). The gateway adopts each as an ``Upstream`` and pools it: a tunnel
  carries one request at a time, keep-alive. The container dials a new tunnel whenever
  one is first used, so spare ones are always ready.
- **Scaling** (``endpoint.py``): requests wait in the gateway (FIFO, at most
  ``STRATO_WEB_MAX_WAITING``, at most ``STRATO_WEB_WAIT_TIMEOUT`` seconds, then a 503)
  while no container has a free slot; the control plane's autoscaler sees them as queued
  and the slots in use as in flight (``stats()``), against the ``@concurrent`` target. A
  request to an endpoint at zero wakes the scaler at once.
- **Redeploys** (``retire_app``): the replaced version's containers are not killed; they
  serve until the new version has a ready container, finish what they carry, then stop.
- **Limits**: the listener's connection limit, header read timeout, head size and count
  (431) and keep-alive timeout (``server/listeners.py``, ``ConnectionGuard``); bodies over
  ``STRATO_WEB_MAX_BODY`` get a 413; requests unanswered after ``STRATO_WEB_HTTP_LIMIT``
  (150 s) a 303 to their result (``results.py``, an unguessable id);
  ``requires_auth`` endpoints a 401 without ``Strato-Token: <web token>``.
- **Routes are unique across apps** (``check_app``): an app whose URLs another live app
  serves is refused (``RouteConflictError``).
- **Logs** (``access.py``): one access line per request in the app's logs, with the
  request id every response carries.
- **Sandbox tunnels** (``sandbox_tunnels.py``, ``server/sandboxes/tunnels.py``): a
  connection whose first request names ``<sandbox-id>-<port>.tunnel.<domain>`` is handed,
  its head included, to that sandbox port as raw bytes both ways (HTTP, WebSockets); the
  limits above apply to that head, the sandbox's tunnel limits after it.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from strato.exceptions import InvalidError, NotFoundError, RouteConflictError
from strato.protocol import messages as m

from .. import metrics
from ..autoscaler import FunctionStats
from ..containers import ContainerState
from ..listeners import ConnectionGuard
from ..scheduler import explain_unplaceable, place
from .access import AccessLog
from .config import TOKEN_HEADER, GatewayConfig
from .endpoint import CallsView, ContainerView, Endpoint, FleetView, FunctionView
from .exchange import Exchange, Phase
from .proxy import ClientConn
from .results import DeferredResult, ResultStore
from .routes import RouteTable, route_name, tunnel_host, web_name
from .sandbox_tunnels import SandboxTunnels, TunnelsView
from .upstream import adopt
from .wire import error_body, simple_response

log = logging.getLogger("strato.gateway")
_spec_decoder = msgspec.msgpack.Decoder(m.FunctionSpec)

SWEEP_EVERY_S = 2.0
RESULTS_PREFIX = "/__strato/results/"
SPARE_TUNNELS_MAX = 64  # tunnels a container may hold beyond twice its request slots
RETIRED_IDLE_S = 30.0  # a replaced version's idle container, while the new one cannot serve


class StoreView(Protocol):
    """What the gateway reads of the store: live apps and their functions' specs."""

    def apps(self) -> list[dict[str, Any]]: ...
    def functions_of(self, app_id: str) -> list[dict[str, Any]]: ...


class LogSink(Protocol):
    def append(self, app_id: str, lines: list[m.LogLine]) -> None: ...


class Gateway(SandboxTunnels):
    def __init__(
        self,
        config: GatewayConfig,
        *,
        calls: CallsView,
        fleet: FleetView,
        store: StoreView,
        logs: LogSink,
        wake: Callable[[], None],
    ) -> None:
        self.config = config
        self.calls = calls
        self.fleet = fleet
        self.store = store
        self._wake = wake  # wakes the control plane's scaling loop
        self.routes = RouteTable()
        self.endpoints: dict[str, Endpoint] = {}
        self.results = ResultStore(config.result_ttl_s, config.result_max_bytes)
        self.access_log = AccessLog(logs.append)
        self.guard: ConnectionGuard[ClientConn] = ConnectionGuard("web gateway", config.limits)
        self.url = ""
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._rid_prefix = "wr-" + secrets.token_hex(3) + "-"
        self._rid = itertools.count(1)
        self._last_sweep = 0.0
        self.tunnels: TunnelsView | None = None  # set where sandboxes are served
        self._spliced: set[asyncio.Task[None]] = set()  # connections in a sandbox tunnel

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen, and route the web endpoints of every live app in the store."""
        for row in self.store.apps():
            if row["state"] != "stopped":
                name = web_name(row["workspace"], row["name"])
                self._register(row["app_id"], name, row["state"] == "deployed")
        if not self.config.enabled:
            return
        sock = self._bind()
        self.port = sock.getsockname()[1]
        host = self.config.host if self.config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        self.url = self.config.public_url or f"http://{host}:{self.port}"
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConn(self), sock=sock, backlog=self.config.limits.backlog
        )
        log.info("web gateway listening on %s", self.url)

    def _bind(self) -> socket.socket:
        cfg = self.config
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.host, cfg.port))
        except OSError as e:
            if cfg.port_explicit:
                sock.close()
                raise OSError(f"the web gateway cannot listen on port {cfg.port}: {e}") from e
            log.info("port %s is taken; the web gateway takes a free one", cfg.port)
            sock.bind((cfg.host, 0))
        sock.listen(cfg.limits.backlog)
        sock.setblocking(False)
        return sock

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.guard.stop()
        for task in self._spliced:
            task.cancel()
        for conn in list(self.guard.conns):
            if conn.transport is not None:
                conn.transport.close()
        self.access_log.flush()

    def next_rid(self) -> str:
        return f"{self._rid_prefix}{next(self._rid):x}"

    # ------------------------------------------------------------------ apps

    def check_app(
        self, specs: list[m.FunctionSpec], name: str | None = None, deployed: bool = False
    ) -> None:
        """Refuse an app whose web endpoints share a label, or whose URLs another live
        app (of another name) already serves: URLs are unique across apps."""
        labels = [s.web.label for s in specs if s.web is not None]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise InvalidError(
                f"two web endpoints of the app share the label {sorted(dup)[0]!r}; "
                "give one another label= (URLs are /<app>/<label>)"
            )
        clash = self.routes.conflict(name, deployed, labels)
        if clash is not None:
            raise RouteConflictError(
                f"app {name!r} cannot serve its web endpoints: app {clash.other_app!r} "
                f"({clash.other_app_id}) already serves {clash.what}; web URLs are unique "
                f"across apps. Give the app another name, or the endpoint another label=, "
                f"or stop the other app first (`strato app stop {clash.other_app}`)"
            )

    def app_created(self, app_id: str, name: str | None, deployed: bool) -> None:
        self._register(app_id, name, deployed)

    def _register(self, app_id: str, name: str | None, deployed: bool) -> None:
        specs = []
        for row in self.store.functions_of(app_id):
            spec = _spec_decoder.decode(row["spec"])
            if spec.web is not None:
                specs.append((row["function_id"], spec))
        if not specs:
            return
        self.routes.add_app(app_id, name, deployed, specs)
        for fid, _ in specs:
            self._endpoint(fid)
        self._wake()  # min_containers of a web endpoint

    def retire_app(self, app_id: str) -> set[str]:
        """The app stops: unroute it. Where a newer app now serves its routes (a
        redeploy, a reload), its containers drain into the successor instead of being
        killed; their ids are returned. Elsewhere waiting requests get a 503."""
        entry = self.routes.remove_app(app_id)
        if entry is None:
            return set()
        keep: set[str] = set()
        now = time.monotonic()
        for label, route in entry.labels.items():
            ep = self.endpoints.get(route.function_id)
            if ep is None:
                continue
            nxt = self.routes.current(entry.name, label)
            succ = self._endpoint(nxt.function_id) if nxt is not None else None
            if succ is None or succ is ep:
                for ex in list(ep.waiters):
                    ex.respond(503, "the app serving this endpoint was stopped")
                ep.waiters.clear()
                self.endpoints.pop(ep.function_id, None)  # its containers are killed
                continue
            ep.successor, ep.retired_at = succ, now
            succ.previous.append(ep)
            while ep.waiters:
                ex = ep.waiters.popleft()
                ex.endpoint = succ
                succ.waiters.append(ex)
            succ.pump()
            keep |= {c.container_id for c in self.fleet.containers_of(ep.function_id)}
        if keep:
            self._wake()
        return keep

    def web_url(self, app_id: str, name: str | None, deployed: bool, spec) -> str | None:
        if spec is None or spec.web is None or not self.url:
            return None
        return f"{self.url}/{route_name(app_id, name, deployed)}/{spec.web.label}"

    def _endpoint(self, function_id: str) -> Endpoint | None:
        ep = self.endpoints.get(function_id)
        if ep is None:
            try:
                fn = self.calls.function(function_id)
            except NotFoundError:
                return None
            ep = self.endpoints[function_id] = Endpoint(fn, self.config.max_waiting)
        return ep

    # ------------------------------------------------------------------ requests

    def begin(self, ex: Exchange) -> None:
        """Route a request whose head has arrived, and send it on or make it wait."""
        url = ex.url
        q = url.find(b"?")
        path = (url if q < 0 else url[:q]).decode("latin-1")
        tunnel = tunnel_host(ex.host) if ex.host else None
        if tunnel is not None:
            self._tunnel(ex, *tunnel)
            return
        if path.startswith("/__strato/"):
            self._internal(ex, path)
            return
        route = self.routes.resolve_host(ex.host) if ex.host else None
        if route is not None:
            ex.target = url or b"/"
        else:
            found = self.routes.resolve_path(path)
            if found is None:
                ex.respond(404, f"no web endpoint is served at {path[:200]}")
                return
            route, n = found
            rest = url[n:]
            ex.target = rest if rest.startswith(b"/") else b"/" + rest
            ex.prefix = url[:n]
        ex.route = route
        if route.requires_auth and not self._authorized(ex):
            ex.respond(
                401,
                "this endpoint requires authentication: send the web token in a "
                "Strato-Token header (STRATO_WEB_TOKEN or $STRATO_HOME/web_token)",
            )
            return
        if ex.content_length is not None and ex.content_length > self.config.max_body:
            ex.respond(
                413,
                f"the request body ({ex.content_length} bytes) is over the gateway's limit "
                f"of {self.config.max_body} bytes (STRATO_WEB_MAX_BODY)",
            )
            return
        ep = self.endpoints.get(route.function_id) or self._endpoint(route.function_id)
        if ep is None:
            ex.respond(503, "the endpoint's function is gone")
            return
        ex.endpoint = ep
        self.calls.note_arrival(ep.function_id)
        loop = asyncio.get_running_loop()
        if not ex.upgrade:
            ex.limit_handle = loop.call_later(self.config.http_limit_s, ex.limit_reached)
        if not ep.waiters:
            got = ep.pick()
            if got is not None:
                ex.bind(*got)
                return
        if not ep.waiters and self._cannot_start(ex, ep):
            return
        if len(ep.waiters) >= ep.max_waiting:
            ex.respond(
                503,
                f"{len(ep.waiters)} requests already wait for this endpoint's containers "
                "(STRATO_WEB_MAX_WAITING)",
            )
            return
        ex.wait(ep, self.config.wait_timeout_s)
        self._wake()  # from zero: start a container now, not at the next tick

    def _authorized(self, ex: Exchange) -> bool:
        want = self.config.token.encode()
        for name, value in ex.headers:
            if name == TOKEN_HEADER and hmac.compare_digest(value.strip(), want):
                return True
        return False

    def _internal(self, ex: Exchange, path: str) -> None:
        if path == "/__strato/health":
            body = b'{"ok": true}'
            ex.respond_raw(200, simple_response(200, body, ex.rid))
            return
        if not path.startswith(RESULTS_PREFIX):
            ex.respond(404, f"no such gateway path: {path[:200]}")
            return
        result_id = path[len(RESULTS_PREFIX) :]
        entry = self.results.get(result_id)
        # a result bound to another credential is as unknown as one that never was
        if entry is None or not entry.allows(ex.headers):
            ex.respond(
                404,
                f"no result {result_id[:64]} (results are kept {self.config.result_ttl_s:g}s "
                "after they complete, STRATO_WEB_RESULT_TTL; a result of an endpoint that "
                "requires authentication needs the Strato-Token of its request)",
            )
            return
        if entry.done:
            self._send_result(ex, entry)
            return
        ex.fetching()
        loop = asyncio.get_running_loop()

        def ready() -> None:
            timer.cancel()
            if ex.phase is Phase.FETCHING:
                self._send_result(ex, entry)

        def again() -> None:
            try:
                entry.waiters.remove(ready)
            except ValueError:
                pass
            if ex.phase is not Phase.FETCHING:
                return
            ex.respond_raw(
                303,
                simple_response(
                    303,
                    error_body(303, "still running; fetch its result here", entry.rid),
                    ex.rid,
                    extra=[(b"location", path.encode()), (b"retry-after", b"1")],
                ),
            )

        timer = loop.call_later(self.config.http_limit_s, again)
        entry.waiters.append(ready)

    def _send_result(self, ex: Exchange, entry: DeferredResult) -> None:
        if entry.overflow:
            ex.respond(
                502,
                f"the result was over {self.config.result_max_bytes} bytes "
                "(STRATO_WEB_RESULT_MAX) and was not kept",
            )
            return
        ex.respond_raw(entry.status, entry.body(), close=True)

    def access(self, ex: Exchange, status: int, note: str | None = None) -> None:
        route = ex.route
        ms = (time.monotonic() - ex.t0) * 1000
        metrics.gateway_request(route.app_id if route else None, status, ms / 1000)
        if route is None:
            return  # no app to log it in (an unknown URL)
        cid = ex.backend.container_id if ex.backend is not None else "gateway"
        text = (
            f"{ex.method.decode('latin-1')} {ex.url[:300].decode('latin-1')} {status} "
            f"{ms:.1f}ms rid={ex.rid}"
        )
        if note:
            text += f" ({note})"
        self.access_log.add(route.app_id, cid, text)

    # ------------------------------------------------------------------ tunnels

    def adopt_tunnel(self, hello: m.WebTunnelHello, writer: asyncio.StreamWriter) -> bool:
        """A container's tunnel connection: pool it as an upstream of its endpoint."""
        s = self.fleet.container(hello.container_id)
        if s is None or not hmac.compare_digest(s.token, hello.token):
            return False
        if s.state in (ContainerState.KILLING, ContainerState.GONE):
            return False
        ep = self._endpoint(s.function_id)
        if ep is None:
            return False
        b = ep.backend_for(s)
        if b.tunnels >= 2 * ep.slots + SPARE_TUNNELS_MAX:
            # a container keeps one per request in flight and a few spares: more is one
            # taking the channel's share of the open files from the others
            log.warning("container %s dials too many web tunnels; refused", s.container_id)
            return False
        up = adopt(b, writer)
        b.tunnels += 1
        b.idle.append(up)
        if s.state == ContainerState.READY:
            ep.pump_all()
        return True

    def container_ready(self, container: ContainerView) -> None:
        ep = self.endpoints.get(container.function_id)
        if ep is not None:
            ep.pump_all()

    # ------------------------------------------------------------------ scaling

    def stats(self, fn: FunctionView, now: float) -> FunctionStats:
        """What the autoscaler sees of a web function: waiting requests as queued,
        requests in flight as running inputs."""
        ep = self.endpoints.get(fn.function_id)
        queued, inflight = ep.load() if ep is not None else (0, 0)

        def load(c: ContainerView) -> tuple[int, float | None]:
            b = ep.backends.get(c.container_id) if ep is not None else None
            return (b.inflight, b.idle_since) if b is not None else (0, c.idle_since)

        containers = self.fleet.container_stats(fn.function_id, load)
        return FunctionStats(now=now, queued=queued, inflight=inflight, containers=containers)

    def tick(self, now: float) -> None:
        """From the scaling loop: keep waiting endpoints in the scaler's eye, fail the
        waiters of endpoints whose containers cannot start, drain replaced versions."""
        for ep in list(self.endpoints.values()):
            if ep.waiters:
                self.calls.note_arrival(ep.function_id, now)
                self._fail_if_backing_off(ep, now)
            if ep.successor is not None:
                self._drain(ep, now)
            ep.forget_gone()
        if now - self._last_sweep > SWEEP_EVERY_S:
            self._last_sweep = now
            self.results.sweep(now)

    def _fail_if_backing_off(self, ep: Endpoint, now: float) -> None:
        if self.fleet.live_containers_of(ep.function_id) or ep.previous:
            return
        if not self.fleet.backing_off(ep.function_id, now):
            why = self.never_placeable(ep)
            if why is not None:
                self._fail_waiters(ep, why)
            return
        self._fail_waiters(
            ep,
            "the endpoint's containers fail to start (its start-up code raised or its "
            "server did not come up); see `strato app logs` for the error",
        )

    def _fail_waiters(self, ep: Endpoint, why: str) -> None:
        for ex in list(ep.waiters):
            ex.respond(503, why)
        ep.waiters.clear()

    def never_placeable(self, ep: Endpoint) -> str | None:
        """Why no node of the cluster could ever run a container of ``ep`` (not even one
        with nothing on it: a GPU type or a size no node has, and none the broker could
        buy), or None. Asked only while
        the endpoint has no container, so it costs nothing on the warm path."""
        nodes = [v.emptied() for v in self.fleet.live_views()]
        if not nodes:  # no worker agent yet (or none connected): it may come
            return None
        request = self.fleet.request_for(ep.fn.spec)
        if place(request, nodes) is not None:
            return None
        supply = self.fleet.supply  # --- broker: a node can be bought for it (then it waits)
        if supply is not None and supply(request, ep.fn.spec.nonpreemptible):
            return None
        why = explain_unplaceable(request, nodes)
        return f"no node of this cluster can run {ep.fn.spec.name}: {why}"

    def _cannot_start(self, ex: Exchange, ep: Endpoint) -> bool:
        """Answer 503 at once (the reason in the access line, so in the app's logs) when
        the endpoint has no container and none can ever be placed, as ``.remote()``
        fails at once."""
        if ep.backends or ep.previous or self.fleet.live_containers_of(ep.function_id):
            return False
        why = self.never_placeable(ep)
        if why is None:
            return False
        ex.respond(503, why)
        return True

    def _drain(self, ep: Endpoint, now: float) -> None:
        """A replaced version: stop its containers once the new one serves (or nobody
        waits), each when it has nothing in flight; all of them after the drain limit."""
        succ = ep.successor
        assert succ is not None
        head = succ
        while head.successor is not None:
            head = head.successor
        serving = head.has_ready()
        overdue = now - (ep.retired_at or now) > self.config.drain_timeout_s
        for s in self.fleet.live_containers_of(ep.function_id):
            b = ep.backends.get(s.container_id)
            idle_since = b.idle_since if b is not None else s.started_at
            if b is not None and b.inflight > 0 and not overdue:
                continue
            # idle: stop it once the new version serves; while it does not (it may be
            # starting, or failing to), keep it warm for a while unless nobody asks
            lingering = not head.waiters and now - (idle_since or now) > RETIRED_IDLE_S
            if overdue or serving or lingering:
                self.fleet.stop(s.container_id)
        if not self.fleet.containers_of(ep.function_id) and not ep.backends:
            if ep in succ.previous:
                succ.previous.remove(ep)
            self.endpoints.pop(ep.function_id, None)
