"""What a request may reach: its caller's workspace, and for code in a container, less.

Every request acts in one workspace (``req.caller.workspace``: its token's, or for code in
a container its app's). Whatever it names by id or name must belong to that workspace;
anything else answers exactly as if it did not exist (``NotFoundError``, the same message),
so nobody can probe for another workspace's objects.

A container's request (``req.principal``; over its channel, see ``channel.py``) is scoped
further, to its app:

- apps: its own app, and deployed apps of its workspace (``App.lookup``,
  ``Function.from_name``); never another app's run, logs or controls;
- functions: those of the apps above (call, bind a class's parameters, read stats);
- calls: those of its own app's functions, and those it (its app) made;
- blobs: by content key (a key is only known to whoever was given the value's output).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from strato import exceptions as exc

from ..calls.state import AppState, FunctionQueue
from ..store.tables_workspaces import DEFAULT_WORKSPACE

if TYPE_CHECKING:
    from ..control import ControlPlane
    from .router import Request


class Scope:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def workspace_of(self, app_id: str) -> str:
        return self.cp.workspaces.app_ws.get(app_id, DEFAULT_WORKSPACE)

    def mine(self, req: Request, app_id: str) -> bool:
        """Whether the app is in the requester's workspace."""
        return self.workspace_of(app_id) == req.caller.workspace

    async def app(self, req: Request, ref: str) -> dict:
        """The app row ``ref`` names, if the requester may see it."""
        row = await self.cp.apps.find(ref, req.caller.workspace)
        who = req.principal
        if who is not None and row["app_id"] != who.app_id and row["state"] != "deployed":
            raise exc.NotFoundError(f"no running or deployed app named {ref!r}")
        return row

    def function(self, req: Request, function_id: str) -> FunctionQueue:
        """The function, if the requester may call it."""
        try:
            fn = self.cp.calls.function(function_id)
        except exc.NotFoundError:
            fn = None
        who = req.principal
        if (
            fn is None
            or not self.mine(req, fn.app_id)
            or (who is not None and fn.app_id != who.app_id and fn.app_state != AppState.DEPLOYED)
        ):
            raise exc.NotFoundError(f"function {function_id} does not exist")
        return fn

    async def call(self, req: Request, call_id: str) -> None:
        """Nothing, if the requester may read or change that call; else NotFoundError."""
        owners = await self.cp.calls.call_owner(call_id)  # (function's app, caller's app)
        who = req.principal
        if (
            owners is None
            or not self.mine(req, owners[0])
            or (who is not None and who.app_id not in owners)
        ):
            raise exc.NotFoundError(f"call {call_id} does not exist (or has expired)")


def guard_by_app(
    scope: Scope, app_of: Callable[[str], Awaitable[str | None]], missing: str
) -> Callable[[Request, str], Awaitable[None]]:
    """A router guard for an object that belongs to an app (``app_of``: its app's id, or
    ``None`` if there is no such object): ``missing`` (formatted with the id) for one of
    another workspace, as for one that does not exist."""

    async def check(req: Request, object_id: str) -> None:
        app_id = await app_of(object_id)
        if app_id is None or not scope.mine(req, app_id):
            raise exc.NotFoundError(missing.format(object_id))

    return check
