"""The ``strato`` command."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import sys
import time

import click

from strato import exceptions as exc
from strato.client import config, session
from strato.protocol import messages as m

from .loader import load_app, pick_target


def _fail(e: BaseException) -> None:
    click.secho(f"Error: {e}", fg="red", err=True)
    sys.exit(1)


class _Group(click.Group):
    """Prints strato's errors as one clear line instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except exc.Error as e:
            _fail(e)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="strato")
def main() -> None:
    """strato: serverless compute for Python, on your own machines."""


# ---------------------------------------------------------------------- run / deploy


def _entrypoint_kwargs(fn, args: tuple[str, ...]) -> dict:
    """``--name value`` pairs for the entrypoint's parameters, converted by annotation."""
    params = inspect.signature(fn).parameters
    kwargs: dict = {}
    it = iter(args)
    for token in it:
        if not token.startswith("--"):
            raise exc.InvalidError(f"unexpected argument {token!r}: pass --name value")
        name = token[2:].replace("-", "_")
        if name not in params:
            raise exc.InvalidError(
                f"{fn.__name__}() has no parameter {name!r}; it takes "
                + (", ".join(params) or "none")
            )
        raw = next(it, None)
        if raw is None:
            raise exc.InvalidError(f"--{name} needs a value")
        ann = params[name].annotation
        kind = (
            ann
            if isinstance(ann, type)
            else {"int": int, "float": float, "bool": bool}.get(str(ann), str)
        )
        if kind is bool:
            kwargs[name] = raw.lower() in ("1", "true", "yes", "y")
        elif kind in (int, float):
            try:
                kwargs[name] = kind(raw)
            except ValueError:
                raise exc.InvalidError(f"--{name} expects {kind.__name__}, got {raw!r}") from None
        else:
            kwargs[name] = raw
    return kwargs


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("target")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--detach", is_flag=True, help="Keep the app running after this command exits.")
@click.option("-q", "--quiet", is_flag=True, help="Do not print progress or container logs.")
def run(target: str, args: tuple[str, ...], detach: bool, quiet: bool) -> None:
    """Run an app: FILE[::FUNCTION] [--param value ...].

    Runs the app's @app.local_entrypoint() (or the named entrypoint or function) with the
    app's functions running in containers; their output streams here, tagged by container.
    """
    app, module, name = load_app(target)
    kind, obj = pick_target(app, name)
    if quiet:
        session.api(progress_cb=None)
    with app.run(detach=detach, quiet=quiet):
        if kind == "entrypoint":
            result = obj(**_entrypoint_kwargs(obj, args))
            if inspect.iscoroutine(result):
                asyncio.run(result)
        else:
            if args:
                raise exc.InvalidError("arguments can only be passed to a local entrypoint")
            value = obj.remote_gen() if obj._spec.is_generator else obj.remote()
            if obj._spec.is_generator:
                for item in value:
                    click.echo(item)
            else:
                click.echo(value)


@main.command()
@click.argument("file")
@click.option("--name", help="Deploy under this name instead of the App's own.")
def deploy(file: str, name: str | None) -> None:
    """Deploy the app in FILE: its functions stay callable with Function.from_name()."""
    app, _, _ = load_app(file)
    app.deploy(name=name)
    # web endpoints: print each one's URL
    info = session.api().call("GET", f"/apps/{app.app_id}", None, m.AppInfo)
    for f in info.functions:
        if f.web_url:
            click.echo(f"  {f.name}: {f.web_url}")


@main.command()
@click.argument("file")
@click.option("--timeout", type=float, help="Stop after this many seconds.")
def serve(file: str, timeout: float | None) -> None:
    """Run the app in FILE with its web endpoints, reloading it when files change."""
    from .serve import serve as run_serve

    run_serve(file, timeout)


@main.command("_serve-child", hidden=True)
@click.argument("file")
@click.argument("ready_path")
def serve_child(file: str, ready_path: str) -> None:
    """(internal) one running version of `strato serve`."""
    from .serve import serve_child as run_child

    run_child(file, ready_path)


# ---------------------------------------------------------------------- apps


def _ago(ts: float) -> str:
    s = max(0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit} ago"
    return f"{int(s)}s ago"


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())


@main.group("app")
def app_group() -> None:
    """List, stop and read the logs and history of apps."""


@app_group.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include stopped apps.")
def app_list(show_all: bool) -> None:
    """List apps."""
    apps = session.api().call("GET", "/apps", None, m.AppList).apps
    rows = [
        [a.app_id, a.name or "-", a.state, str(a.n_containers), _ago(a.created_at)]
        for a in apps
        if show_all or a.state != "stopped"
    ]
    _table(rows, ["APP ID", "NAME", "STATE", "CONTAINERS", "CREATED"])


