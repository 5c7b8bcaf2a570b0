"""Routes of the call graph (calls made from inside containers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from strato import exceptions as exc
from strato.protocol import messages as m

from .router import Reply, Request, reply

if TYPE_CHECKING:
    from ..control import ControlPlane
    from .router import Router


def register(api: Router, cp: ControlPlane) -> None:
    """Add this feature's routes to ``api`` (and its background loops to ``cp``)."""

    @api.add(
        "GET",
        "/calls/{call_id}/graph",
        "A call's inputs and, under each, the inputs of the calls it made, recursively",
        response=m.CallGraph,
        container=True,
    )
    async def call_graph(req: Request) -> Reply:
        call_id = req.path_params["call_id"]
        who = req.principal
        if who is not None:  # a container: calls of its app's functions, or made by its app
            owners = await cp.calls.call_owner(call_id)
            if owners is None or who.app_id not in owners:
                raise exc.NotFoundError(f"call {call_id} does not exist (or has expired)")
        return reply(await cp.calls.call_graph(call_id))
