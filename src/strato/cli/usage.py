"""``strato usage``: metered CPU, memory and GPU seconds and cost."""

from __future__ import annotations

import click

from strato.client import session
from strato.protocol import messages as m


@click.command("usage")
@click.option("--app", "app", help="Only this app (name or id).")
@click.option("--since", default="1d", show_default=True, help="30m, 12h, 1d, 2w, or a unix time.")
@click.option(
    "--by",
    type=click.Choice(["app", "function", "provider", "gpu"]),
    default="app",
    show_default=True,
)
def usage(app: str | None, since: str, by: str) -> None:
    """What containers used (CPU-s, memory GiB-s, GPU-s) and cost, grouped."""
    params = {"by": by, "since": since}
    if app:
        params["app"] = app
    r = session.api(progress_cb=None).call("GET", "/usage", None, m.UsageReport, params=params)
    click.echo(
        f"{by.upper():<36}{'CONTAINERS':>11}{'SECONDS':>11}{'CPU-S':>11}{'GIB-S':>11}"
        f"{'GPU-S':>11}{'COST $':>10}"
    )
    for row in [*r.rows, r.total]:
        click.echo(
            f"{row.key[:35]:<36}{row.containers:>11}{row.seconds:>11.1f}{row.cpu_s:>11.1f}"
            f"{row.memory_gib_s:>11.1f}{row.gpu_s:>11.1f}{row.cost:>10.4f}"
        )
