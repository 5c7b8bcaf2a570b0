"""``strato provider list|offers``: the providers the broker buys from, and their offers."""

from __future__ import annotations

import click

from strato import exceptions as exc
from strato.client import session
from strato.protocol import messages as m


@click.group("provider")
def provider_group() -> None:
    """Providers the broker buys nodes from (configured in $STRATO_HOME/providers.toml)."""


@provider_group.command("list")
def provider_list() -> None:
    """Enabled providers, the nodes bought from them, and the broker's limits."""
    st = session.api(progress_cb=None).call("GET", "/broker", None, m.BrokerStatus)
    if not st.configured:
        click.echo(f"no providers file at {st.config_path}: nothing is bought")
    else:
        click.echo(
            f"max_nodes {st.max_nodes}, budget ${st.budget_per_hour:.2f}/h, spending "
            f"${st.spend_per_hour:.2f}/h; {st.failovers} failovers, {st.preemptions} "
            f"preemptions, {st.moves} moved to a cheaper node"
        )
    click.echo(f"{'PROVIDER':<16}{'ENABLED':<9}{'KIND':<6}{'OFFERS':>7}{'SPOT':>6}{'NODES':>7}")
    for p in st.providers:
        nodes = f"{p.nodes}/{p.max_nodes}" if p.max_nodes is not None else str(p.nodes)
        click.echo(
            f"{p.name:<16}{'yes' if p.enabled else 'no':<9}{p.kind:<6}{p.offers:>7}"
            f"{'yes' if p.spot else 'no':>6}{nodes:>7}"
        )
    live = [i for i in st.instances if i.state in ("provisioning", "running")]
    if live:
        click.echo("")
        for i in live:
            kind = "spot" if i.spot else "on-demand"
            gpus = f"{i.gpu}x{i.gpu_count}" if i.gpu else "no GPU"
            click.echo(
                f"{i.instance_id}  {i.state:<13}{i.offer_id}  {gpus}  {kind} "
                f"${i.price_per_hour:.3f}/h  {i.node_id or ''}"
            )
    for b in st.blocked:
        click.echo(f"cooling down: {b}")


FIXED = ("hosts", "ray")  # providers of nodes already there: their offers come from the server


@provider_group.command("offers")
@click.option("--gpu", help="Only offers of this GPU type (H100, A100-80GB, L4...).")
@click.option("--count", type=int, default=None, help="With at least this many GPUs.")
@click.option("--provider", "provider", help="Only this provider's offers.")
@click.option("--region", help="Only this region (or its zones: 'us' matches 'us-east-1').")
@click.option("--spot", is_flag=True, help="Only offers sold as spot (priced as spot).")
@click.option("--limit", type=int, default=20, show_default=True)
def provider_offers(
    gpu: str | None,
    count: int | None,
    provider: str | None,
    region: str | None,
    spot: bool,
    limit: int,
) -> None:
    """The catalog's offers (STRATO_SIM_OFFERS), and the idle joined hosts and Ray nodes
    at their declared prices (from the control plane), cheapest first."""
    from strato.protocol.gpu import parse_gpu
    from strato.providers.base import Offer
    from strato.providers.catalog import PROVIDERS, CatalogMissing, load_offers

    want = parse_gpu(gpu)[0].type if gpu else None
    if provider is not None and provider not in (*PROVIDERS, *FIXED):
        names = ", ".join((*PROVIDERS, *FIXED))
        raise exc.InvalidError(f"unknown provider {provider!r}: use one of {names}")
    offers: list[Offer] = []
    if provider is None or provider in FIXED:
        offers += _fixed_offers(spot)
    if provider not in FIXED:
        try:
            offers += load_offers()
        except CatalogMissing as e:
            if provider is not None:
                raise exc.NotFoundError(str(e)) from None
            click.echo(f"(no catalog: {e})", err=True)
    rows = []
    for o in offers:
        if want is not None and o.gpu != want:
            continue
        if count is not None and o.gpu_count < count:
            continue
        if provider is not None and o.provider != provider:
            continue
        r = region.lower() if region else None
        if r and not (o.region.lower() == r or o.region.lower().startswith(r + "-")):
            continue
        price = o.spot_price if spot else o.price
        if price is None:
            continue
        rows.append((price, o))
    rows.sort(key=lambda x: (x[0], x[1].offer_id))
    click.echo(f"{'PRICE/H':>9}  {'GPU':<14}{'CPU':>5}{'MEM GiB':>9}  OFFER")
    for price, o in rows[:limit]:
        gpus = f"{o.gpu}x{o.gpu_count}" if o.gpu else "-"
        click.echo(f"{price:>9.3f}  {gpus:<14}{o.cpu:>5g}{o.memory_gib:>9g}  {o.offer_id}")
    if len(rows) > limit:
        click.echo(f"... {len(rows) - limit} more (--limit)")


def _fixed_offers(spot: bool) -> list:
    """The offers of the control plane's joined hosts and Ray nodes (none as spot)."""
    from strato.providers.base import Offer

    if spot:
        return []
    try:
        st = session.api(progress_cb=None).call("GET", "/broker", None, m.BrokerStatus)
    except exc.ConnectionError as e:
        click.echo(f"(joined hosts and Ray nodes not listed: {e})", err=True)
        return []
    return [
        Offer(
            o.provider,
            o.instance_type,
            o.gpu,
            o.gpu_count,
            o.cpu,
            o.memory_gib,
            o.price_per_hour,
            None,
            o.region,
            o.offer_id.rsplit("/", 1)[-1],
        )
        for o in st.offers
    ]