@app_group.command("history")
@click.argument("name")
def app_history(name: str) -> None:
    """List the apps named NAME, newest first: its deployments (and runs), stopped too."""
    apps = session.api().call("GET", f"/apps/{name}/history", None, m.AppList).apps
    n = len(apps)
    rows = [
        [f"v{n - i}", a.app_id, a.state, str(len(a.functions)), _ago(a.created_at)]
        for i, a in enumerate(apps)
    ]
    _table(rows, ["VERSION", "APP ID", "STATE", "FUNCTIONS", "CREATED"])


@app_group.command("stop")
@click.argument("app")
def app_stop(app: str) -> None:
    """Stop APP (by id or name): its containers stop and its functions refuse calls."""
    session.api().call("POST", f"/apps/{app}/stop")
    click.echo(f"stopped {app}")


@app_group.command("logs")
@click.argument("app")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
def app_logs(app: str, follow: bool) -> None:
    """Print the logs of APP (by id or name; a stopped app: the most recent of that name),
    each line tagged with its container."""
    client = session.api()
    cursor = 0
    while True:
        batch = client.call(
            "GET",
            f"/apps/{app}/logs",
            None,
            m.LogBatch,
            params={"after": cursor, "timeout": 10 if follow else 0},
            timeout=45,
        )
        for line in batch.lines:
            stamp = time.strftime("%H:%M:%S", time.localtime(line.ts))
            click.echo(f"{stamp} [{line.container_id}] {line.text.rstrip(chr(13))}")
        cursor = batch.cursor
        if not follow and not batch.lines:
            return
        if follow and batch.app_state == "stopped" and not batch.lines:
            return


# ---------------------------------------------------------------------- containers


@main.group("container")
def container_group() -> None:
    """Inspect running containers."""


@container_group.command("list")
@click.option("--app", help="Only this app's containers (id or name).")
def container_list(app: str | None) -> None:
    """List running containers."""
    params = {"app": app} if app else None
    cs = session.api().call("GET", "/containers", None, m.ContainerList, params=params)
    rows = [
        [c.container_id, c.app_id, c.function_name, c.node_id, c.state, _ago(c.started_at)]
        for c in cs.containers
    ]
    _table(rows, ["CONTAINER ID", "APP ID", "FUNCTION", "NODE", "STATE", "STARTED"])


# ---------------------------------------------------------------------- images


def _image_cache():
    from strato.worker.launch import image_cache

    return image_cache(config.strato_home())


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@main.group("image")
def image_group() -> None:
    """The image build cache of this machine ($STRATO_HOME/images)."""


@image_group.command("list")
def image_list() -> None:
    """List built images."""
    from strato.images import list_images

    rows = [
        [
            i.image_id,
            f"{i.release} / py{i.python_version}",
            str(len(i.layers)),
            _mb(i.size_bytes),
            _ago(i.created),
            " | ".join(i.steps[1:])[:60] or "-",
        ]
        for i in list_images(_image_cache())
    ]
    _table(rows, ["IMAGE ID", "BASE", "LAYERS", "SIZE", "BUILT", "STEPS"])


@image_group.command("rm")
@click.argument("image_id")
def image_rm(image_id: str) -> None:
    """Remove IMAGE_ID and the layers no other image uses."""
    from strato.images import remove_image

    freed = remove_image(_image_cache(), image_id)
    click.echo(f"removed {image_id}, freed {_mb(freed)}")


@image_group.command("prune")
@click.option("--keep", multiple=True, help="Image ids to keep (repeatable).")
def image_prune(keep: tuple[str, ...]) -> None:
    """Remove every image not running in a container (and not named with --keep)."""
    from strato.images import prune

    keep_ids = set(keep)
    if config.ping(config.server_url()) is not None:
        for c in (
            session.api(progress_cb=None)
            .call("GET", "/containers", None, m.ContainerList)
            .containers
        ):
            if c.image_id:
                keep_ids.add(c.image_id)
    freed = prune(_image_cache(), keep_ids)
    click.echo(f"pruned the image cache, freed {_mb(freed)}")


# ---------------------------------------------------------------------- server


@main.group("server")
def server_group() -> None:
    """Start, stop and inspect the control plane."""


