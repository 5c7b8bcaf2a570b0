"""The dashboard (``/ui``) and the metrics endpoint (``/metrics``) on the API's port.

:func:`with_ops` wraps the API's ASGI router: requests under ``/ui`` and to ``/metrics``
are served here, everything else goes to the router untouched (one string comparison
per request). Pages are rendered on the server with Jinja2 templates; htmx and its SSE
extension swap in fragments the server streams (state changes, log lines), and uPlot
draws the charts; all three are vendored under ``static/vendor`` (no build step, no
network at install or run time)."""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import logging
import mimetypes
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from strato import settings
from strato.exceptions import Error, NotFoundError, PermissionDeniedError

from .. import metrics
from ..store.tables_workspaces import DEFAULT_WORKSPACE
from ..workspaces import Caller
from . import views
from .auth import Auth
from .http import (
    BodyTooLarge,
    Receive,
    Request,
    Response,
    Scope,
    Send,
    redirect,
    sse_event,
    stream_events,
    text,
)
from .series import Sampler

if TYPE_CHECKING:
    from ..control import ControlPlane

log = logging.getLogger("strato.dashboard")

HERE = Path(__file__).parent
STATIC = HERE / "static"
LOOPBACK = ("127.0.0.1", "::1", "localhost")
STATE_EVERY_S = 1.0  # how often a state stream compares what it shows with what is
Handler = Callable[[Request, Send], Awaitable[Response | None]]


