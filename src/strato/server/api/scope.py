"""What code in a container may reach through the routes open to containers.

A request with ``req.principal is None`` came with the API token and may reach everything.
A container's request (over its channel; see ``channel.py``) is scoped to its app:

- apps: its own app, and deployed apps (``App.lookup``, ``Function.from_name``: one
  installation is one workspace, as in Modal); never another app's run, logs or controls;
- functions: those of the apps above (call, bind a class's parameters, read stats);
- calls: those of its own app's functions, and those it (its app) made;
- blobs: by content key (a key is only known to whoever was given the value's output).

Anything else answers as if it did not exist (``NotFoundError``), so a container cannot
probe for other apps' ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from strato import exceptions as exc

from ..calls.state import AppState, FunctionQueue

if TYPE_CHECKING:
    from ..control import ControlPlane
    from .router import Request


class Scope:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def app(self, req: Request, ref: str) -> dict:
        """The app row ``ref`` names, if the requester may see it."""
        row = await self.cp.apps.find(ref)
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
        if fn is None or (
            who is not None and fn.app_id != who.app_id and fn.app_state != AppState.DEPLOYED
        ):
            raise exc.NotFoundError(f"function {function_id} does not exist")
        return fn

    async def call(self, req: Request, call_id: str) -> None:
        """Nothing, if the requester may read or change that call; else NotFoundError."""
        who = req.principal
        if who is None:
            return
        owners = await self.cp.calls.call_owner(call_id)  # (function's app, caller's app)
        if owners is None or who.app_id not in owners:
            raise exc.NotFoundError(f"call {call_id} does not exist (or has expired)")
