"""Routes of the call graph (calls made from inside containers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from strato.protocol import messages as m

from .router import Reply, Request, reply
from .scope import Scope

if TYPE_CHECKING:
    from ..control import ControlPlane
    from .router import Router


def register(api: Router, cp: ControlPlane) -> None:
    """Add this feature's routes to ``api`` (and its background loops to ``cp``)."""
    scope = Scope(cp)

    @api.add(
        "GET",
        "/calls/{call_id}/graph",
        "A call's inputs and, under each, the inputs of the calls it made, recursively",
        response=m.CallGraph,
        container=True,
    )
    async def call_graph(req: Request) -> Reply:
        call_id = req.path_params["call_id"]
        await scope.call(req, call_id)  # of its workspace (a container's: of its app)
        return reply(await cp.calls.call_graph(call_id))
