"""Helpers of the many-machines tests: a control plane that agents join over TCP, and
worker agents (``strato worker start``) in this network namespace or in their own."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import INTEGRATION_DIR, ServerHandle, free_port, pid_alive, wait_until

from strato.client import config as client_config
from strato.client import serialization, session
from strato.protocol import messages as m


def start_control_plane(
    env: dict[str, str],
    host: str = "127.0.0.1",
    *,
    home: Path | None = None,
    port: int | None = None,
    agent_port: int = 0,
) -> ServerHandle:
    """A control plane without a local worker agent, listening for agents on
    ``agent_port`` (0: a free one; ``agent_port`` in its server.json); the client of this
    process points at it. ``home`` and ``port``: start it again where it was."""
    home = home or Path(tempfile.mkdtemp(prefix="strato-cluster-"))
    port = port or free_port()
    full = dict(
        os.environ,
        STRATO_HOME=str(home),
        STRATO_PORT=str(port),
        STRATO_HOST=host,
        STRATO_LOCAL_WORKER="0",
        STRATO_AGENT_PORT=str(agent_port),
        **env,
    )
    log = open(home / "server.log", "ab")  # noqa: SIM115 - the process keeps it
    subprocess.Popen(
        [sys.executable, "-m", "strato.server"],
        env=full,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    scheme = "https" if "STRATO_TLS_CERT" in env else "http"  # (the client: STRATO_TLS_CA)
    handle = ServerHandle(home, f"{scheme}://127.0.0.1:{port}", port)
    wait_until(lambda: client_config.ping(handle.url), 60, "the control plane to answer")
    handle.activate()
    return handle


def agent_port(handle: ServerHandle) -> int:
    return json.loads((handle.home / "server.json").read_text())["agent_port"]


def join_token(handle: ServerHandle, name: str = "test") -> str:
    out = subprocess.run(
        [sys.executable, "-m", "strato.cli.main", "server", "join-token", "--name", name],
        env=dict(os.environ, STRATO_HOME=str(handle.home)),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@dataclass
class Agent:
    name: str
    home: Path
    proc: subprocess.Popen
    netns: str | None = None
    log: Path = field(default_factory=Path)

    def kill_node(self) -> None:
        """SIGKILL the agent and every container it started (the whole node)."""
        pids = [self.proc.pid, *_pids_mentioning(self.home)]
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in _pids_mentioning(self.home):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if not os.environ.get("STRATO_TEST_KEEP_HOME"):
            shutil.rmtree(self.home, ignore_errors=True)


def _pids_mentioning(home: Path) -> list[int]:
    needle = str(home).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if needle in environ and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def start_agent(
    server_url: str,
    port: int,
    token: str,
    name: str,
    *,
    netns: str | None = None,
    labels: str = "",
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
) -> Agent:
    home = Path(tempfile.mkdtemp(prefix=f"strato-node-{name}-"))
    full = dict(
        os.environ,
        STRATO_HOME=str(home),
        STRATO_RUNTIME=os.environ.get("STRATO_RUNTIME", "process"),
        STRATO_WORKER_HEARTBEAT_S="0.5",
        PYTHONPATH=os.pathsep.join([str(INTEGRATION_DIR), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    )
    full.pop("STRATO_SERVER_URL", None)
    full.pop("STRATO_TLS_CA", None)  # (this process's, as a client): agents take --tls-ca
    argv = [
        sys.executable,
        "-m",
        "strato.cli.main",
        "worker",
        "start",
        "--server",
        server_url,
        "--join-token",
        token,
        "--name",
        name,
        "--agent-port",
        str(port),
    ]
    if labels:
        argv += ["--labels", labels]
    argv += list(extra)
    if netns is not None:  # a path (/proc/PID/ns/net): nsenter; a name: ip netns exec
        enter = (
            ["nsenter", f"--net={netns}"]
            if netns.startswith("/")
            else ["ip", "netns", "exec", netns]
        )
        argv = [*enter, *argv]
    log = home / "agent.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            argv, env=full, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT
        )
    return Agent(name, home, proc, netns, log)


def nodes() -> list[m.NodeStatus]:
    return session.api().call("GET", "/nodes", None, m.NodeList).nodes


def ready_nodes() -> dict[str, m.NodeStatus]:
    return {n.info.name: n for n in nodes() if n.state == "ready"}


def wait_nodes(names: set[str], timeout: float = 60.0) -> dict[str, m.NodeStatus]:
    return wait_until(
        lambda: (r := ready_nodes()) and names <= set(r) and r,
        timeout,
        f"nodes {sorted(names)} to join",
        every=0.1,
    )


def containers_by_node(app_id: str) -> dict[str, int]:
    listing = session.api().call(
        "GET", "/containers", None, m.ContainerList, params={"app": app_id}
    )
    out: dict[str, int] = {}
    for c in listing.containers:
        out[c.node_id] = out.get(c.node_id, 0) + 1
    return out


def stop_control_plane(handle: ServerHandle) -> None:
    session.reset()
    handle.stop()


@dataclass
class Joined:
    handle: ServerHandle
    token: str  # the join token the agents used
    port: int  # the control plane's agent port
    agents: list


@contextlib.contextmanager
def joined_nodes(
    names: tuple[str, ...],
    env: dict[str, str] | None = None,
    server_env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
) -> Iterator[Joined]:
    """A control plane (``server_env``) without a local worker and one agent per name
    (``env``, ``extra`` arguments) that joined it over TCP on this machine (their
    containers' channels go through the relay); the client of this process points at it
    inside the block and back where it was after."""
    from conftest import restore_env

    saved = {k: os.environ.get(k) for k in ("STRATO_HOME", "STRATO_SERVER_URL")}
    handle = start_control_plane(server_env or {})
    agents: list = []
    try:
        token, port = join_token(handle), agent_port(handle)
        for name in names:
            agents.append(start_agent(handle.url, port, token, name, env=env, extra=extra))
        wait_nodes(set(names))
        yield Joined(handle, token, port, agents)
    finally:
        for a in agents:
            a.stop()
        stop_control_plane(handle)
        restore_env(saved)
        session.reset()


@contextlib.contextmanager
def one_joined_node(
    name: str,
    env: dict[str, str] | None = None,
    server_env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
) -> Iterator[ServerHandle]:
    """``joined_nodes`` of one agent ``name``: its control plane's handle."""
    with joined_nodes((name,), env, server_env, extra) as joined:
        yield joined.handle


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    wait_until(lambda: not pid_alive(pid), timeout, f"process {pid} to exit")
    time.sleep(0)


class CallOutputs:
    """Every final output of one call as the control plane hands them out: a thread
    long-polls ``GET /calls/{id}/outputs`` by sequence number, as ``.map`` does, but keeps
    every output it is given, de-duplicating nothing (``.map`` drops an index it has seen),
    so that a test counts each input's outputs."""

    def __init__(self, call_id: str, n: int) -> None:
        self.call_id = call_id
        self.n = n
        self.followed: dict[int, list[m.OutputItem]] = {}
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    @property
    def done(self) -> int:
        return len(self.followed)

    def _poll(self, after: int, timeout: float) -> m.Outputs:
        return session.api().call(
            "GET",
            f"/calls/{self.call_id}/outputs",
            None,
            m.Outputs,
            params={"after": after, "timeout": timeout},
            timeout=timeout + 30,
        )

    def _follow(self) -> None:
        after = 0
        try:
            while len(self.followed) < self.n:
                out = self._poll(after, 5.0)
                after = out.last_seq
                for o in out.outputs:
                    if o.gen_index is None:
                        self.followed.setdefault(o.idx, []).append(o)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), (
            f"only {self.done} of {self.n} inputs have an output after {timeout}s"
        )
        assert self.error is None, self.error

    def history(self) -> dict[int, list[m.OutputItem]]:
        """The call's final outputs read again from sequence 0, all of them."""
        out: dict[int, list[m.OutputItem]] = {}
        after = 0
        while True:
            page = self._poll(after, 0.0)
            for o in page.outputs:
                if o.gen_index is None:
                    out.setdefault(o.idx, []).append(o)
            if not page.outputs:
                return out
            after = page.last_seq

    def assert_each_once(self, expected: Callable[[int], object]) -> None:
        """Each input has exactly one output, with its value: as they were handed out
        while the call ran, and as the control plane has them afterwards."""
        for what, got in (("handed out", self.followed), ("stored", self.history())):
            missing = [i for i in range(self.n) if i not in got]
            extra = sorted(set(got) - set(range(self.n)))
            twice = {i: len(v) for i, v in got.items() if len(v) != 1}
            assert not (missing or extra or twice), (
                f"outputs {what}: {len(missing)} inputs without one (first {missing[:5]}), "
                f"{len(twice)} with more than one (first {list(twice.items())[:5]}), "
                f"indices out of range {extra[:5]}"
            )
            wrong = [
                i
                for i, (o,) in got.items()
                if o.status != "success"
                or o.data is None
                or serialization.deserialize(o.data, "a result") != expected(i)
            ]
            assert not wrong, f"outputs {what}: wrong or failed for inputs {wrong[:5]}"