def _server_pid() -> int | None:
    info = config.strato_home() / "server.json"
    try:
        return int(json.loads(info.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


@server_group.command("start")
@click.option(
    "--foreground", is_flag=True, help="Run in this terminal instead of in the background."
)
@click.option(
    "--host",
    default=None,
    help="Listen on this address (0.0.0.0: every one; needs the API token, see README).",
)
@click.option(
    "--provider",
    type=click.Choice(["local", "ray"]),
    default=None,
    help="Where nodes come from: this machine (local, the default), or every node of the "
    "Ray cluster at RAY_ADDRESS (ray). Also STRATO_PROVIDER.",
)
def server_start(foreground: bool, host: str | None, provider: str | None) -> None:
    """Start the control plane (and this machine's worker agent) if none answers."""
    if provider is not None:  # --- ray: the control plane's process reads it
        os.environ["STRATO_PROVIDER"] = provider
    if host is not None:  # --- cluster: listen beyond loopback (other machines join)
        os.environ["STRATO_HOST"] = host
        if not foreground:
            from .worker import start_exposed

            click.echo(start_exposed(host))
            return
    url = config.server_url()
    if config.ping(url) is not None:
        click.echo(f"a control plane already answers at {url}")
        return
    if foreground:
        from urllib.parse import urlsplit

        from strato.server.main import main as server_main

        parts = urlsplit(url)
        os.environ.setdefault("STRATO_PORT", str(parts.port or config.DEFAULT_PORT))
        os.environ.setdefault("STRATO_HOST", parts.hostname or "127.0.0.1")
        server_main()
        return
    config.ensure_server(session.progress)
    click.echo(f"control plane running at {url} (state in {config.strato_home()})")


@server_group.command("stop")
@click.option("--timeout", default=20.0, show_default=True, help="Seconds to wait.")
def server_stop(timeout: float) -> None:
    """Stop the control plane started from this STRATO_HOME."""
    pid = _server_pid()
    if pid is None:
        click.echo("no control plane is running from " + str(config.strato_home()))
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        click.echo("the control plane had already exited")
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            click.echo(f"stopped the control plane (pid {pid})")
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    click.echo(f"the control plane (pid {pid}) did not stop in {timeout:g}s; killed it")


@server_group.command("gc-blobs")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
def server_gc_blobs(dry_run: bool) -> None:
    """Delete the blobs no row names any more, older than STRATO_BLOB_GC_GRACE_S (the
    installation's operator: its own token)."""
    r = session.api(progress_cb=None).call(
        "POST", "/blobs/gc", m.BlobGc(dry_run), m.BlobGcReport, timeout=3600.0
    )
    verb = "would delete" if r.dry_run else "deleted"
    click.echo(
        f"{verb} {r.deleted} blobs ({_mb(r.bytes_freed)}); kept {r.kept} "
        f"({r.kept_young} unreferenced but within the grace period)"
    )


@server_group.command("status")
def server_status() -> None:
    """Say whether the control plane answers, and what it runs."""
    url = config.server_url()
    health = config.ping(url)
    if health is None:
        click.echo(f"no control plane answers at {url}")
        sys.exit(1)
    client = session.api(progress_cb=None)
    nodes = client.call("GET", "/nodes", None, m.NodeList).nodes
    containers = client.call("GET", "/containers", None, m.ContainerList).containers
    click.echo(f"control plane at {url}: pid {health['pid']}, version {health['version']}")
    click.echo(f"state in {config.strato_home()}")
    for n in nodes:
        gpus = ", ".join(f"{k} x{len(v)}" for k, v in n.info.gpus.items()) or "no GPUs"
        click.echo(
            f"node {n.node_id} ({n.info.name}, {n.info.provider}): {n.state}, "
            f"{n.info.cpu:g} CPU ({n.cpu_reserved:g} reserved), {n.info.memory_mb} MiB "
            f"({n.memory_reserved_mb} reserved), {gpus}"
        )
    click.echo(f"{len(containers)} containers running")


main.add_command(__import__("strato.cli.volume", fromlist=["volume"]).volume)  # volumes
main.add_command(__import__("strato.cli.secret", fromlist=["x"]).secret_group)  # secrets
main.add_command(__import__("strato.cli.state", fromlist=["x"]).dict_group)  # Dict
main.add_command(__import__("strato.cli.state", fromlist=["x"]).queue_group)  # Queue
main.add_command(__import__("strato.cli.dashboard", fromlist=["x"]).dashboard)  # /ui
main.add_command(__import__("strato.cli.sandbox", fromlist=["x"]).sandbox_group)  # sandboxes
main.add_command(__import__("strato.cli.sandbox", fromlist=["x"]).shell)  # strato shell
main.add_command(__import__("strato.cli.worker", fromlist=["x"]).worker_group)  # cluster
main.add_command(__import__("strato.cli.provider", fromlist=["x"]).provider_group)  # broker
main.add_command(__import__("strato.cli.usage", fromlist=["x"]).usage)  # metering
server_group.add_command(__import__("strato.cli.node", fromlist=["x"]).join_token_group)
main.add_command(__import__("strato.cli.node", fromlist=["x"]).node_group)  # cluster
main.add_command(__import__("strato.cli.workspace", fromlist=["x"]).workspace_group)  # issue 13
main.add_command(__import__("strato.cli.workspace", fromlist=["x"]).token_group)  # issue 13

if __name__ == "__main__":  # pragma: no cover
    main()
