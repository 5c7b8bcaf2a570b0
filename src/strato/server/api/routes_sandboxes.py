"""Routes of sandboxes (``server/sandboxes``).

Every route is open to code in containers (``container=True``): a container reaches only
its own app's sandboxes, and creates sandboxes only in its own app (a sandbox runs
untrusted code: its handle is not the workspace's, unlike a deployed function). Waits
are long-polls (``wait``/``timeout`` in seconds, at most ``MAX_WAIT_S``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

from strato import exceptions as exc
from strato.protocol import messages as m

from ..sandboxes import Sandbox, Sandboxes
from ..sandboxes.tunnels import check_ports
from .router import Reply, Request, reply
from .scope import Scope, guard_by_app

if TYPE_CHECKING:
    from ..control import ControlPlane
    from .router import Router

log = logging.getLogger("strato.sandboxes")
MAX_WAIT_S = 50.0
TICK_S = 0.25


def register(api: Router, cp: ControlPlane) -> None:
    """Add this feature's routes to ``api`` (and its background loops to ``cp``)."""
    sandboxes = Sandboxes(cp)
    sandboxes.mark_earlier_ended()
    cp.sandboxes = sandboxes
    cp.fleet.sandbox_watch = sandboxes
    cp.gateway.tunnels = sandboxes.tunnels  # <sandbox-id>-<port>.tunnel.* host names
    scope = Scope(cp)
    route = api.add

    async def app_of(sandbox_id: str) -> str | None:
        try:
            return (await sandboxes.info(sandbox_id)).app_id
        except exc.NotFoundError:
            return None

    # --- workspaces: a sandbox of another workspace answers as a missing one
    api.guard("/sandboxes/", "sandbox_id", guard_by_app(scope, app_of, "sandbox {} does not exist"))

    async def tick_loop() -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                sandboxes.tick(time.monotonic())
            except Exception:  # a bug here must not stop the timeouts of every sandbox
                log.exception("the sandboxes' tick failed")

    cp.spawn_loop(tick_loop(), "sandboxes")

    def wait_s(req: Request, name: str = "timeout", default: float = MAX_WAIT_S) -> float:
        return min(float(req.param(name, float, default)), MAX_WAIT_S)

    async def visible(req: Request, app_id: str) -> dict:
        """The app's row, if the requester may reach its sandboxes."""
        if req.principal is not None and app_id != req.principal.app_id:
            raise exc.NotFoundError(f"app {app_id} does not exist (or is not this container's)")
        return await scope.app(req, app_id)

    async def sandbox(req: Request) -> Sandbox:
        sid = req.path_params["sandbox_id"]
        try:
            sb = sandboxes.get(sid)
        except exc.NotFoundError:
            # one that ended long ago, or in an earlier run of the control plane: say so
            info = await get(req)  # (its checks; NotFoundError if it never was)
            raise exc.SandboxTerminatedError(
                f"sandbox {sid} has ended ({info.status}: {info.reason}); create a new one"
            ) from None
        if req.principal is not None and sb.app_id != req.principal.app_id:
            raise exc.NotFoundError(f"sandbox {sb.sandbox_id} does not exist")
        return sb

    @route(
        "POST",
        "/sandboxes",
        "Create a sandbox",
        body=m.CreateSandbox,
        response=m.SandboxInfo,
        container=True,
    )
    async def create(req: Request) -> Reply:
        body = req.decode(m.CreateSandbox)
        row = await visible(req, body.app_id)
        ports = check_ports(body)
        sb = sandboxes.create(body, row["state"])
        try:
            await sandboxes.tunnels.open(sb, ports)
        except exc.Error:
            sandboxes.terminate(sb, "terminated", 137, "its tunnels could not be opened")
            raise
        return reply(sb.info())

    @route(
        "GET",
        "/sandboxes",
        "Running sandboxes (of an app; with all the tags given)",
        query={"app_id": str, "tags": str},
        response=m.SandboxList,
        container=True,
    )
    async def list_sandboxes(req: Request) -> Reply:
        app_id = req.param("app_id")
        if req.principal is not None:
            app_id = app_id or req.principal.app_id
            await visible(req, app_id)
        try:
            tags = json.loads(req.param("tags") or "{}")
        except ValueError:
            tags = None
        if not isinstance(tags, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
        ):
            raise exc.InvalidError("tags: give a JSON object of strings")
        found = sandboxes.list(app_id, tags)
        return reply(m.SandboxList([s for s in found if scope.mine(req, s.app_id)]))

    async def get(req: Request) -> m.SandboxInfo:
        sid = req.path_params["sandbox_id"]
        info = await sandboxes.info(sid)
        if req.principal is not None and info.app_id != req.principal.app_id:
            raise exc.NotFoundError(f"sandbox {sid} does not exist")
        return info

    @route("GET", "/sandboxes/{sandbox_id}", "A sandbox", response=m.SandboxInfo, container=True)
    async def get_route(req: Request) -> Reply:
        return reply(await get(req))

    @route(
        "GET",
        "/apps/{app}/sandboxes/{name}",
        "The running sandbox of that name in an app",
        response=m.SandboxInfo,
        container=True,
    )
    async def by_name(req: Request) -> Reply:
        row = await scope.app(req, req.path_params["app"])
        if req.principal is not None and row["app_id"] != req.principal.app_id:
            raise exc.NotFoundError(f"no running sandbox named {req.path_params['name']!r}")
        return reply(sandboxes.by_name(row["app_id"], req.path_params["name"]).info())

    @route(
        "GET",
        "/sandboxes/{sandbox_id}/wait",
        "Wait for a sandbox to end (long-poll)",
        query={"timeout": float},
        response=m.SandboxInfo,
        container=True,
    )
    async def wait(req: Request) -> Reply:
        sid = req.path_params["sandbox_id"]
        if sid in sandboxes.live:
            await sandbox(req)
        else:
            await get(req)  # (its checks)
        return reply(await sandboxes.wait(sid, wait_s(req)))

    @route(
        "POST",
        "/sandboxes/{sandbox_id}/terminate",
        "End a sandbox",
        response=m.SandboxInfo,
        container=True,
    )
    async def terminate(req: Request) -> Reply:
        sb = await sandbox(req)
        sandboxes.terminate(sb, "terminated", 137, "terminated by its driver (terminate())")
        return reply(sb.info())

    @route(
        "GET",
        "/sandboxes/{sandbox_id}/tunnels",
        "The sandbox's ports reachable from outside (encrypted_ports, unencrypted_ports)",
        response=m.SandboxTunnels,
        container=True,
    )
    async def tunnels(req: Request) -> Reply:
        sb = await sandbox(req)
        if sb.ended:
            raise exc.SandboxTerminatedError(
                f"sandbox {sb.sandbox_id} has ended ({sb.status}: {sb.reason}): its tunnels "
                "are closed"
            )
        return reply(m.SandboxTunnels(sandboxes.tunnels.infos(sb)))

    @route(
        "POST",
        "/sandboxes/{sandbox_id}/snapshot",
        "Snapshot a sandbox's files as a new image (its image plus its writable layer)",
        response=m.SnapshotImage,
        container=True,
    )
    async def snapshot(req: Request) -> Reply:
        return reply(await sandboxes.snapshots.take(await sandbox(req)))

    @route(
        "PUT",
        "/sandboxes/{sandbox_id}/tags",
        "Set a sandbox's tags",
        body=m.SandboxTags,
        response=m.SandboxInfo,
        container=True,
    )
    async def set_tags(req: Request) -> Reply:
        sb = await sandbox(req)
        sb.tags = dict(req.decode(m.SandboxTags).tags)
        sandboxes._save(sb)
        return reply(sb.info())

    @route(
        "POST",
        "/sandboxes/{sandbox_id}/exec",
        "Start a process in a sandbox",
        body=m.ExecRequest,
        query={"wait": float},
        response=m.ExecStarted,
        container=True,
    )
    async def exec_(req: Request) -> Reply:
        sb = await sandbox(req)
        pid = await sandboxes.exec(sb, req.decode(m.ExecRequest), wait_s(req, "wait", 30.0))
        if pid is None:  # still starting: ask again with the same exec_id
            return reply({"pid": None})
        return reply(m.ExecStarted(pid))

    def pid_of(req: Request) -> int:
        try:
            return int(req.path_params["pid"])
        except ValueError:
            raise exc.InvalidError(f"pid {req.path_params['pid']!r}: give a number") from None

    @route(
        "GET",
        "/sandboxes/{sandbox_id}/processes/{pid}/output",
        "A process's output from an offset (long-poll)",
        query={"stream": int, "after": int, "timeout": float},
        response=m.ProcessOutput,
        container=True,
    )
    async def output(req: Request) -> Reply:
        sb = await sandbox(req)
        stream = req.param("stream", int, 1)
        if stream not in (1, 2):
            raise exc.InvalidError("stream: 1 (stdout) or 2 (stderr)")
        out = await sandboxes.output(
            sb, pid_of(req), stream, req.param("after", int, 0), wait_s(req)
        )
        return reply(out)

    @route(
        "POST",
        "/sandboxes/{sandbox_id}/processes/{pid}/stdin",
        "Write to a process's stdin",
        body=m.StdinWrite,
        response=m.ProcessOutput,
        container=True,
    )
    async def stdin(req: Request) -> Reply:
        sb = await sandbox(req)
        offset = await sandboxes.stdin(sb, pid_of(req), req.decode(m.StdinWrite))
        return reply({"offset": offset})

    @route(
        "GET",
        "/sandboxes/{sandbox_id}/processes/{pid}/wait",
        "Wait for a process to exit (long-poll)",
        query={"timeout": float},
        response=m.ProcessStatus,
        container=True,
    )
    async def wait_process(req: Request) -> Reply:
        sb = await sandbox(req)
        return reply(await sandboxes.wait_process(sb, pid_of(req), wait_s(req)))

    @route(
        "POST",
        "/sandboxes/{sandbox_id}/files",
        "A file operation in a sandbox",
        body=m.FileRequest,
        response=m.FileResult,
        container=True,
    )
    async def files(req: Request) -> Reply:
        sb = await sandbox(req)
        return reply(await sandboxes.file(sb, req.decode(m.FileRequest)))

    @route(
        "POST",
        "/sandboxes/{sandbox_id}/processes/{pid}/resize",
        "A process's terminal's new size (exec with pty)",
        body=m.TerminalSize,
        container=True,
    )
    async def resize(req: Request) -> Reply:
        sb = await sandbox(req)
        sandboxes.resize(sb, pid_of(req), req.decode(m.TerminalSize))
        return reply({})
