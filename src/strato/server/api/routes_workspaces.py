"""Routes of workspaces and their API tokens (``server/workspaces.py``).

Workspaces are the installation's: only its own token makes or lists them (their paths are
operator routes). A workspace's admin makes, lists and revokes that workspace's tokens;
``/whoami`` tells any token what it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from strato.protocol import messages as m

from .router import Reply, Request, reply

if TYPE_CHECKING:
    from ..control import ControlPlane
    from .router import Router


def register(api: Router, cp: ControlPlane) -> None:
    """Add this feature's routes to ``api``."""
    spaces = cp.workspaces
    route = api.add

    @route(
        "POST",
        "/workspaces",
        "Create a workspace",
        body=m.CreateWorkspace,
        response=m.WorkspaceInfo,
    )
    async def create_workspace(req: Request) -> Reply:
        return reply(await spaces.create(req.decode(m.CreateWorkspace).name))

    @route("GET", "/workspaces", "Every workspace", response=m.WorkspaceList)
    async def list_workspaces(_: Request) -> Reply:
        return reply(await spaces.list())

    @route(
        "POST",
        "/tokens",
        "Create a token of the caller's workspace (shown once)",
        body=m.CreateToken,
        response=m.NewToken,
        access="admin",
    )
    async def create_token(req: Request) -> Reply:
        return reply(await spaces.create_token(req.caller.workspace, req.decode(m.CreateToken)))

    @route(
        "GET",
        "/tokens",
        "The tokens of the caller's workspace",
        response=m.TokenList,
        access="admin",
    )
    async def list_tokens(req: Request) -> Reply:
        return reply(await spaces.list_tokens(req.caller.workspace))

    @route("DELETE", "/tokens/{token_id}", "Revoke a token (at once)", access="admin")
    async def revoke_token(req: Request) -> Reply:
        await spaces.revoke(req.caller.workspace, req.path_params["token_id"])
        return reply({})

    @route("GET", "/whoami", "The caller's workspace and role", response=m.WhoAmI)
    async def whoami(req: Request) -> Reply:
        c = req.caller
        return reply(m.WhoAmI(c.workspace, c.role, c.operator, c.token_id))