class Ops:
    """ASGI: ``/metrics`` and ``/ui/...`` here, the rest to the API router."""

    def __init__(self, api: Any, cp: ControlPlane) -> None:
        self.api = api
        self.cp = cp
        self.metrics = metrics.install(cp)
        self.open_loopback = settings.METRICS_OPEN_LOOPBACK.get()
        self.auth = Auth(cp.token, cp.workspaces)
        # the server says when it shuts down (server/main.py): streams end then
        self.stopping: Callable[[], bool] = lambda: cp._closing
        self.sampler = Sampler(cp)
        cp.spawn_loop(self.sampler.run(), "dashboard-series")
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"]),
            enable_async=False,
        )
        self.env.globals["object_routes"] = lambda: views.object_routes(cp)
        self.env.filters["clock"] = lambda ts: time.strftime("%H:%M:%S", time.localtime(ts))
        self._routes: list[tuple[str, re.Pattern[str], Handler, bool]] = []
        r = self._route
        r("GET", "/ui", self.page_apps)
        r("GET", "/ui/apps/{app_id}", self.page_app)
        r("POST", "/ui/apps/{app_id}/stop", self.stop_app)
        r("GET", "/ui/calls/{call_id}", self.page_call)
        r("GET", "/ui/containers", self.page_containers)
        r("GET", "/ui/containers/{container_id}", self.page_container)
        r("POST", "/ui/containers/{container_id}/stop", self.stop_container)
        r("GET", "/ui/nodes", self.page_nodes)
        r("GET", "/ui/objects/{kind}", self.page_objects)
        r("GET", "/ui/sse/state", self.sse_state)
        r("GET", "/ui/sse/logs", self.sse_logs)
        r("GET", "/ui/sse/series", self.sse_series)
        r("POST", "/ui/logout", self.logout)

    def _route(self, method: str, path: str, handler: Handler, auth: bool = True) -> None:
        pattern = re.compile("^" + re.sub(r"{(\w+)}", r"(?P<\1>[^/]+)", path) + "$")
        self._routes.append((method, pattern, handler, auth))

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == "/metrics":
                return await self._metrics(Request.of(scope, receive), send)
            if path == "/ui" or path.startswith("/ui/"):
                return await self._ui(Request.of(scope, receive), send)
        await self.api(scope, receive, send)

    async def _metrics(self, req: Request, send: Send) -> None:
        if req.method != "GET":
            return await text("use GET /metrics", 405).send(send)
        if not (self.open_loopback and req.client_host in LOOPBACK) and not self.auth.operator(req):
            return await text(
                "missing or wrong token: send Authorization: Bearer <token> "
                "($STRATO_HOME/token), or set STRATO_METRICS_OPEN_LOOPBACK=1 for a "
                "scraper on this host",
                401,
            ).send(send)
        body = await asyncio.to_thread(self.metrics.exposition)
        await Response(body, content_type=metrics.CONTENT_TYPE).send(send)

    async def _ui(self, req: Request, send: Send) -> None:
        path = req.path
        try:
            if path.startswith("/ui/static/"):
                return await self._static(path[len("/ui/static/") :]).send(send)
            if path == "/ui/login":
                return await (await self.login(req)).send(send)
            for method, pattern, handler, auth in self._routes:
                match = pattern.match(path.rstrip("/") or path)
                if match is None:
                    continue
                if method != req.method:
                    continue
                caller = await self.auth.caller(req) if auth else None
                if auth and caller is None:
                    if method == "GET" and not path.startswith("/ui/sse/"):
                        return await redirect("/ui/login?next=" + quote(path)).send(send)
                    return await text("log in first: /ui/login", 401).send(send)
                if method == "POST" and not await self.auth.csrf_ok(req):
                    return await text("missing or wrong CSRF token; reload the page", 403).send(
                        send
                    )
                self.sampler.viewed()
                req.path_params = match.groupdict()
                if caller is not None:
                    req.caller = caller
                    await self._may(req, handler)
                out = await handler(req, send)
                if out is not None:
                    await out.send(send)
                return
            await self._page(req, "error.html", status=404, message=f"no page {path}").send(send)
        except NotFoundError as e:
            await self._page(req, "error.html", status=404, message=str(e)).send(send)
        except PermissionDeniedError as e:
            await self._page(req, "error.html", status=403, message=str(e)).send(send)
        except BodyTooLarge as e:
            await text(str(e), 413).send(send)
        except Error as e:
            await self._page(req, "error.html", status=400, message=str(e)).send(send)

    async def _may(self, req: Request, handler: Handler) -> None:
        """Refuse what the logged-in token may not see or do: a workspace's token sees
        only its workspace's apps, calls and containers (another's answer as missing
        ones), never the nodes; a read-only one stops nothing."""
        who, cp = req.caller, self.cp
        if who.operator:
            return
        view, ident = req.query.get("view", ""), req.query.get("id", "")
        if handler == self.page_nodes or view == "nodes":
            raise PermissionDeniedError(
                "the nodes are the installation's: log in with its token ($STRATO_HOME/token)"
            )
        if req.method == "POST" and handler != self.logout and not who.may("write"):
            raise PermissionDeniedError(f"a {who.role} token changes nothing")
        p = {**req.query, **req.path_params}
        mine = cp.workspaces.app_ws
        app_id = ident if view == "app" else p.get("app_id") or p.get("app")
        if app_id and mine.get(app_id, DEFAULT_WORKSPACE) != who.workspace:
            raise NotFoundError(f"no app {app_id}")
        cid = ident if view == "container" else p.get("container_id") or p.get("container")
        if cid:
            c = await views.container(cp, cid)
            if mine.get(c["app_id"], DEFAULT_WORKSPACE) != who.workspace:
                raise NotFoundError(f"no container {cid}")
        call_id = ident if view == "call" else p.get("call_id")
        if call_id:
            owners = await cp.calls.call_owner(call_id)
            if owners is None or mine.get(owners[0], DEFAULT_WORKSPACE) != who.workspace:
                raise NotFoundError(f"call {call_id} does not exist (or has expired)")

    def _static(self, name: str) -> Response:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?", name) or ".." in name:
            return text("not found", 404)
        path = STATIC / name
        if not path.is_file():
            return text("not found", 404)
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        resp = Response(path.read_bytes(), content_type=ctype)
        resp.headers.append((b"cache-control", b"max-age=3600"))
        return resp

    def _page(self, req: Request, template: str, status: int = 200, **ctx: Any) -> Response:
        body = self.env.get_template(template).render(
            csrf=self.auth.csrf(req), path=req.path, who=req.caller, **ctx
        )
        return Response(body.encode(), status)

    def _fragment(self, template: str, **ctx: Any) -> str:
        return self.env.get_template(template).render(**ctx)

    # ------------------------------------------------------------------ login

    async def login(self, req: Request) -> Response:
        nxt = req.query.get("next", "/ui")
        if not nxt.startswith("/ui") or "//" in nxt or "\\" in nxt:
            nxt = "/ui"
        if req.method == "GET":
            return self._page(req, "login.html", next=nxt, error="")
        if req.method != "POST":
            return text("use GET or POST", 405)
        form = await req.form()
        nxt = form.get("next", nxt)
        if not nxt.startswith("/ui") or "//" in nxt or "\\" in nxt:
            nxt = "/ui"
        caller = await self.auth.login(form.get("token", ""))
        if caller is None:
            await asyncio.sleep(0.2)  # a guess costs time
            return self._page(
                req,
                "login.html",
                status=401,
                next=nxt,
                error="That is not this control plane's token ($STRATO_HOME/token), nor "
                "one from `strato token create`.",
            )
        cookie = self.auth.cookie(self.auth.new_session(caller), req.secure)
        return redirect(nxt, headers=[cookie])

    async def logout(self, req: Request, send: Send) -> Response:
        return redirect("/ui/login", headers=[self.auth.cookie("", req.secure, max_age=0)])

    # ------------------------------------------------------------------ pages

    async def _live_page(
        self, req: Request, template: str, view: str, ident: str = "", **ctx: Any
    ) -> Response:
        """A page whose live part (``view``'s fragment) the state stream keeps current:
        the stream is told the fragment's hash, and sends nothing until it differs."""
        live = await self._state_fragment(view, ident, req.caller)
        return self._page(
            req, template, live=Markup(live), live_hash=_digest(live), ident=ident, **ctx
        )

    async def page_apps(self, req: Request, send: Send) -> Response:
        return await self._live_page(req, "apps.html", "apps")

    async def page_app(self, req: Request, send: Send) -> Response:
        a = await views.app(self.cp, req.path_params["app_id"])
        return await self._live_page(req, "app.html", "app", a["app_id"], app=a)

    async def page_call(self, req: Request, send: Send) -> Response:
        call = await views.call(self.cp, req.path_params["call_id"])
        return await self._live_page(req, "call.html", "call", call["call_id"], call=call)

    async def page_containers(self, req: Request, send: Send) -> Response:
        return await self._live_page(req, "containers.html", "containers")

    async def page_container(self, req: Request, send: Send) -> Response:
        c = await views.container(self.cp, req.path_params["container_id"])
        lines, last = await views.log_tail(self.cp, c["app_id"], c["container_id"])
        return await self._live_page(
            req, "container.html", "container", c["container_id"], c=c, lines=lines, after=last
        )

    async def page_nodes(self, req: Request, send: Send) -> Response:
        return await self._live_page(req, "nodes.html", "nodes")

    async def page_objects(self, req: Request, send: Send) -> Response:
        path = "/" + req.path_params["kind"]
        known = dict(views.object_routes(self.cp))
        if path not in known:
            raise NotFoundError(f"this control plane serves no {path} (not built yet)")
        items = await views.objects(self.cp, path, req.caller)
        return self._page(req, "objects.html", title=known[path], items=items)

    # ------------------------------------------------------------------ actions

    async def stop_app(self, req: Request, send: Send) -> Response:
        app_id = req.path_params["app_id"]
        ws = self.cp.workspaces.app_ws.get(app_id, DEFAULT_WORKSPACE)  # (_may checked it)
        self.cp.apps.stop((await self.cp.apps.find(app_id, ws))["app_id"])
        log.info("dashboard: app %s stopped", app_id)
        return Response(b"stopped", headers=[(b"hx-refresh", b"true")])

    async def stop_container(self, req: Request, send: Send) -> Response:
        cid = req.path_params["container_id"]
        if self.cp.fleet.container(cid) is None:
            raise NotFoundError(f"no live container {cid}")
        self.cp.fleet.kill(cid, "stopped from the dashboard")
        return Response(b"stopping", headers=[(b"hx-refresh", b"true")])

    # ------------------------------------------------------------------ live streams

    async def _state_fragment(self, view: str, ident: str, who: Caller) -> str:
        cp = self.cp

        def mine(rows: list[dict]) -> list[dict]:  # a workspace's token: its own only
            ws = cp.workspaces.app_ws
            if who.operator:  # the installation's: every workspace's
                return rows
            return [r for r in rows if ws.get(r["app_id"], DEFAULT_WORKSPACE) == who.workspace]

        if view == "apps":
            return self._fragment("_apps_rows.html", apps=mine(await views.apps(cp)), csrf="")
        if view == "app":
            a = await views.app(cp, ident)
            calls = await views.recent_calls(cp, [f.function_id for f in a["functions"]])
            return self._fragment("_app_live.html", app=a, calls=calls)
        if view == "containers":
            return self._fragment("_containers_rows.html", containers=mine(views.containers(cp)))
        if view == "container":
            return self._fragment("_container_state.html", c=await views.container(cp, ident))
        if view == "nodes":
            return self._fragment("_nodes_rows.html", nodes=views.nodes(cp))
        if view == "call":
            return self._fragment("_call_rows.html", call=await views.call(cp, ident))
        raise NotFoundError(f"no live view {view!r}")

    def _version(self, view: str, ident: str) -> object:
        """What a page's live part depends on, from memory (None: render every time). The
        parts read from the store (an app's recent calls, a call's inputs, a gone
        container) are read again only when this changed."""
        cp = self.cp
        if view == "call":
            live = cp.calls.live.get(ident, {})
            return tuple((p.input_id, str(p.where), p.attempts) for p in live.values())
        if view == "container":
            c = cp.fleet.container(ident)
            return "gone" if c is None else (str(c.state), len(c.inflight), c.node_id)
        if view != "app":
            return None
        fns = [fn for fn in list(self.cp.calls.functions.values()) if fn.app_id == ident]
        try:
            ended = [views.ended_count(fn.function_id) for fn in fns]
        except Exception:  # the client library's internals changed: render every time
            return None
        return tuple(
            (
                fn.function_id,
                str(fn.app_state),
                len(fn.queue),
                self.cp.calls.inflight(fn),
                len(self.cp.fleet.live_containers_of(fn.function_id)),
                n,
            )
            for fn, n in zip(fns, ended, strict=True)
        )

    async def sse_state(self, req: Request, send: Send) -> None:
        """Re-renders a page's live part each second and sends it when it changed."""
        view, ident = req.query.get("view", ""), req.query.get("id", "")
        shown = req.query.get("h", "")  # the hash of what the page shows

        async def events() -> AsyncIterator[bytes]:
            nonlocal shown
            seen: object = None
            while True:
                now = self._version(view, ident)
                if now is None or now != seen:  # else nothing it shows can have changed
                    seen = now
                    frag = await self._state_fragment(view, ident, req.caller)
                    digest = _digest(frag)
                    if digest != shown:
                        shown = digest
                        yield sse_event(view, frag)
                        await asyncio.sleep(STATE_EVERY_S)
                        continue
                yield b": keep-alive\n\n"
                await asyncio.sleep(STATE_EVERY_S)

        await stream_events(req, send, events(), self.stopping)

    async def sse_logs(self, req: Request, send: Send) -> None:
        """New log lines of an app (of one container, with ``container``) as they come."""
        app_id, cid = req.query.get("app", ""), req.query.get("container") or None
        after = int(req.query.get("after", "0") or 0)
        cp = self.cp

        async def events() -> AsyncIterator[bytes]:
            nonlocal after
            if not after:
                _, after = await views.log_tail(cp, app_id, cid)
            while True:
                batch = await cp.logs.wait(app_id, after, 15.0)
                after = batch.cursor
                lines = [ln for ln in batch.lines if cid is None or ln.container_id == cid]
                if lines:
                    yield sse_event("log", "".join(_log_html(ln) for ln in lines))
                else:
                    yield b": keep-alive\n\n"

        await stream_events(req, send, events(), self.stopping)

    async def sse_series(self, req: Request, send: Send) -> None:
        """The charts' series of an app's functions, after each sample."""
        app_id = req.query.get("app", "")

        def payload() -> str:
            out = {}
            for fn in list(self.cp.calls.functions.values()):
                if fn.app_id == app_id and fn.function_id in self.sampler.series:
                    out[fn.function_id] = self.sampler.series[fn.function_id].as_json()
            return json.dumps(out)

        async def events() -> AsyncIterator[bytes]:
            yield sse_event("series", payload())
            while True:
                changed = self.sampler.changed
                try:
                    await asyncio.wait_for(changed.wait(), 15.0)
                    self.sampler.viewed()
                    yield sse_event("series", payload())
                except TimeoutError:
                    yield b": keep-alive\n\n"

        self.sampler.viewed()
        await stream_events(req, send, events(), self.stopping)


def _digest(fragment: str) -> str:
    return hashlib.sha256(fragment.encode()).hexdigest()[:24]


def _log_html(line: Any) -> str:
    ts = time.strftime("%H:%M:%S", time.localtime(line.ts))
    return (
        f'<div class="log {html.escape(line.stream)}"><span class="ts">{ts}</span> '
        f'<span class="cid">{html.escape(line.container_id[-8:])}</span> '
        f"{html.escape(line.text)}</div>"
    )


def with_ops(api: Any, cp: ControlPlane) -> Ops:
    """The API's ASGI app with ``/metrics`` and the dashboard in front of it."""
    return Ops(api, cp)
