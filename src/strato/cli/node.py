"""``strato server join-token``: the tokens worker agents of other machines join with."""

from __future__ import annotations

import time

import click

from strato.client.config import strato_home


@click.group("join-token", invoke_without_command=True)
@click.option("--name", default="", help="A name for a new token (shown in the list).")
@click.pass_context
def join_token_group(ctx: click.Context, name: str) -> None:
    """Make a join token (`strato worker start --join-token`); see also list, revoke.

    Run it where the control plane keeps its state (its STRATO_HOME)."""
    if ctx.invoked_subcommand is None:
        from strato.server.cluster.join_tokens import JoinTokens

        rec, token = JoinTokens(strato_home()).create(name)
        click.echo(token)
        click.echo(
            f"(join token {rec.id}: shown once; revoke with `strato server join-token "
            f"revoke {rec.id}`)",
            err=True,
        )


@join_token_group.command("list")
def join_token_list() -> None:
    """The join tokens (their ids and names; the tokens themselves are not kept)."""
    from strato.server.cluster.join_tokens import JoinTokens

    for t in JoinTokens(strato_home()).list():
        made = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t.created_at))
        click.echo(f"{t.id}  {made}  {t.name}")


@join_token_group.command("revoke")
@click.argument("token_id")
def join_token_revoke(token_id: str) -> None:
    """Revoke a join token: no new agent joins with it."""
    from strato.server.cluster.join_tokens import JoinTokens

    t = JoinTokens(strato_home()).revoke(token_id)
    click.echo(f"revoked join token {t.id} {t.name}".rstrip())
