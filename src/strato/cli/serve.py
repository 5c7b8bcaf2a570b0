"""``strato serve FILE``: run an app's web endpoints with live reload.

The command runs the app in a child process (``strato _serve-child``: ``app.run()`` until
told to stop) and watches the ``*.py`` files under the app file's folder. When one
changes it starts a new child first; once that one's app runs, it stops the old child.
Both apps have the same name, so the endpoints keep their URLs (an ephemeral app's
routes are ``/<name>-dev/<label>``; an unnamed app is named after its file): the gateway
sends new requests to the new app and lets the old one finish what it is serving. A
file that no longer loads leaves the running version in place.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

POLL_S = 0.5
START_TIMEOUT_S = 300.0
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "node_modules", ".mypy_cache", ".ruff_cache"}
MAX_FILES = 5000


def snapshot(root: Path) -> dict[str, float]:
    """mtime of every ``*.py`` under root (hidden and environment folders skipped)."""
    out: dict[str, float] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                try:
                    out[path] = os.stat(path).st_mtime
                except OSError:
                    continue
                if len(out) >= MAX_FILES:
                    return out
    return out


class Child:
    """One running version of the app."""

    def __init__(self, file: str) -> None:
        fd, self.ready_path = tempfile.mkstemp(prefix="strato-serve-", suffix=".json")
        os.close(fd)
        os.unlink(self.ready_path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "strato.cli.main", "_serve-child", file, self.ready_path]
        )

    def wait_ready(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.ready_path):
                try:
                    with open(self.ready_path) as f:
                        return json.load(f)
                except (OSError, ValueError):
                    pass
            if self.proc.poll() is not None:
                return None
            time.sleep(0.05)
        return None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        try:
            os.unlink(self.ready_path)
        except OSError:
            pass


def _show(info: dict) -> None:
    click.echo(f"serving app {info['app_id']}")
    for name, url in info["urls"].items():
        click.echo(f"  {name}: {url}")


def serve(file: str, timeout: float | None) -> None:
    path = Path(file).resolve()
    root = path.parent
    live: list[Child] = []  # every child not yet stopped: Ctrl-C stops them all
    try:
        current = Child(str(path))
        live.append(current)
        info = current.wait_ready(START_TIMEOUT_S)
        if info is None:
            raise click.ClickException(f"{file} did not start; see the error above")
        _show(info)
        click.echo(f"watching {root} for changes (Ctrl-C to stop)")
        seen = snapshot(root)
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            time.sleep(POLL_S)
            now = snapshot(root)
            if now == seen:
                if current.proc.poll() is not None:
                    raise click.ClickException("the app exited")
                continue
            seen = now
            click.echo("files changed: reloading")
            nxt = Child(str(path))
            live.append(nxt)
            new_info = nxt.wait_ready(START_TIMEOUT_S)
            if new_info is None:
                nxt.stop()
                live.remove(nxt)
                click.secho("the new version did not start; the old one keeps serving", fg="red")
                continue
            old, current, info = current, nxt, new_info
            _show(info)
            old.stop()  # its app drains into the new one
            live.remove(old)
    except KeyboardInterrupt:
        pass
    finally:
        for child in reversed(live):  # the newest first: it serves
            child.stop()


def serve_child(file: str, ready_path: str) -> None:
    """Run the app until SIGINT/SIGTERM; write its endpoints' URLs to ready_path."""
    from .loader import load_app

    app, _, _ = load_app(file)
    if not app.name:
        app.name = Path(file).stem  # an unnamed app's URLs would change with each reload
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with app.run():
        urls = {}
        for name, fn in app.registered_functions.items():
            if fn._spec is not None and fn._spec.web is not None:
                urls[name] = fn.get_web_url()
        tmp = ready_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"app_id": app.app_id, "urls": urls}, f)
        os.replace(tmp, ready_path)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
