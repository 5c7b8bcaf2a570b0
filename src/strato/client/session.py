"""A client session: the API connection plus what an app run needs around it (source
upload, app creation, live logs, heartbeats)."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable

from strato import exceptions as exc
from strato import settings
from strato.protocol import messages as m

from . import channel_api, console
from .config import ensure_server, strato_home
from .http import ApiBase, ApiClient
from .local_channel import LocalChannelClient
from .mounts import LocalMount

HEARTBEAT_S = 5.0
# after its app stopped, how long a run waits for the last lines of its containers
DRAIN_TIMEOUT_S = 60.0
_session: ApiBase | None = None
_lock = threading.Lock()


def progress(text: str) -> None:
    print(f"\u2022 {text}", file=sys.stderr, flush=True)


def api(progress_cb: Callable[[str], None] | None = progress) -> ApiBase:
    """The process-wide API client, starting the embedded control plane if none answers.
    In a container: the client over the container's channel (``channel_api.CURRENT``)."""
    global _session
    if channel_api.CURRENT is not None:
        return channel_api.CURRENT
    with _lock:
        if _session is None:
            url, token = ensure_server(progress_cb)  # refuses inside a container
            _session = _local_channel(url, token) or ApiClient(url, token)
        return _session


def _local_channel(url: str, token: str) -> LocalChannelClient | None:
    """A client over the control plane's channel socket, when the control plane at ``url``
    runs on this machine with its state in our ``STRATO_HOME`` (it says where its socket
    is in ``server.json``); None otherwise (HTTP then)."""
    if settings.CLIENT_HTTP.get():
        return None
    try:
        info = json.loads((strato_home() / "server.json").read_text())
        if info.get("url") != url or not info.get("channel"):
            return None
        return LocalChannelClient(url, token, info["channel"])
    except (OSError, ValueError):
        return None


def reset() -> None:
    """Forget the API client (tests, or after STRATO_SERVER_URL changed)."""
    global _session
    with _lock:
        if _session is not None:
            _session.close()
        _session = None


def upload_mount(client: ApiBase, mount: LocalMount) -> int:
    """Upload the source files the control plane does not have yet; returns how many."""
    shas = list(mount.files)
    if not shas:
        return 0
    missing = client.call("POST", "/blobs/check", m.BlobCheck(shas), m.MissingBlobs).missing
    for sha in missing:
        with open(mount.files[sha], "rb") as f:
            client.put_blob(sha, f.read())
    return len(missing)


class LogFollower:
    """Prints an app's container output live, each line tagged with its container, and
    keeps the app's heartbeat going. Stops with ``stop()``."""

    def __init__(
        self, client: ApiBase, app_id: str, *, quiet: bool = False, heartbeat: bool = True
    ) -> None:
        self.client = client
        self.app_id = app_id
        self.quiet = quiet
        self.heartbeat = heartbeat
        self.cursor = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one poll at a time prints and moves the cursor
        self._thread = threading.Thread(target=self._run, name="strato-logs", daemon=True)

    def start(self) -> LogFollower:
        self._thread.start()
        return self

    def _run(self) -> None:
        last_beat = 0.0
        while not self._stop.is_set():
            try:
                if self.heartbeat and time.monotonic() - last_beat > HEARTBEAT_S:
                    self.client.call("POST", f"/apps/{self.app_id}/heartbeat")
                    last_beat = time.monotonic()
                self.poll(timeout=HEARTBEAT_S / 2, background=True)
            except exc.Error:
                self._stop.wait(0.5)

    def poll(self, timeout: float, *, background: bool = False) -> int:
        after = self.cursor
        batch = self.client.call(
            "GET",
            f"/apps/{self.app_id}/logs",
            None,
            m.LogBatch,
            params={"after": after, "timeout": timeout},
            timeout=timeout + 30,
        )
        with self._lock:
            if (background and self._stop.is_set()) or self.cursor != after:
                return 0  # stop() has taken over: it reads these lines again
            return self._show(batch)

    def _show(self, batch: m.LogBatch) -> int:
        self.cursor = batch.cursor
        if not self.quiet:
            for line in batch.lines:
                if line.stream == "system":
                    progress(
                        f"{line.container_id}: {line.text}"
                        if line.container_id != "-"
                        else line.text
                    )
                    continue
                out = sys.stderr if line.stream == "stderr" else sys.stdout
                console.container_line(out, f"[{line.container_id}] ", line.text)
        return len(batch.lines)

    def stop(self, drain_s: float = 0.3, *, until_gone: bool = False) -> None:
        """Stop following, after printing what arrived during the last ``drain_s``.

        ``until_gone`` (the app was stopped): print every line of the app up to the end,
        that is until none of its containers is left (a container's lines reach the
        control plane before its exit report, over the same worker channel), then what
        is left; at most ``DRAIN_TIMEOUT_S``.

        The background thread is not waited for (it may be in a long-poll): what its poll
        brings back now is dropped, and read again here."""
        self._stop.set()
        self._thread.join(timeout=0.05)
        deadline = time.monotonic() + drain_s
        try:
            while self.poll(timeout=max(0.0, deadline - time.monotonic())):
                pass
            if until_gone:
                self._drain_until_gone()
        except exc.Error:
            pass

    def _drain_until_gone(self) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while True:
            while self.poll(timeout=0.0):
                pass
            info = self.client.call("GET", f"/apps/{self.app_id}", None, m.AppInfo)
            if not info.n_containers:
                while self.poll(timeout=0.0):  # what came with their exits
                    pass
                return
            if time.monotonic() > deadline:
                if not self.quiet:
                    progress(
                        f"stopped waiting for the output of {info.n_containers} "
                        f"container(s) of app {self.app_id} after {DRAIN_TIMEOUT_S:g}s"
                    )
                return
            self.poll(timeout=0.25)
