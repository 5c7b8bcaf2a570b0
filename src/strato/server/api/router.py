"""A lean ASGI router with msgpack bodies and a generated OpenAPI description.

The control plane's API sits on the hot path of every call, so routing is one dict lookup
plus one regex match, bodies are decoded straight into msgspec structs, and nothing else
runs per request (no per-request dependency injection or middleware stack). The route
table also produces ``/openapi.json``, with msgspec's JSON schemas for every body.
"""

from __future__ import annotations

import hmac
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import msgspec

from strato import exceptions as exc
from strato.protocol.messages import ErrorBody
from strato.server.workspaces import ACTING, ANONYMOUS, INSTALLATION, Caller

if TYPE_CHECKING:
    from strato.server.workspaces import Workspaces

MSGPACK = "application/msgpack"
JSON = "application/json"
MAX_QUERY_INT = (1 << 62) - 1  # sequence numbers and limits: inside SQL's BIGINT
# routes of the installation, not of a workspace: only the installation's token
OPERATOR_PREFIXES = ("/nodes", "/cluster", "/broker", "/providers", "/workspaces", "/join")
ACCESS = ("read", "write", "admin", "operator")
MATCHED_KEPT = 4096  # paths remembered with their route (forgotten all at once past this)
MATCHED_PATH_MAX = 256
_encoder = msgspec.msgpack.Encoder()
_STATUS = [
    (exc.RequestSizeError, 413),
    (exc.AppStoppedError, 409),
    (exc.InvalidError, 400),
    (exc.NotFoundError, 404),
    (exc.PermissionDeniedError, 403),
    (exc.AuthError, 401),
    (exc.AlreadyExistsError, 409),
]


@dataclass
class Reply:
    body: bytes
    status: int = 200
    content_type: str = MSGPACK


def reply(obj: object, status: int = 200) -> Reply:
    return Reply(_encoder.encode(obj), status)


def error_reply(e: exc.Error) -> Reply:
    status = next((s for cls, s in _STATUS if isinstance(e, cls)), 500)
    return reply(ErrorBody(type(e).__name__, str(e)), status)


@dataclass(frozen=True)
class Principal:
    """Who sent a request that came over a container's channel (``None`` on a request is
    the holder of the API token). A container may use only the routes marked
    ``container=True``, and those check that what it names is its own app's or one it
    may call (``server/api/scope.py``)."""

    container_id: str
    app_id: str
    function_id: str
    input_id: int | None = None  # the input the calling code runs, held by that container


@dataclass(frozen=True)
class NodePrincipal:
    """--- cluster: a joined worker agent that showed its node's credential (never the API
    token; ``server/cluster/node_credentials.py``). It may use only the routes marked
    ``node=True`` (blobs, and the volumes mounted by containers placed on its node)."""

    node_id: str


@dataclass
class Request:
    path_params: dict[str, str]
    query: dict[str, str]
    body: bytes
    content_type: str = MSGPACK
    principal: Principal | None = None
    caller: Caller = INSTALLATION  # its workspace and role (a container's: its app's)
    # --- cluster: a joined agent's request (only on ``node=True`` routes, whose handlers
    # check it before ``principal``: None there does not mean the API token's holder)
    agent: NodePrincipal | None = None

    def param(self, name: str, cast: type = str, default=None):
        """A query parameter; numbers must be finite and from 0 to 2^62 (HTTP 400 else)."""
        raw = self.query.get(name)
        if raw is None:
            return default
        try:
            value = cast(raw)
        except ValueError:
            raise exc.InvalidError(
                f"query parameter {name}={raw!r} is not a {cast.__name__}"
            ) from None
        if cast in (int, float) and (not math.isfinite(value) or not 0 <= value <= MAX_QUERY_INT):
            raise exc.InvalidError(
                f"query parameter {name}={raw!r}: use a number from 0 to {MAX_QUERY_INT}"
            )
        return value

    def decode(self, typ: type):
        """The body as ``typ``: JSON when the request says ``application/json``, else
        msgpack. Decoding checks every field's type and range (HTTP 400 else)."""
        try:
            if "json" in self.content_type:
                return msgspec.json.decode(self.body, type=typ)
            return msgspec.msgpack.decode(self.body, type=typ)
        except msgspec.DecodeError as e:
            raise exc.InvalidError(f"bad request body for {typ.__name__}: {e}") from None


Handler = Callable[[Request], Awaitable[Reply]]
Guard = Callable[[Request, str], Awaitable[None]]


def check_access(caller: Caller, route: Route) -> None:
    """Refuse (HTTP 403) a route that the caller's role may not use."""
    if not caller.may(route.access):
        who = "the installation's token" if route.access == "operator" else f"{route.access} access"
        raise exc.PermissionDeniedError(
            f"{route.method} {route.path} needs {who}; this token is {caller.role!r} "
            f"in workspace {caller.workspace!r}"
        )


