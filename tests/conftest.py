"""Shared fixtures: a real strato control plane (with its local worker agent) per session.

``strato_server`` starts the embedded control plane the way a user's first call does
(``strato.client.config.ensure_server``) with a fresh ``STRATO_HOME`` and a free port, points
this process (``STRATO_HOME`` / ``STRATO_SERVER_URL``) at it, and stops it at the end,
checking that no process of it is left behind. ``ServerHandle.restart()`` kills the control
plane and starts it again on the same home and port. ``dedicated_server(env)`` runs a second,
short-lived control plane with its own environment (GPU inventory, payload limits). A
stopped control plane's home is deleted unless STRATO_TEST_KEEP_HOME is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
INTEGRATION_DIR = TESTS_DIR / "integration"
STOP_TIMEOUT_S = 30.0
# the local PostgreSQL server's admin connection (tests make and drop databases there)
PG_ADMIN = os.environ.get("STRATO_TEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=test")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # a run stopped with SIGTERM (`timeout`, a CI runner) stops like one stopped with ^C:
    # fixtures tear down, so control planes stop and their homes under /tmp are removed
    signal.signal(signal.SIGTERM, _interrupt)


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server (its SQLAlchemy URL), dropped after."""
    import psycopg

    name = "strato_test_" + secrets.token_hex(4)
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> Iterator[str]:
    """The store's database URL: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    with postgres_database() as url:
        yield url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def processes_of(home: Path) -> list[tuple[int, str]]:
    """Live processes whose environment or command line mentions ``home`` (server, worker
    agent, containers: a container's channel socket lives under ``home``)."""
    needle = str(home).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if (needle in environ or needle in cmdline) and pid_alive(int(entry)):
            found.append((int(entry), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


def container_pid(container_id: str) -> int | None:
    """The pid of the process of container ``container_id`` (``STRATO_CONTAINER_ID``)."""
    needle = f"STRATO_CONTAINER_ID={container_id}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle in environ and b"strato.container" in cmdline and pid_alive(int(entry)):
            return int(entry)
    return None


def stored_map_call(home: Path, function_id: str, n: int, page: int = 1000) -> dict:
    """The newest ``n``-input map call of a function as the store has it (inputs done,
    successes, attempts), and the indices of its outputs as a client paging through the
    raw API (``page`` at a time, no client-side de-duplication) receives them. The
    database gets the outputs behind the answers (the store's journal has them first), so
    this waits, with a timeout, for it to have all ``n``."""
    import sqlite3

    from strato.client import session
    from strato.protocol import messages as m

    deadline = time.monotonic() + 60
    while True:
        db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True)
        try:
            (call_id,) = db.execute(
                "SELECT call_id FROM calls WHERE function_id = ? AND kind = 'map' "
                "AND n_inputs = ? ORDER BY created_at DESC LIMIT 1",
                (function_id, n),
            ).fetchone()
            done, successes, attempts = db.execute(
                "SELECT SUM(status = 'done'), SUM(out_status = 'success'), SUM(attempts) "
                "FROM inputs WHERE call_id = ?",
                (call_id,),
            ).fetchone()
        finally:
            db.close()
        if done == n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    indices, after = [], 0
    while True:
        got = session.api().call(
            "GET",
            f"/calls/{call_id}/outputs",
            None,
            m.Outputs,
            params={"after": after, "limit": page},
        )
        if not got.outputs:
            break
        indices += [o.idx for o in got.outputs if o.gen_index is None]
        after = got.last_seq
    return {"done": done, "successes": successes, "attempts": attempts, "indices": indices}


def live_containers(app_id: str) -> list[str]:
    """Ids of the containers of an app that the control plane counts as ready."""
    from strato.client import session
    from strato.protocol import messages as m

    listing = session.api().call(
        "GET", "/containers", None, m.ContainerList, params={"app": app_id}
    )
    return [c.container_id for c in listing.containers if c.state == "ready"]


@dataclass
class ServerHandle:
    home: Path
    url: str
    port: int

    @property
    def pid(self) -> int:
        return json.loads((self.home / "server.json").read_text())["pid"]

    def activate(self) -> None:
        """Point this process's strato client at this control plane."""
        from strato.client import session

        os.environ["STRATO_HOME"] = str(self.home)
        os.environ["STRATO_SERVER_URL"] = self.url
        session.reset()

    def start(self) -> None:
        from strato.client.config import ensure_server

        self.activate()
        ensure_server(progress=None)
        self.wait_for_worker()

    def wait_for_worker(self, timeout: float = 30.0) -> None:
        """Wait until the local worker agent has registered its node."""
        from strato.client import session
        from strato.protocol import messages as m

        def ready():
            nodes = session.api().call("GET", "/nodes", None, m.NodeList).nodes
            return any(n.state == "ready" for n in nodes)

        wait_until(ready, timeout, "the local worker agent to register", every=0.1)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Signal the control plane and wait for it to be gone; returns its old pid."""
        pid = self.pid
        os.kill(pid, sig)
        wait_until(lambda: not pid_alive(pid), STOP_TIMEOUT_S, f"control plane {pid} to exit")
        return pid

    def restart(self) -> None:
        """SIGKILL the control plane and start it again on the same home and port."""
        from strato.client.config import start_server

        self.kill(signal.SIGKILL)
        start_server(self.url, self.home, None, 60.0)
        self.wait_for_worker()

    def stop(self) -> None:
        """SIGTERM (then SIGKILL) the control plane; fail if any of its processes remain."""
        try:
            pid = self.pid
        except (OSError, ValueError):
            pid = None
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        # the worker agent stops its containers (5 s grace) once its parent is gone
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while processes_of(self.home) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = processes_of(self.home)
        for stray, _ in left:
            with contextlib.suppress(OSError):
                os.kill(stray, signal.SIGKILL)
        if not os.environ.get("STRATO_TEST_KEEP_HOME"):  # removed even when the check fails
            shutil.rmtree(self.home, ignore_errors=True)
        assert not left, f"processes left behind by the control plane: {left}"


def _new_server() -> ServerHandle:
    home = Path(tempfile.mkdtemp(prefix="strato-test-"))
    port = free_port()
    return ServerHandle(home, f"http://127.0.0.1:{port}", port)


_SAVED_ENV = ("STRATO_HOME", "STRATO_SERVER_URL")


def restore_env(saved: dict[str, str | None]) -> None:
    """Put back environment variables saved as ``{name: value, or None where unset}``."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def dedicated_server(env: dict[str, str]) -> Iterator[ServerHandle]:
    """A second control plane whose process (and local worker agent) gets ``env``; the
    client points at it inside the block and back at the previous one afterwards."""
    saved = {k: os.environ.get(k) for k in (*_SAVED_ENV, *env)}
    handle = _new_server()
    os.environ.update(env)
    try:
        handle.start()
        restore_env({k: saved[k] for k in env})  # only the server needed them
        yield handle
    finally:
        from strato.client import session

        try:
            handle.stop()
        finally:
            restore_env(saved)
            session.reset()


@pytest.fixture(scope="session")
def strato_server() -> Iterator[ServerHandle]:
    """The session's control plane; the client of this process points at it.

    Its containers use the ``process`` runtime unless ``STRATO_RUNTIME`` says otherwise:
    the tests share files with their functions (attempt counters, progress markers) and
    keep ``STRATO_HOME`` under /tmp, which an isolating runtime hides from containers."""
    saved = {k: os.environ.get(k) for k in (*_SAVED_ENV, "PYTHONPATH", "STRATO_RUNTIME")}
    os.environ.setdefault("STRATO_RUNTIME", "process")
    # subprocesses started by tests import the test apps from here
    old_pp = saved["PYTHONPATH"]
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(INTEGRATION_DIR), *([old_pp] if old_pp else [])]
    )
    if str(INTEGRATION_DIR) not in sys.path:
        sys.path.insert(0, str(INTEGRATION_DIR))
    handle = _new_server()
    try:
        handle.start()
        yield handle
    finally:
        from strato.client import session

        try:
            session.reset()
            handle.stop()
        finally:
            restore_env(saved)


@pytest.fixture
def server(strato_server: ServerHandle) -> ServerHandle:
    """The session's control plane, with the client pointed at it (again)."""
    if os.environ.get("STRATO_SERVER_URL") != strato_server.url:
        strato_server.activate()
    return strato_server
