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


# ---------------------------------------------------------------------- strato node


def _call(
    method: str,
    path: str,
    typ: type | None = None,
    params: dict | None = None,
    timeout: float | None = None,
):
    from strato.client import session

    return session.api().call(method, path, None, typ, params=params, timeout=timeout)


def _gpus(g: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in g.items()) or "-"


@click.group("node")
def node_group() -> None:
    """The nodes of this control plane: list, describe, cordon, drain, remove."""


@node_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per node.")
def node_list(as_json: bool) -> None:
    """Nodes with their state, capacity, reservations and containers."""
    import msgspec

    from strato.protocol import messages as m

    nodes = _call("GET", "/cluster/nodes", m.NodeDetailList).nodes
    if as_json:
        for n in nodes:
            click.echo(msgspec.json.encode(n).decode())
        return
    click.echo(
        f"{'NODE':<18} {'NAME':<20} {'PROVIDER':<9} {'STATE':<9} "
        "CPU        MEM MiB        GPUS  CONTAINERS"
    )
    for n in nodes:
        click.echo(
            f"{n.node_id:<18} {n.name[:20]:<20} {n.provider:<9} {n.state:<9} "
            f"{n.cpu_reserved:g}/{n.cpu:<6g} {n.memory_reserved_mb}/{n.memory_mb:<8} "
            f"{_gpus(n.gpus):<5} {len(n.containers)}"
        )


@node_group.command("describe")
@click.argument("node")
def node_describe(node: str) -> None:
    """One node (by id or name): inventory, labels, heartbeat, containers."""
    from strato.protocol import messages as m

    n = _call("GET", f"/cluster/nodes/{node}", m.NodeDetail)
    click.echo(f"node:        {n.node_id}\nname:        {n.name}\nprovider:    {n.provider}")
    click.echo(f"state:       {n.state}" + (f" ({n.lost_reason})" if n.lost_reason else ""))
    click.echo(f"cpu:         {n.cpu_reserved:g} of {n.cpu:g} reserved")
    click.echo(f"memory:      {n.memory_reserved_mb} of {n.memory_mb} MiB reserved")
    click.echo(f"gpus:        {_gpus(n.gpus)}\nregion:      {n.region or '-'}")
    click.echo("labels:      " + (",".join(f"{k}={v}" for k, v in n.labels.items()) or "-"))
    click.echo(f"heartbeat:   {n.heartbeat_age_s:.1f}s ago")
    click.echo(f"containers:  {len(n.containers)}")
    for cid in n.containers:
        click.echo(f"  {cid}")


@node_group.command("cordon")
@click.argument("node")
def node_cordon(node: str) -> None:
    """Place no new containers on NODE (what runs there goes on)."""
    from strato.protocol import messages as m

    n = _call("POST", f"/cluster/nodes/{node}/cordon", m.NodeDetail)
    click.echo(f"node {n.node_id} ({n.name}) cordoned")


@node_group.command("uncordon")
@click.argument("node")
def node_uncordon(node: str) -> None:
    """Place containers on NODE again."""
    from strato.protocol import messages as m

    n = _call("POST", f"/cluster/nodes/{node}/uncordon", m.NodeDetail)
    click.echo(f"node {n.node_id} ({n.name}) takes containers again")


@node_group.command("drain")
@click.argument("node")
@click.option("--grace", default=300.0, show_default=True, help="Seconds running inputs get.")
@click.option("--wait", default=60.0, show_default=True, help="Seconds to wait for it to empty.")
def node_drain(node: str, grace: float, wait: float) -> None:
    """Cordon NODE, let its running inputs finish, then stop its containers."""
    from strato.protocol import messages as m

    n = _call(
        "POST",
        f"/cluster/nodes/{node}/drain",
        m.NodeDetail,
        params={"grace": grace, "wait": wait},
        timeout=wait + 30,
    )
    left = len(n.containers)
    click.echo(
        f"node {n.node_id} ({n.name}) drained"
        if not left
        else f"node {n.node_id} ({n.name}) draining: {left} containers still finishing"
    )


@node_group.command("remove")
@click.argument("node")
def node_remove(node: str) -> None:
    """Forget NODE (its containers count as lost; their inputs run elsewhere)."""
    _call("DELETE", f"/cluster/nodes/{node}")
    click.echo(f"node {node} removed (an agent that still runs joins again: stop it first)")