@dataclass
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    body: type | None = None
    response: type | None = None
    query: dict[str, type] = field(default_factory=dict)
    raw_body: bool = False
    auth: bool = True
    container: bool = False  # a container may use it (over its channel), scoped to its app
    # --- cluster: a joined agent may use it with its node credential (``Request.agent``;
    # the handler checks what it names against the agent's node)
    node: bool = False
    # who may use it: read (any role), write (developer, admin), admin (a workspace's
    # admin), operator (the installation's token); default: GET reads, the rest write,
    # paths under OPERATOR_PREFIXES are the operator's
    access: str = ""
    regex: re.Pattern = field(init=False)
    params: list[str] = field(init=False)
    guards: list[tuple[str, Guard]] | None = field(default=None, init=False)  # (Router.guard)

    def __post_init__(self) -> None:
        if not self.access:
            self.access = "read" if self.method == "GET" else "write"
            if self.path.startswith(OPERATOR_PREFIXES):
                self.access = "operator"
        if self.access not in ACCESS:
            raise ValueError(f"route {self.method} {self.path}: access {self.access!r}")
        self.params = re.findall(r"{(\w+)}", self.path)
        self.regex = re.compile("^" + re.sub(r"{(\w+)}", r"(?P<\1>[^/]+)", self.path) + "$")


