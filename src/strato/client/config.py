"""Where the control plane is, and starting the embedded one when none answers.

``STRATO_SERVER_URL`` names the control plane (default ``http://127.0.0.1:7749``);
``STRATO_HOME`` (default ``~/.strato``) holds the embedded one's state and token.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from strato import exceptions as exc
from strato import settings

DEFAULT_PORT = settings.PORT.default
START_TIMEOUT_S = 60.0


def strato_home(env: Mapping[str, str] | None = None) -> Path:
    return settings.HOME.get(env)


def server_url(home: Path | None = None) -> str:
    return settings.SERVER_URL.get().rstrip("/")


def read_token(home: Path | None = None) -> str:
    if given := settings.TOKEN.get():
        return given
    path = (home or strato_home()) / "token"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise exc.AuthError(
            f"no API token: set STRATO_TOKEN, or run on the control plane's machine where "
            f"{path} exists"
        ) from None


def ping(url: str, timeout: float = 1.0) -> dict | None:
    """The control plane's /health answer, or None when nothing answers."""
    from . import tls

    try:
        context = tls.client_context() if url.startswith("https:") else None
        with urllib.request.urlopen(f"{url}/health", timeout=timeout, context=context) as resp:
            return json.loads(resp.read())
    except (OSError, urllib.error.URLError, ValueError, exc.InvalidError):
        return None


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def ensure_server(
    progress: Callable[[str], None] | None = None, timeout: float = START_TIMEOUT_S
) -> tuple[str, str]:
    """(url, token) of a control plane that answers, starting the embedded one if needed.

    Never inside a container: a function's code calling another function (``.remote()``
    in a container) would otherwise start a second control plane there."""
    if settings.IN_CONTAINER.get():
        raise exc.ExecutionError(
            "a container never starts or dials a control plane: calls from inside a "
            "container go over the container's channel, which this process does not have "
            "(it was not started by strato's container entrypoint, or its channel closed)"
        )
    home = strato_home()
    url = server_url(home)
    if ping(url) is not None:
        return url, read_token(home)
    if not is_loopback(url):
        raise exc.ConnectionError(
            f"no strato control plane answers at {url}; check STRATO_SERVER_URL"
        )
    home.mkdir(mode=0o700, parents=True, exist_ok=True)  # private: state, tokens, logs
    (home / "logs").mkdir(mode=0o700, exist_ok=True)
    with _locked(home / "server.lock"):
        if ping(url) is None:  # another client may have started it while we waited
            start_server(url, home, progress, timeout)
    return url, read_token(home)


@contextlib.contextmanager
def _locked(path: Path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def start_server(
    url: str, home: Path, progress: Callable[[str], None] | None, timeout: float
) -> int:
    """Start the embedded control plane in the background; returns its pid once it answers."""
    port = urlsplit(url).port or DEFAULT_PORT
    host = urlsplit(url).hostname or "127.0.0.1"
    if progress:
        progress(f"starting the strato control plane at {url} (state in {home})")
    env = dict(os.environ, STRATO_HOME=str(home), STRATO_PORT=str(port), STRATO_HOST=host)
    log_path = home / "logs" / "server.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "strato.server"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            umask=0o077,  # its state, blobs, tokens and logs are this user's alone
        )
    # reap it when it exits, so a stopped server does not linger as our zombie
    threading.Thread(target=proc.wait, name="strato-server-reaper", daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(url, timeout=0.5) is not None:
            return proc.pid
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise exc.ConnectionError(
                f"the strato control plane exited with code {proc.returncode} while starting; "
                f"end of {log_path}:\n" + "\n".join(tail)
            )
        time.sleep(0.05)
    proc.kill()
    raise exc.ConnectionError(
        f"the strato control plane did not answer within {timeout:g}s; see {log_path}"
    )
