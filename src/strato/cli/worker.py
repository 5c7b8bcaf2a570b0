"""``strato worker start``: this machine joins a control plane as a node."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

import click

from strato import exceptions as exc
from strato import settings


def parse_labels(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` -> a dict (raises ``InvalidError`` naming the bad part)."""
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise exc.InvalidError(f"bad label {part!r}: write labels as key=value,key2=value2")
        labels[key.strip()] = value.strip()
    return labels


def agent_address(server: str, agent_port: int | None) -> tuple[str, str]:
    """(the HTTP API's URL, the ``tcp:host:port`` the agent dials) for ``--server``."""
    parts = urlsplit(server if "://" in server else f"http://{server}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise exc.InvalidError(
            f"bad --server {server!r}: give the control plane's URL, http://HOST:PORT"
        )
    port = parts.port or (443 if parts.scheme == "https" else settings.PORT.default)
    if agent_port is None:
        agent_port = port + 2
    host = parts.hostname
    return f"{parts.scheme}://{parts.netloc}", f"tcp:{host}:{agent_port}"


@click.group("worker")
def worker_group() -> None:
    """Run a worker agent: this machine as a node of a control plane."""


@worker_group.command("start")
@click.option(
    "--server", "server", required=True, help="The control plane's URL (http://HOST:PORT)."
)
@click.option(
    "--join-token",
    envvar="STRATO_JOIN_TOKEN",
    required=True,
    help="A token from `strato server join-token` (or STRATO_JOIN_TOKEN).",
)
@click.option("--name", default="", help="This node's name (default: the host name).")
@click.option("--labels", default="", help="Labels of this node: key=value,key2=value2.")
@click.option(
    "--agent-port",
    type=int,
    default=None,
    help="The control plane's agent port (default: STRATO_AGENT_PORT, else its API port + 2).",
)
@click.option(
    "--tls-ca",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Speak TLS to the control plane, trusting this CA bundle (PEM).",
)
def worker_start(
    server: str,
    join_token: str,
    name: str,
    labels: str,
    agent_port: int | None,
    tls_ca: str | None,
) -> None:
    """Join the control plane at --server and run its containers here, in the foreground.

    State (code, images, containers) is kept under STRATO_HOME on this machine."""
    from strato.client.config import strato_home
    from strato.client.tls import client_context
    from strato.worker.agent import WorkerAgent

    logging.basicConfig(
        level=settings.LOG_LEVEL.get(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        http_url, channel = agent_address(server, agent_port or settings.AGENT_PORT.get())
        node_labels = parse_labels(labels or settings.NODE_LABELS.get())
    except exc.Error as e:
        raise click.ClickException(str(e)) from None
    ca = tls_ca or settings.TLS_CA.get()
    # TLS with --tls-ca, or towards an https:// --server (the system's CAs then): verified
    tls = client_context(ca) if ca or http_url.startswith("https:") else None
    home = strato_home()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    agent = WorkerAgent(
        channel,
        join_token,
        home,
        name=name or settings.NODE_NAME.get() or None,
        provider="joined",
        server_url=http_url,
        tls=tls,
        labels=node_labels,
    )
    click.echo(f"joining {http_url} (agents at {channel[4:]}) as {agent.name}", err=True)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.request_stop)
        await agent.run()

    asyncio.run(run())


def _started_by(home: Path, pid: int) -> bool:
    import json

    try:
        return json.loads((home / "server.json").read_text()).get("pid") == pid
    except (OSError, ValueError):
        return False


def start_exposed(host: str, timeout: float = 60.0) -> str:
    """Start the control plane in the background listening on ``host`` (``strato server
    start --host``); the client still reaches it on loopback. Returns what to print."""
    import os
    import subprocess
    import time

    from strato.client import config

    url = config.server_url()
    if config.ping(url) is not None:
        return f"a control plane already answers at {url}"
    home = config.strato_home()
    (home / "logs").mkdir(mode=0o700, parents=True, exist_ok=True)
    log_path = home / "logs" / "server.log"
    port = urlsplit(url).port or settings.PORT.default
    env = dict(os.environ, STRATO_HOME=str(home), STRATO_HOST=host, STRATO_PORT=str(port))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "strato.server"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            umask=0o077,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # it answers once it wrote server.json (its listeners bound): read there, not over
        # HTTP, which may be HTTPS with a certificate for another name than loopback's
        if _started_by(home, proc.pid):
            return f"control plane listening on {host}:{port} (state in {home}); see {log_path}"
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise click.ClickException(f"the control plane exited while starting: {' '.join(tail)}")
        time.sleep(0.1)  # a process starting: nothing to long-poll yet
    raise click.ClickException(f"the control plane did not answer within {timeout:g}s")