class Router:
    def __init__(self, title: str, version: str, token: str, max_body: int) -> None:
        self.title = title
        self.version = version
        self.routes: list[Route] = []
        self._by_method: dict[str, list[Route]] = {}
        # (method, path) -> its route and path parameters: a hot Dict's or Queue's paths
        # are matched once, not against each route's regex per request
        self._matched: dict[tuple[str, str], tuple[Route, dict[str, str]]] = {}
        self._auth = f"Bearer {token}".encode()
        self.workspaces: Workspaces | None = None  # workspace tokens (set by build_app)
        self._guards: list[tuple[str, str, Guard]] = []
        self.max_body = max_body
        self._openapi: bytes | None = None
        # --- cluster: the node a joined agent's credential belongs to (None: not one)
        self.node_of: Callable[[str], str | None] = lambda credential: None

    def add(self, method: str, path: str, summary: str, **kw) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            route = Route(method, path, fn, summary, **kw)
            self.routes.append(route)
            self._by_method.setdefault(method, []).append(route)
            self._matched.clear()
            return fn

        return register

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        try:
            out = await self._handle(scope, receive)
        except exc.Error as e:
            out = error_reply(e)
        await send(
            {
                "type": "http.response.start",
                "status": out.status,
                "headers": [
                    (b"content-type", out.content_type.encode()),
                    (b"content-length", str(len(out.body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": out.body})

    async def _handle(self, scope, receive) -> Reply:
        path = scope["path"]
        if path == "/openapi.json" and scope["method"] == "GET":
            return Reply(self.openapi(), content_type="application/json")
        found = self._match(scope["method"], path)
        if isinstance(found, Reply):
            return found
        route, params = found
        caller = ANONYMOUS  # (a route without auth, or a joined agent's: no workspace role)
        agent = None
        if route.auth:
            found_caller = await self._caller(scope)
            if found_caller is None:  # --- cluster: a joined agent's node credential?
                agent = self._node_principal(scope, route)  # (or AuthError)
            else:
                caller = found_caller
                check_access(caller, route)
        body = await self._read_body(receive)
        qs = scope.get("query_string") or b""
        query = dict(parse_qsl(qs.decode("latin-1"))) if qs else {}
        ctype = MSGPACK
        for k, v in scope["headers"]:
            if k == b"content-type":
                ctype = v.decode("latin-1").lower()
                break
        return await self._run(route, Request(params, query, body, ctype, None, caller, agent))

    def _match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | Reply:
        hit = self._matched.get((method, path))
        if hit is not None:
            return hit[0], dict(hit[1])  # (a handler may change its copy)
        for route in self._by_method.get(method, ()):
            match = route.regex.match(path)
            if match is not None:
                params = match.groupdict()
                if len(path) <= MATCHED_PATH_MAX:
                    if len(self._matched) >= MATCHED_KEPT:
                        self._matched.clear()
                    self._matched[method, path] = (route, dict(params))
                return route, params
        if any(r.regex.match(path) for rs in self._by_method.values() for r in rs):
            return error_reply(exc.InvalidError(f"{method} is not allowed on {path}"))
        return error_reply(exc.NotFoundError(f"no route {method} {path}"))

    async def dispatch_for(
        self,
        principal: Principal | None,
        method: str,
        path: str,
        query: dict[str, str],
        body: bytes,
        caller: Caller = INSTALLATION,
    ) -> Reply:
        """A request that came over the channel: a container's on behalf of ``principal``
        (only routes marked ``container=True``), or with ``None`` a local client's that
        showed a token when it connected (``caller``: that token's workspace and role;
        every route its role may use). The same handlers, errors and replies as HTTP."""
        try:
            if principal is None and method == "GET" and path == "/openapi.json":
                return Reply(self.openapi(), content_type="application/json")
            found = self._match(method, path)
            if isinstance(found, Reply):
                return found
            route, params = found
            if principal is not None and not route.container:
                raise exc.AuthError(
                    f"{method} {route.path} is not open to code in a container: its "
                    "credential may call functions and read its own calls, never the admin API"
                )
            check_access(caller, route)
            if len(body) > self.max_body:
                raise exc.RequestSizeError(
                    f"request body over {self.max_body} bytes (STRATO_MAX_PAYLOAD)"
                )
            return await self._run(route, Request(params, query, body, MSGPACK, principal, caller))
        except exc.Error as e:
            return error_reply(e)

    def guard(self, prefix: str, param: str, check: Guard) -> None:
        """Check path parameter ``param`` of every route under ``prefix`` before its
        handler runs: ``check(req, value)`` raises ``NotFoundError`` for an object that
        the requester's workspace does not own (the same answer as for a missing one)."""
        self._guards.append((prefix, param, check))
        for route in self.routes:
            route.guards = None

    async def _run(self, route: Route, req: Request) -> Reply:
        guards = route.guards
        if guards is None:
            guards = route.guards = [
                (param, check)
                for prefix, param, check in self._guards
                if param in route.params and route.path.startswith(prefix)
            ]
        ACTING.set(req.caller.workspace)  # (this request's task's own context)
        for param, check in guards:
            await check(req, req.path_params[param])
        return await route.handler(req)

    async def _caller(self, scope) -> Caller | None:
        """Who the request's bearer token makes it (``None``: no valid token), acting in
        the workspace its ``strato-workspace`` header names, if any."""
        auth = workspace = None
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth = v
            elif k == b"strato-workspace":
                workspace = v.decode("latin-1")
        if auth is None:
            return None
        if self.workspaces is None:  # a bare router (tests): the installation token only
            return INSTALLATION if hmac.compare_digest(auth, self._auth) else None
        if not auth.startswith(b"Bearer "):
            return None
        return await self.workspaces.authenticate(auth[7:], workspace)

    def _node_principal(self, scope, route: Route) -> NodePrincipal:
        """--- cluster: the joined agent whose node credential the request shows, if
        ``route`` is open to it; else ``AuthError``."""
        shown = b""
        for k, v in scope["headers"]:
            if k == b"authorization":
                shown = v
                break
        node_id = None
        if shown.startswith(b"Bearer "):
            node_id = self.node_of(shown[7:].decode("latin-1"))
        if node_id is None:
            raise exc.AuthError(
                "missing, wrong or revoked token: set STRATO_TOKEN or use $STRATO_HOME/token"
            )
        if not route.node:
            raise exc.PermissionDeniedError(
                f"{scope['method']} {route.path} is not open to a worker agent's node "
                "credential: it may fetch blobs and its containers' volumes, never the "
                "admin API"
            )
        return NodePrincipal(node_id)

    async def _read_body(self, receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise exc.InvalidError("the client disconnected")
            chunk = msg.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body:
                    raise exc.RequestSizeError(
                        f"request body over {self.max_body} bytes (STRATO_MAX_PAYLOAD)"
                    )
                chunks.append(chunk)
            if not msg.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # ------------------------------------------------------------------ OpenAPI

    def openapi(self) -> bytes:
        if self._openapi is None:
            self._openapi = msgspec.json.encode(self.openapi_dict())
        return self._openapi

    def openapi_dict(self) -> dict:
        types = [t for r in self.routes for t in (r.body, r.response) if t is not None]
        _, components = msgspec.json.schema_components(
            list(dict.fromkeys(types)), ref_template="#/components/schemas/{name}"
        )
        paths: dict = {}
        for r in self.routes:
            op: dict = {"summary": r.summary, "operationId": r.handler.__name__}
            op["x-strato-access"] = r.access  # read | write | admin | operator
            params = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                for p in r.params
            ]
            params += [
                {"name": q, "in": "query", "required": False, "schema": msgspec.json.schema(t)}
                for q, t in r.query.items()
            ]
            if params:
                op["parameters"] = params
            if r.body is not None:
                ref = {"schema": {"$ref": f"#/components/schemas/{r.body.__name__}"}}
                op["requestBody"] = {"required": True, "content": {MSGPACK: ref, JSON: ref}}
            elif r.raw_body:
                op["requestBody"] = {
                    "required": True,
                    "content": {
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        }
                    },
                }
            resp: dict = {"description": "OK"}
            if r.response is not None:
                resp["content"] = {
                    MSGPACK: {"schema": {"$ref": f"#/components/schemas/{r.response.__name__}"}}
                }
            op["responses"] = {
                "200": resp,
                "default": {
                    "description": "an ErrorBody",
                    "content": {MSGPACK: {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                },
            }
            if r.auth:
                op["security"] = [{"bearer": []}]
            paths.setdefault(r.path, {})[r.method.lower()] = op
        _, err = msgspec.json.schema_components(
            [ErrorBody], ref_template="#/components/schemas/{name}"
        )
        components.update(err)
        return {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": self.version},
            "paths": paths,
            "components": {
                "schemas": components,
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            },
        }
