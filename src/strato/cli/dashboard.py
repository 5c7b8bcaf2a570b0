"""``strato dashboard``: the control plane's web dashboard (served at ``/ui``)."""

from __future__ import annotations

import webbrowser

import click

from strato import settings
from strato.client import config


def dashboard_url(server_url: str) -> str:
    return f"{server_url.rstrip('/')}/ui"


@click.command("dashboard")
@click.option("--no-open", is_flag=True, help="Print the URL only; do not open a browser.")
def dashboard(no_open: bool) -> None:
    """Print (and open, where a browser exists) the dashboard's URL.

    The page asks for the API token once ($STRATO_HOME/token, or STRATO_TOKEN) and keeps
    a session cookie for 12 hours."""
    url, _ = config.ensure_server(progress=lambda text: click.echo(text, err=True))
    ui = dashboard_url(url)
    click.echo(ui)
    token = settings.TOKEN.get()
    where = "STRATO_TOKEN" if token else str(config.strato_home() / "token")
    click.echo(f"log in with the API token ({where})", err=True)
    if no_open:
        return
    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        return  # no browser here (a server, CI): the URL is printed
    browser.open(ui, new=2)
