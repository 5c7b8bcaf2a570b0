"""HTTP routes of the control plane.

Bodies are msgpack-encoded structs from ``strato.protocol.messages``
(``application/msgpack``); ``/openapi.json`` describes every route and body. Every route
but ``/health`` and ``/openapi.json`` needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import os

import msgspec

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.protocol.images import image_id as image_id_of
from strato.server.store.blobs import check_key

from ..control import ControlPlane
from . import (
    routes_blob_gc,
    routes_graph,
    routes_sandboxes,
    routes_schedules,
    routes_secrets,
    routes_state,
    routes_usage,
    routes_volumes,
    routes_workspaces,
)
from .router import Reply, Request, Router, reply
from .scope import Scope

MAX_POLL_S = 55.0
VERSION = "0.1.0"


def build_app(cp: ControlPlane) -> Router:
    api = Router("strato control plane", VERSION, cp.token, cp.config.max_payload + (1 << 20))
    api.workspaces = cp.workspaces  # workspace tokens beside the installation's
    # --- cluster: joined agents' node credentials (once an agent listener exists)
    api.node_of = lambda cred: cp.agents.credentials.node_of(cred) if cp.agents else None
    route = api.add
    empty = reply({})
    scope = Scope(cp)  # what a container's requests may reach (container=True routes)

    @route("GET", "/health", "Liveness, version and payload limits", auth=False, container=True)
    async def health(_: Request) -> Reply:
        h = m.Health(
            VERSION, cp.epoch, os.getpid(), cp.config.max_payload, cp.config.blob_threshold
        )
        return Reply(msgspec.json.encode(h), content_type="application/json")

    # ---------------------------------------------------------------- apps

    @route("POST", "/apps", "Create (run or deploy) an app", body=m.CreateApp, response=m.AppInfo)
    async def create_app(req: Request) -> Reply:
        return reply(cp.apps.create(req.decode(m.CreateApp), req.caller.workspace))

    @route("GET", "/apps", "List apps", response=m.AppList)
    async def list_apps(req: Request) -> Reply:
        ws = req.caller.workspace
        return reply(m.AppList([cp.apps.info(r) for r in cp.store.apps() if r["workspace"] == ws]))

    @route("GET", "/apps/{ref}", "An app by id or name", response=m.AppInfo, container=True)
    async def get_app(req: Request) -> Reply:
        return reply(cp.apps.info(await scope.app(req, req.path_params["ref"])))

    @route("POST", "/apps/{ref}/stop", "Stop an app")
    async def stop_app(req: Request) -> Reply:
        cp.apps.stop((await cp.apps.find(req.path_params["ref"], req.caller.workspace))["app_id"])
        return empty

    @route("POST", "/apps/{app_id}/heartbeat", "Keep an ephemeral app alive")
    async def heartbeat(req: Request) -> Reply:
        if scope.mine(req, req.path_params["app_id"]):  # another's: as an unknown app's
            cp.apps.heartbeat(req.path_params["app_id"])
        return empty

    @route(
        "GET",
        "/apps/{ref}/logs",
        "Long-poll an app's container logs",
        response=m.LogBatch,
        query={"after": int, "timeout": float},
    )
    async def app_logs(req: Request) -> Reply:
        ref = req.path_params["ref"]
        try:
            app_id = (await cp.apps.find(ref, req.caller.workspace))["app_id"]
        except exc.NotFoundError:  # a stopped app: the most recent of that name
            named = await _apps_named(ref, req.caller.workspace)
            if not named:
                raise exc.NotFoundError(
                    f"no app named {ref!r} (running, deployed or stopped); "
                    "`strato app list --all` lists them"
                ) from None
            app_id = named[0]["app_id"]
        batch = await cp.logs.wait(
            app_id, req.param("after", int, 0), min(req.param("timeout", float, 0.0), MAX_POLL_S)
        )
        rows = await cp.store.aread(cp.store.apps, [app_id])
        batch.app_state = rows[0]["state"] if rows else "stopped"
        return reply(batch)

    async def _apps_named(name: str, workspace: str) -> list[dict]:
        """Every app of that name in ``workspace``, stopped ones too, newest first."""
        rows = await cp.store.aread(cp.store.apps)
        return sorted(
            (r for r in rows if r["name"] == name and r["workspace"] == workspace),
            key=lambda r: r["created_at"],
            reverse=True,
        )

    @route(
        "GET",
        "/apps/{ref}/history",
        "Every app of that name, newest first: its deployments (and runs), stopped ones too",
        response=m.AppList,
    )
    async def app_history(req: Request) -> Reply:
        ref = req.path_params["ref"]
        named = await _apps_named(ref, req.caller.workspace)
        if not named:
            raise exc.NotFoundError(f"no app named {ref!r} was ever run or deployed")
        return reply(m.AppList([cp.apps.info(r) for r in named]))

    @route(
        "GET",
        "/apps/{ref}/functions/{name}",
        "A function of a running or deployed app",
        response=m.FunctionRef,
        container=True,
    )
    async def function_by_name(req: Request) -> Reply:
        ref, name = req.path_params["ref"], req.path_params["name"]
        app = await scope.app(req, ref)
        for f in await cp.store.aread(cp.store.functions_of, app["app_id"]):
            if f["name"] == name:
                return reply(m.FunctionRef(f["function_id"], name))
        raise exc.NotFoundError(f"app {ref!r} has no function {name!r}")

    # ---------------------------------------------------------------- functions

    @route(
        "POST",
        "/functions/{function_id}/autoscaler",
        "Change a function's scaling",
        body=m.UpdateAutoscaler,
    )
    async def update_autoscaler(req: Request) -> Reply:
        fn = scope.function(req, req.path_params["function_id"])
        cp.apps.update_autoscaler(fn.function_id, req.decode(m.UpdateAutoscaler))
        return empty

    @route(
        "POST",
        "/functions/{function_id}/bind",
        "The function of a class's parameter set or an options variant",
        body=m.BindFunction,
        response=m.FunctionRef,
        container=True,
    )
    async def bind_function(req: Request) -> Reply:
        fn = scope.function(req, req.path_params["function_id"])
        return reply(cp.apps.bind_function(fn.function_id, req.decode(m.BindFunction)))

    @route(
        "GET",
        "/functions/{function_id}/stats",
        "Queue depth and containers",
        response=m.FunctionStats,
        container=True,
    )
    async def function_stats(req: Request) -> Reply:
        fn = scope.function(req, req.path_params["function_id"])
        return reply(m.FunctionStats(len(fn.queue), len(cp.fleet.containers_of(fn.function_id))))

    # ---------------------------------------------------------------- blobs

    @route(
        "POST",
        "/blobs/check",
        "Which of these blobs are missing",
        body=m.BlobCheck,
        response=m.MissingBlobs,
        container=True,
        node=True,
    )
    async def check_blobs(req: Request) -> Reply:
        keys = req.decode(m.BlobCheck).sha256s
        return reply(m.MissingBlobs([k for k in keys if not cp.blobs.has(check_key(k))]))

    @route(
        "PUT",
        "/blobs/{key}",
        "Upload a blob (its key is its sha256)",
        raw_body=True,
        container=True,
        node=True,
    )
    async def put_blob(req: Request) -> Reply:
        if len(req.body) > cp.config.max_payload:
            raise exc.RequestSizeError(
                f"blob of {len(req.body)} bytes is over the limit of {cp.config.max_payload} "
                "bytes (STRATO_MAX_PAYLOAD)"
            )
        await cp.blobs.aput(req.body, check_key(req.path_params["key"]))
        return empty

    @route("GET", "/blobs/{key}", "Download a blob", container=True, node=True)
    async def get_blob(req: Request) -> Reply:
        data = await cp.blobs.aget(req.path_params["key"])
        return Reply(data, content_type="application/octet-stream")

    # ---------------------------------------------------------------- calls

    @route(
        "POST",
        "/calls",
        "Create a call with its first inputs; optionally wait for outputs",
        body=m.CreateCall,
        response=m.Outputs,
        container=True,
    )
    async def create_call(req: Request) -> Reply:
        call = req.decode(m.CreateCall)
        who = req.principal
        scope.function(req, call.function_id)  # of the caller's workspace (and app's reach)
        if who is None:
            await cp.calls.create_call(call)
        else:  # a nested call: its input is the parent
            await cp.calls.create_call(call, parent_input_id=who.input_id, caller_app_id=who.app_id)
        if call.wait > 0:
            return reply(
                await cp.calls.wait_outputs(
                    call.call_id, 0, min(call.wait, MAX_POLL_S), max(1, len(call.inputs))
                )
            )
        return reply(m.Outputs([], 0))

    @route(
        "POST", "/calls/{call_id}/inputs", "Add inputs to a call", body=m.AddInputs, container=True
    )
    async def add_inputs(req: Request) -> Reply:
        await scope.call(req, req.path_params["call_id"])
        cp.calls.add_inputs(req.path_params["call_id"], req.decode(m.AddInputs))
        return empty

    @route(
        "GET",
        "/calls/{call_id}/outputs",
        "Long-poll a call's outputs after a sequence number",
        response=m.Outputs,
        query={"after": int, "timeout": float, "limit": int},
        container=True,
    )
    async def outputs(req: Request) -> Reply:
        await scope.call(req, req.path_params["call_id"])
        limit = max(1, min(req.param("limit", int, 1000), 10000))
        return reply(
            await cp.calls.wait_outputs(
                req.path_params["call_id"],
                req.param("after", int, 0),
                min(req.param("timeout", float, 0.0), MAX_POLL_S),
                limit,
            )
        )

    @route("POST", "/calls/{call_id}/cancel", "Cancel a call", body=m.Cancel, container=True)
    async def cancel(req: Request) -> Reply:
        await scope.call(req, req.path_params["call_id"])
        # answered once its children's calls (made from its inputs) are cancelled too
        await cp.calls.cancel_call(
            req.path_params["call_id"], req.decode(m.Cancel).terminate_containers
        )
        return empty

    @route("GET", "/calls/{call_id}", "A call's progress", response=m.CallStatus, container=True)
    async def call_status(req: Request) -> Reply:
        call_id = req.path_params["call_id"]
        await scope.call(req, call_id)
        call = await cp.store.aread(cp.store.call, call_id)
        if call is None:
            raise exc.NotFoundError(f"call {call_id} does not exist (or has expired)")
        return reply(
            m.CallStatus(
                call_id,
                call["function_id"],
                call["n_inputs"],
                await cp.store.aread(cp.store.count_done, call_id),
                call["closed"],
                call["cancelled"],
            )
        )

    # ---------------------------------------------------------------- fleet

    @route("GET", "/containers", "Running containers", response=m.ContainerList, query={"app": str})
    async def containers(req: Request) -> Reply:
        app = req.param("app")
        app_id = (await cp.apps.find(app, req.caller.workspace))["app_id"] if app else None
        out = []
        for r in await cp.store.aread(cp.store.containers, app_id):
            if not scope.mine(req, r["app_id"]):
                continue
            try:
                fn = cp.calls.function(r["function_id"])
                name, spec = fn.name, fn.spec
            except exc.NotFoundError:
                name, spec = "?", None
            image_id = image_id_of(spec.image) if spec is not None and spec.image else None
            out.append(
                m.ContainerInfo(
                    r["container_id"],
                    r["app_id"],
                    r["function_id"],
                    name,
                    r["node_id"],
                    r["state"],
                    r["started_at"],
                    r["exit_reason"],
                    image_id,
                )
            )
        return reply(m.ContainerList(out))

    @route("GET", "/nodes", "Nodes and their reservations", response=m.NodeList)
    async def nodes(_: Request) -> Reply:
        return reply(
            m.NodeList(
                [
                    m.NodeStatus(
                        n.view.node_id,
                        n.info,
                        "ready" if n.peer is not None else "lost",
                        n.view.cpu_reserved,
                        n.view.memory_reserved_mb,
                        n.last_heartbeat,
                    )
                    for n in cp.fleet.nodes.values()
                ]
            )
        )

    # the call graph and the shared-state objects: each module adds its own routes (and loops)
    for feature in (
        routes_graph,
        routes_state,
        routes_secrets,
        routes_volumes,
        routes_schedules,
        routes_sandboxes,
        routes_usage,  # --- broker: GET /broker, GET /usage
        routes_workspaces,  # --- workspaces: workspaces and tokens
        routes_blob_gc,  # --- blob collector: POST /blobs/gc and its loop
    ):
        feature.register(api, cp)
    __import__("strato.server.cluster.routes", fromlist=["x"]).register(api, cp)  # --- cluster
    cp.api = api  # containers' requests over the channel go through the same routes
    return api
