"""``strato sandbox list|exec|logs|stop`` (sandboxes from the command line)."""

from __future__ import annotations

import sys
import threading
import time

import click

from strato import exceptions as exc
from strato.client import session
from strato.protocol import messages as m


@click.group("sandbox")
def sandbox_group() -> None:
    """List sandboxes, run commands in them, follow their output, stop them."""


def _fail(e: exc.Error) -> None:
    raise click.ClickException(str(e))


@sandbox_group.command("list")
@click.option("--app", "app_name", default=None, help="Only the sandboxes of this app.")
def list_sandboxes(app_name: str | None) -> None:
    """The running sandboxes."""
    api = session.api()
    try:
        params = {}
        if app_name:
            params["app_id"] = api.call("GET", f"/apps/{app_name}", None, m.AppInfo).app_id
        got = api.call("GET", "/sandboxes", None, m.SandboxList, params=params)
    except exc.Error as e:
        _fail(e)
    rows = [["ID", "APP", "NAME", "STATUS", "RUNTIME", "AGE", "TAGS"]]
    for s in got.sandboxes:
        tags = ",".join(f"{k}={v}" for k, v in sorted(s.tags.items()))
        age = f"{time.time() - s.created_at:.0f}s"
        rows.append([s.sandbox_id, s.app_id, s.name or "-", s.status, s.runtime, age, tags])
    if len(rows) == 1:
        click.echo("no running sandboxes")
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _pump(stream, out) -> None:
    for chunk in iter(lambda: stream._chunk(), None):
        out.buffer.write(chunk)
        out.buffer.flush()


@sandbox_group.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("sandbox_id")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--workdir", default=None, help="The working directory in the sandbox.")
@click.option("--timeout", type=float, default=None, help="Kill it after this many seconds.")
def exec_command(
    sandbox_id: str, command: tuple[str, ...], workdir: str | None, timeout: float | None
) -> None:
    """Run COMMAND in a sandbox: its output streams here, its exit code is ours. Data
    piped into this command is its stdin."""
    from strato.sdk.sandbox import Sandbox

    try:
        p = Sandbox.from_id(sandbox_id).exec(*command, workdir=workdir, timeout=timeout, text=False)
        if not sys.stdin.isatty():
            while data := sys.stdin.buffer.read(1 << 20):
                p.stdin.write(data)
                p.stdin.drain()
        p.stdin.write_eof()
        p.stdin.drain()
        err = threading.Thread(target=_pump, args=(p.stderr, sys.stderr), daemon=True)
        err.start()
        _pump(p.stdout, sys.stdout)
        err.join()
        code = p.wait()
    except exc.Error as e:
        _fail(e)
    sys.exit(code)


@sandbox_group.command("logs")
@click.argument("sandbox_id")
def logs(sandbox_id: str) -> None:
    """Follow the output of a sandbox's entrypoint until it ends."""
    from strato.sdk.container_process import ContainerProcess

    p = ContainerProcess(sandbox_id, 1, text=False)
    try:
        err = threading.Thread(target=_pump, args=(p.stderr, sys.stderr), daemon=True)
        err.start()
        _pump(p.stdout, sys.stdout)
        err.join()
    except exc.NotFoundError:
        raise click.ClickException(
            f"sandbox {sandbox_id} has no entrypoint (or is gone): nothing to follow"
        ) from None
    except exc.Error as e:
        _fail(e)


@sandbox_group.command("stop")
@click.argument("sandbox_ids", nargs=-1, required=True)
def stop(sandbox_ids: tuple[str, ...]) -> None:
    """Terminate sandboxes."""
    from strato.sdk.sandbox import Sandbox

    for sid in sandbox_ids:
        try:
            Sandbox.from_id(sid).terminate()
        except exc.Error as e:
            _fail(e)
        click.echo(f"stopped {sid}")


@click.command("shell")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--app",
    "app_name",
    default="strato-shell",
    show_default=True,
    help="The app the shell's sandbox belongs to (made if missing).",
)
@click.option("--runtime", default=None, help="gvisor, bwrap or process (default: the server's).")
@click.option(
    "--image",
    "image_ref",
    default=None,
    help="An image: debian_slim or debian_slim:PYTHON_VERSION.",
)
@click.option(
    "--timeout",
    type=float,
    default=3600.0,
    show_default=True,
    help="End the sandbox after this many seconds.",
)
def shell(command: tuple[str, ...], app_name: str, runtime: str | None,
          image_ref: str | None, timeout: float) -> None:  # fmt: skip
    """An interactive shell (or COMMAND) in a fresh sandbox, on a real terminal."""
    import os
    import signal

    import strato
    from strato.sdk.sandbox import Sandbox

    image = None
    if image_ref:
        name, _, version = image_ref.partition(":")
        if name != "debian_slim":
            raise click.ClickException(f"--image {image_ref}: use debian_slim[:VERSION]")
        image = strato.Image.debian_slim(version or None)
    argv = list(command) or ["/bin/sh", "-c", "command -v bash >/dev/null && exec bash || exec sh"]
    try:
        app = strato.App.lookup(app_name, create_if_missing=True)
        sb = Sandbox.create(app=app, runtime=runtime, image=image, timeout=timeout)
    except exc.Error as e:
        _fail(e)
    interactive = sys.stdin.isatty()
    code = 1
    try:
        size = None
        if interactive:  # the terminal's own size (not $COLUMNS/$LINES)
            real = os.get_terminal_size(0)
            size = (real.columns, real.lines)
        p = sb.exec(*argv, pty=True, pty_size=size)
        saved = None
        if interactive:
            import termios
            import tty

            saved = termios.tcgetattr(0)
            tty.setraw(0)

            resized = threading.Event()

            def resizing() -> None:  # a request from the signal handler itself could wait
                while True:  # on the main thread, which is reading the output
                    resized.wait()
                    resized.clear()
                    now = os.get_terminal_size(0)
                    try:
                        p.resize(now.columns, now.lines)
                    except exc.Error:  # the shell has ended: nothing to resize
                        return

            threading.Thread(target=resizing, daemon=True).start()
            signal.signal(signal.SIGWINCH, lambda *_: resized.set())

        def typing() -> None:
            while data := os.read(0, 4096):
                p.stdin.write(data)
                p.stdin.drain()
            p.stdin.write_eof()
            p.stdin.drain()

        threading.Thread(target=typing, daemon=True).start()
        try:
            _pump(p.stdout, sys.stdout)
            code = p.wait()
        finally:
            if saved is not None:
                import termios

                termios.tcsetattr(0, termios.TCSADRAIN, saved)
    except exc.Error as e:
        _fail(e)
    finally:
        sb.terminate()
    sys.exit(code)
