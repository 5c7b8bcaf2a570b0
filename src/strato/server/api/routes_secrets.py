"""Routes of Secret: create (named or anonymous), list (names, never values), delete.

None is open to containers: code in a container gets its function's secrets as
environment variables and nothing else. The routes also wire the secrets into app
creation (names resolved to ids, unknown ones refused) and into container starts (the
values go to the worker in ``ContainerStart.secret_env``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from strato.protocol import messages as m

from ..secrets import Secrets
from .router import Reply, Request, reply

if TYPE_CHECKING:
    from ..control import ControlPlane
    from .router import Router


def register(api: Router, cp: ControlPlane) -> None:
    """Add this feature's routes to ``api`` (and its background loops to ``cp``)."""
    secrets = Secrets.open(cp.store, cp.config.home)

    def resolve(spec: m.FunctionSpec, deployed: bool) -> m.FunctionSpec:
        """Named secrets to ids; an unknown one refuses the app (before anything is made)."""
        if not spec.secrets:
            return spec
        return msgspec.structs.replace(spec, secrets=secrets.resolve(spec.secrets, spec.name))

    cp.apps.spec_hooks.append(resolve)
    cp.apps.on_created.append(secrets.claim)  # anonymous secrets: the app's own
    cp.apps.on_stopped.append(secrets.release)  # ... deleted when it stops
    cp.fleet.secret_env = secrets.env_for
    route = api.add

    @route(
        "POST",
        "/secrets",
        "Create a secret (named, or anonymous for an app); --force replaces a named one",
        body=m.CreateSecret,
        response=m.SecretInfo,
    )
    async def create_secret(req: Request) -> Reply:
        return reply(await secrets.create(req.decode(m.CreateSecret), req.caller.workspace))

    @route(
        "GET",
        "/secrets",
        "The named secrets (names and dates, never values)",
        response=m.SecretList,
    )
    async def list_secrets(req: Request) -> Reply:
        return reply(m.SecretList(secrets.named(req.caller.workspace)))

    @route("DELETE", "/secrets/{name}", "Delete a named secret")
    async def delete_secret(req: Request) -> Reply:
        await secrets.delete(req.path_params["name"], req.caller.workspace)
        return reply({})
