"""HTTP routes of the control plane.

Bodies are msgpack-encoded structs from ``strato.protocol.messages``
(``application/msgpack``); the OpenAPI description at ``/openapi.json`` lists their
schemas. Every route but ``/health`` and the docs needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import os

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.server.store.blobs import check_key

from ..control import ControlPlane

MSGPACK = "application/msgpack"
MAX_POLL_S = 55.0
VERSION = "0.1.0"

_STATUS = {
    exc.InvalidError: 400,
    exc.RequestSizeError: 413,
    exc.AppStoppedError: 409,
    exc.NotFoundError: 404,
    exc.AuthError: 401,
    exc.AlreadyExistsError: 409,
}

_decoders: dict[type, msgspec.msgpack.Decoder] = {}
_encoder = msgspec.msgpack.Encoder()


def _reply(obj: object, status: int = 200) -> Response:
    return Response(_encoder.encode(obj), status_code=status, media_type=MSGPACK)


async def _body(request: Request, typ: type):
    dec = _decoders.get(typ)
    if dec is None:
        dec = _decoders[typ] = msgspec.msgpack.Decoder(typ)
    try:
        return dec.decode(await request.body())
    except msgspec.DecodeError as e:
        raise exc.InvalidError(f"bad request body for {typ.__name__}: {e}") from None


def _schema_extra(request_type: type | None, response_type: type | None) -> dict:
    extra: dict = {}
    if request_type is not None:
        extra["requestBody"] = {
            "required": True,
            "content": {
                MSGPACK: {"schema": {"$ref": f"#/components/schemas/{request_type.__name__}"}}
            },
        }
    if response_type is not None:
        extra["responses"] = {
            "200": {
                "description": response_type.__name__,
                "content": {
                    MSGPACK: {"schema": {"$ref": f"#/components/schemas/{response_type.__name__}"}}
                },
            }
        }
    return extra


class _Auth:
    """Pure ASGI middleware: refuses requests without the control plane's token."""

    OPEN = ("/health", "/openapi.json", "/docs", "/redoc")

    def __init__(self, app, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not scope["path"].startswith(self.OPEN):
            got = b""
            for k, v in scope["headers"]:
                if k == b"authorization":
                    got = v
                    break
            if not hmac.compare_digest(got, self.expected):
                body = _encoder.encode(
                    m.ErrorBody(
                        "AuthError",
                        "missing or wrong token: set STRATO_TOKEN or use $STRATO_HOME/token",
                    )
                )
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [(b"content-type", MSGPACK.encode())],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def build_app(cp: ControlPlane) -> FastAPI:
    api = FastAPI(title="strato control plane", version=VERSION)
    used_types: list[type] = []

    def route(method: str, path: str, req: type | None = None, resp: type | None = None):
        used_types.extend(t for t in (req, resp) if t is not None)
        return api.api_route(path, methods=[method], openapi_extra=_schema_extra(req, resp))

    @api.exception_handler(exc.Error)
    async def _error(_request: Request, e: exc.Error):
        status = next((s for cls, s in _STATUS.items() if isinstance(e, cls)), 500)
        return _reply(m.ErrorBody(type(e).__name__, str(e)), status)

    @route("GET", "/health")
    async def health() -> Response:
        return JSONResponse(
            msgspec.to_builtins(
                m.Health(
                    VERSION, cp.epoch, os.getpid(), cp.config.max_payload, cp.config.blob_threshold
                )
            )
        )

    # ---------------------------------------------------------------- apps

    @route("POST", "/apps", m.CreateApp, m.AppInfo)
    async def create_app(request: Request) -> Response:
        return _reply(cp.create_app(await _body(request, m.CreateApp)))

    @route("GET", "/apps", None, m.AppList)
    async def list_apps() -> Response:
        return _reply(m.AppList([cp.app_info(r) for r in cp.store.apps()]))

    @route("GET", "/apps/{ref}", None, m.AppInfo)
    async def get_app(ref: str) -> Response:
        return _reply(cp.app_info(cp.find_app(ref)))

    @route("POST", "/apps/{ref}/stop")
    async def stop_app(ref: str) -> Response:
        cp.stop_app(cp.find_app(ref)["app_id"])
        return _reply({})

    @route("POST", "/apps/{app_id}/heartbeat")
    async def heartbeat(app_id: str) -> Response:
        cp.heartbeat(app_id)
        return _reply({})

    @route("GET", "/apps/{ref}/logs", None, m.LogBatch)
    async def app_logs(ref: str, after: int = 0, timeout: float = 0.0) -> Response:
        app = cp.find_app(ref) if not ref.startswith("ap-") else {"app_id": ref}
        batch = await cp.logs.wait(app["app_id"], after, min(timeout, MAX_POLL_S))
        rows = cp.store.apps([app["app_id"]])
        batch.app_state = rows[0]["state"] if rows else "stopped"
        return _reply(batch)

    @route("GET", "/apps/{app_ref}/functions/{name}", None, m.FunctionRef)
    async def function_by_name(app_ref: str, name: str) -> Response:
        app = cp.find_app(app_ref)
        for f in cp.store.functions_of(app["app_id"]):
            if f["name"] == name:
                return _reply(m.FunctionRef(f["function_id"], name))
        raise exc.NotFoundError(f"app {app_ref!r} has no function {name!r}")

    # ---------------------------------------------------------------- functions

    @route("POST", "/functions/{function_id}/autoscaler", m.UpdateAutoscaler)
    async def update_autoscaler(function_id: str, request: Request) -> Response:
        cp.update_autoscaler(function_id, await _body(request, m.UpdateAutoscaler))
        return _reply({})

    @route("GET", "/functions/{function_id}/stats", None, m.FunctionStats)
    async def function_stats(function_id: str) -> Response:
        fn = cp.calls.function(function_id)
        return _reply(m.FunctionStats(len(fn.queue), len(fn.sessions)))

    # ---------------------------------------------------------------- blobs

    @route("POST", "/blobs/check", m.BlobCheck, m.MissingBlobs)
    async def check_blobs(request: Request) -> Response:
        req = await _body(request, m.BlobCheck)
        return _reply(m.MissingBlobs([k for k in req.sha256s if not cp.blobs.has(check_key(k))]))

    @route("PUT", "/blobs/{key}")
    async def put_blob(key: str, request: Request) -> Response:
        data = await request.body()
        if len(data) > cp.config.max_payload:
            raise exc.RequestSizeError(
                f"blob of {len(data)} bytes is over the limit of {cp.config.max_payload} bytes "
                "(STRATO_MAX_PAYLOAD)"
            )
        cp.blobs.put(data, check_key(key))
        return _reply({})

    @route("GET", "/blobs/{key}")
    async def get_blob(key: str) -> Response:
        return Response(cp.blobs.get(key), media_type="application/octet-stream")

    # ---------------------------------------------------------------- calls

    @route("POST", "/calls", m.CreateCall, m.Outputs)
    async def create_call(request: Request) -> Response:
        req = await _body(request, m.CreateCall)
        cp.calls.create_call(req)
        if req.wait > 0:
            out = await cp.calls.wait_outputs(
                req.call_id, 0, min(req.wait, MAX_POLL_S), len(req.inputs)
            )
        else:
            out = m.Outputs([], 0)
        return _reply(out)

    @route("POST", "/calls/{call_id}/inputs", m.AddInputs)
    async def add_inputs(call_id: str, request: Request) -> Response:
        cp.calls.add_inputs(call_id, await _body(request, m.AddInputs))
        return _reply({})

    @route("GET", "/calls/{call_id}/outputs", None, m.Outputs)
    async def outputs(
        call_id: str, after: int = 0, timeout: float = 0.0, limit: int = 1000
    ) -> Response:
        out = await cp.calls.wait_outputs(
            call_id, after, min(timeout, MAX_POLL_S), max(1, min(limit, 10000))
        )
        return _reply(out)

    @route("POST", "/calls/{call_id}/cancel", m.Cancel)
    async def cancel(call_id: str, request: Request) -> Response:
        req = await _body(request, m.Cancel)
        cp.calls.cancel_call(call_id, req.terminate_containers)
        return _reply({})

    @route("GET", "/calls/{call_id}", None, m.CallStatus)
    async def call_status(call_id: str) -> Response:
        call = cp.store.call(call_id)
        if call is None:
            raise exc.NotFoundError(f"call {call_id} does not exist (or has expired)")
        return _reply(
            m.CallStatus(
                call_id,
                call["function_id"],
                call["n_inputs"],
                cp.store.count_done(call_id),
                call["closed"],
                call["cancelled"],
            )
        )

    # ---------------------------------------------------------------- fleet

    @route("GET", "/containers", None, m.ContainerList)
    async def containers(app: str | None = None) -> Response:
        app_id = cp.find_app(app)["app_id"] if app else None
        names = {}
        out = []
        for r in cp.store.containers(app_id):
            fid = r["function_id"]
            if fid not in names:
                f = cp.store.function(fid)
                names[fid] = f["name"] if f else "?"
            out.append(
                m.ContainerInfo(
                    r["container_id"],
                    r["app_id"],
                    fid,
                    names[fid],
                    r["node_id"],
                    r["state"],
                    r["started_at"],
                    r["exit_reason"],
                )
            )
        return _reply(m.ContainerList(out))

    @route("GET", "/nodes", None, m.NodeList)
    async def nodes() -> Response:
        out = []
        for n in cp.fleet.nodes.values():
            out.append(
                m.NodeStatus(
                    n.view.node_id,
                    n.info,
                    "ready" if n.peer is not None else "lost",
                    n.view.cpu_reserved,
                    n.view.memory_reserved_mb,
                    n.last_heartbeat,
                )
            )
        return _reply(m.NodeList(out))

    _install_openapi(api, used_types)
    return _Auth(api, cp.token), api


def _install_openapi(api: FastAPI, types: list[type]) -> None:
    base = api.openapi

    def openapi() -> dict:
        if api.openapi_schema:
            return api.openapi_schema
        schema = base()
        _, components = msgspec.json.schema_components(
            list(dict.fromkeys(types)), ref_template="#/components/schemas/{name}"
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
        api.openapi_schema = schema
        return schema

    api.openapi = openapi
