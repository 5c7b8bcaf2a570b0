"""``strato workspace create|list`` and ``strato token create|list|revoke``.

Workspaces are made by the installation's operator (its own token, ``$STRATO_HOME/token``);
a workspace's admin makes, lists and revokes its tokens. ``STRATO_WORKSPACE`` picks the
workspace the installation's token acts in (``strato token create`` included).
"""

from __future__ import annotations

import time

import click

from strato.client import session
from strato.protocol import messages as m

ROLES = ("admin", "developer", "read-only")


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@click.group("workspace")
def workspace_group() -> None:
    """Workspaces: each owns its apps, functions, Dicts, Queues, Volumes, Secrets,
    sandboxes, logs and usage (the installation's token only)."""


@workspace_group.command("create")
@click.argument("name")
def workspace_create(name: str) -> None:
    """Create workspace NAME."""
    info = session.api(progress_cb=None).call(
        "POST", "/workspaces", m.CreateWorkspace(name), m.WorkspaceInfo
    )
    click.echo(f"created workspace {info.name!r}")
    click.echo(
        f"give it an admin token: STRATO_WORKSPACE={info.name} strato token create --role admin"
    )


@workspace_group.command("list")
def workspace_list() -> None:
    """Every workspace."""
    listing = session.api(progress_cb=None).call("GET", "/workspaces", None, m.WorkspaceList)
    width = max(4, *(len(w.name) for w in listing.workspaces))
    click.echo(f"{'NAME':<{width}}  CREATED")
    for w in listing.workspaces:
        click.echo(f"{w.name:<{width}}  {_when(w.created_at)}")


@click.group("token")
def token_group() -> None:
    """API tokens of a workspace (its admins only): STRATO_TOKEN=<token> selects one."""


@token_group.command("create")
@click.option("--role", type=click.Choice(ROLES), default="developer", show_default=True)
@click.option("--name", default="", help="A note to recognise it by in `strato token list`.")
def token_create(role: str, name: str) -> None:
    """Create a token of the current workspace; it is shown once (only its hash is kept)."""
    new = session.api(progress_cb=None).call(
        "POST", "/tokens", m.CreateToken(role, name), m.NewToken
    )
    click.echo(new.token)
    click.echo(
        f"token {new.info.token_id} ({new.info.role}) of workspace {new.info.workspace!r}: "
        "shown once; use it as STRATO_TOKEN",
        err=True,
    )


@token_group.command("list")
def token_list() -> None:
    """The current workspace's tokens (never their secrets)."""
    tokens = session.api(progress_cb=None).call("GET", "/tokens", None, m.TokenList).tokens
    if not tokens:
        click.echo("no tokens; create one with `strato token create --role developer`")
        return
    click.echo(f"{'ID':<16}  {'ROLE':<9}  {'CREATED':<19}  {'STATE':<7}  NAME")
    for t in tokens:
        state = "revoked" if t.revoked else "active"
        click.echo(f"{t.token_id:<16}  {t.role:<9}  {_when(t.created_at)}  {state:<7}  {t.name}")


@token_group.command("revoke")
@click.argument("token_id")
def token_revoke(token_id: str) -> None:
    """Revoke token TOKEN_ID of the current workspace: refused from its next request."""
    session.api(progress_cb=None).call("DELETE", f"/tokens/{token_id}")
    click.echo(f"revoked token {token_id}")
