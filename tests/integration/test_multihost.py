"""Many machines with real network isolation: each extra host is a network namespace made
here (a veth pair, its own addresses, its own STRATO_HOME) running a worker agent that
joins the control plane over TCP. A whole node SIGKILLed in the middle of a 10,000-input
map, a node's link cut past the heartbeat timeout then restored, the control plane
SIGKILLed and restarted, a node back under its name with a new inventory: in every case
each input has exactly one output, with its value, counted as the control plane hands
them out and as it stores them (``CallOutputs``: nothing de-duplicated on the way); the
returning node's stale containers are killed.

Needs root (``unshare``, ``nsenter``, ``ip``); skipped with the reason where namespaces
cannot be made."""

from __future__ import annotations

import os
import subprocess

import pytest
from apps import cluster_work
from cluster_nodes import (
    CallOutputs,
    agent_port,
    containers_by_node,
    join_token,
    nodes,
    start_agent,
    start_control_plane,
    stop_control_plane,
    wait_nodes,
)
from conftest import container_pid, pid_alive, restore_env, wait_until

from strato.client import session
from strato.protocol import messages as m

pytestmark = pytest.mark.slow

HEARTBEAT_TIMEOUT_S = 3.0  # short, so that a cut link counts as a lost node quickly
NODE_ENV = {"STRATO_NODE_CPU": "0.5", "STRATO_NODE_MEMORY_MB": "4096"}


def _ip(*args: str, check: bool = True) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise subprocess.CalledProcessError(out.returncode, ["ip", *args], out.stdout, out.stderr)


class Host:
    """A network namespace joined to this one by a veth pair: 10.211.<i>.2 inside,
    10.211.<i>.1 on this side. The namespace is held by a process of its own (``unshare
    --net``), not by a bind mount under /run/netns that other tests' mount namespaces
    could take away; agents enter it with ``nsenter``."""

    def __init__(self, i: int) -> None:
        tag = f"{os.getpid() % 10000}{i}"
        self.outer = f"sth{tag}"
        self.inner = f"stn{tag}"
        self.gateway = f"10.211.{i}.1"
        self.address = f"10.211.{i}.2"
        self.holder: subprocess.Popen | None = None

    @property
    def ns(self) -> str:
        assert self.holder is not None
        return f"/proc/{self.holder.pid}/ns/net"

    def create(self) -> None:
        self.holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
        mine = os.readlink("/proc/self/ns/net")
        wait_until(
            lambda: os.path.exists(self.ns) and os.readlink(self.ns) != mine,
            10,
            "the namespace's holder to enter its namespace",
        )
        _ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        _ip("link", "set", self.inner, "netns", str(self.holder.pid))
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.outer)
        _ip("link", "set", self.outer, "up")
        for cmd in (
            ["addr", "add", f"{self.address}/24", "dev", self.inner],
            ["link", "set", self.inner, "up"],
            ["link", "set", "lo", "up"],
        ):
            out = subprocess.run(
                ["nsenter", f"--net={self.ns}", "ip", *cmd], capture_output=True, text=True
            )
            if out.returncode != 0:
                raise subprocess.CalledProcessError(out.returncode, cmd, out.stdout, out.stderr)

    def link(self, up: bool, check: bool = True) -> None:
        _ip("link", "set", self.outer, "up" if up else "down", check=check)

    def destroy(self) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()


@pytest.fixture(scope="module")
def hosts():
    made: list[Host] = []
    try:
        for i in range(1, 4):
            h = Host(i)
            made.append(h)
            h.create()
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        for h in made:
            h.destroy()
        why = getattr(e, "stderr", "") or str(e)
        pytest.skip(f"cannot make network namespaces here: {why.strip()}")
    try:
        yield made
    finally:
        for h in made:
            h.destroy()


@pytest.fixture
def cluster(hosts):
    """A control plane on 0.0.0.0 and one joined agent in each namespace."""
    saved = {k: os.environ.get(k) for k in ("STRATO_HOME", "STRATO_SERVER_URL")}
    handle = start_control_plane(
        {"STRATO_WORKER_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S)}, host="0.0.0.0"
    )
    agents = {}
    try:
        token, port = join_token(handle), agent_port(handle)
        for i, h in enumerate(hosts):
            name = f"host{i + 1}"
            url = f"http://{h.gateway}:{handle.port}"
            agents[name] = start_agent(url, port, token, name, netns=h.ns, env=NODE_ENV)
        wait_nodes(set(agents))
        yield handle, agents, dict(zip(agents, hosts, strict=True))
    finally:
        for h in hosts:
            h.link(True, check=False)  # (a link a test cut comes back for the next test)
        for a in agents.values():
            a.stop()
        stop_control_plane(handle)
        restore_env(saved)
        session.reset()


def _spawn_map(n: int, sleep_s: float) -> CallOutputs:
    """``work`` over ``range(n)`` (each input sleeping ``sleep_s``), its outputs followed
    and counted by a thread."""
    call = cluster_work.work.spawn_map(range(n), [sleep_s] * n)
    return CallOutputs(call.object_id, n)


def _node_of(name: str) -> str:
    return next(n.node_id for n in nodes() if n.info.name == name)


def test_a_sigkilled_node_loses_nothing(cluster):
    _, agents, _ = cluster
    n = 10_000
    with cluster_work.app.run(quiet=True) as app:
        outputs = _spawn_map(n, 0.004)
        wait_until(lambda: outputs.done >= n // 5, 120, "a fifth of the map")
        assert outputs.done < n, "the map ended before the node could be killed in it"
        by_node = containers_by_node(app.app_id)
        victim = max(agents, key=lambda a: by_node.get(_node_of(a), 0))
        assert by_node.get(_node_of(victim), 0) > 0, by_node
        agents[victim].kill_node()
        outputs.join(300)
        outputs.assert_each_once(cluster_work.expected)
        lost = {x.info.name: x.state for x in nodes()}
        assert lost[victim] == "lost"


def test_a_cut_link_past_the_heartbeat_timeout_then_restored(cluster):
    _, agents, by_name = cluster
    n = 2000
    with cluster_work.app.run(quiet=True) as app:
        outputs = _spawn_map(n, 0.01)
        wait_until(lambda: outputs.done >= n // 10, 120, "a tenth of the map")
        by_node = containers_by_node(app.app_id)
        victim = max(agents, key=lambda a: by_node.get(_node_of(a), 0))
        node_id = _node_of(victim)
        listing = session.api().call(
            "GET", "/containers", None, m.ContainerList, params={"app": app.app_id}
        )
        stale = [
            c.container_id
            for c in listing.containers
            if c.node_id == node_id and c.state in ("starting", "ready")
        ]
        stale_pids = [p for p in (container_pid(c) for c in stale) if p is not None]
        assert stale_pids, "the victim node ran no container"
        by_name[victim].link(False)
        # the control plane counts the node lost after the heartbeat timeout...
        wait_until(
            lambda: {x.info.name: x.state for x in nodes()}[victim] == "lost",
            HEARTBEAT_TIMEOUT_S * 10,
            f"{victim} to be counted lost",
        )
        # ... and the map finishes on the other nodes while the link is still down
        outputs.join(300)
        outputs.assert_each_once(cluster_work.expected)
        assert any(pid_alive(p) for p in stale_pids)  # cut off, not dead
        by_name[victim].link(True)
        # the agent finds its connection gone, joins again, and its stale containers die
        wait_nodes({victim}, timeout=90)
        wait_until(
            lambda: not any(pid_alive(p) for p in stale_pids),
            30,
            "the returning node's stale containers to be killed",
        )
        # the node works again
        assert list(cluster_work.work.map(range(40))) == [
            cluster_work.expected(x) for x in range(40)
        ]


def test_a_control_plane_restart_while_remote_nodes_work(cluster):
    """SIGKILL the control plane mid-map and start it again on the same state, port and
    agent port: the nodes join again, the containers of the earlier run are killed, the
    map ends with every output once."""
    from cluster_nodes import start_control_plane

    handle, agents, _ = cluster
    port = agent_port(handle)
    n = 2000
    with cluster_work.app.run(quiet=True):
        outputs = _spawn_map(n, 0.004)
        wait_until(lambda: outputs.done >= n // 5, 120, "a fifth of the map")
        handle.kill()
        start_control_plane(
            {"STRATO_WORKER_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S)},
            host="0.0.0.0",
            home=handle.home,
            port=handle.port,
            agent_port=port,
        )
        wait_nodes(set(agents), timeout=60)
        outputs.join(300)
        outputs.assert_each_once(cluster_work.expected)


def test_a_node_back_with_the_same_name_and_a_new_inventory(cluster):
    handle, agents, by_name = cluster
    token, port = join_token(handle), agent_port(handle)
    old = agents["host1"]
    old.stop()
    wait_until(lambda: {x.info.name: x.state for x in nodes()}["host1"] == "lost", 30, "host1 lost")
    h = by_name["host1"]
    bigger = {**NODE_ENV, "STRATO_NODE_CPU": "1.5", "STRATO_NODE_MEMORY_MB": "8192"}
    url = f"http://{h.gateway}:{handle.port}"
    agents["host1"] = start_agent(url, port, token, "host1", netns=h.ns, env=bigger)
    back = wait_nodes({"host1"})["host1"]
    assert (back.info.cpu, back.info.memory_mb) == (1.5, 8192)
    assert [x.info.name for x in nodes()].count("host1") == 1  # the same node, not a second
    with cluster_work.app.run(quiet=True):
        outputs = _spawn_map(300, 0.01)
        outputs.join(120)
        outputs.assert_each_once(cluster_work.expected)


@pytest.mark.postgres
def test_production_shape_control_plane_on_postgresql(hosts):
    """The control plane on PostgreSQL, agents on other hosts: a map across them survives
    one of them SIGKILLed."""
    import secrets as _secrets

    import psycopg
    from cluster_nodes import start_control_plane

    admin_dsn = os.environ.get(
        "STRATO_TEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=test"
    )
    name = "strato_multihost_" + _secrets.token_hex(4)
    try:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL at {admin_dsn}: {e}")
    saved = {k: os.environ.get(k) for k in ("STRATO_HOME", "STRATO_SERVER_URL")}
    handle = start_control_plane(
        {
            "STRATO_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
            "STRATO_WORKER_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
        },
        host="0.0.0.0",
    )
    agents = {}
    try:
        token, port = join_token(handle), agent_port(handle)
        for i, h in enumerate(hosts[:2]):
            url = f"http://{h.gateway}:{handle.port}"
            agents[f"pg{i}"] = start_agent(url, port, token, f"pg{i}", netns=h.ns, env=NODE_ENV)
        wait_nodes(set(agents))
        n = 1500
        with cluster_work.app.run(quiet=True):
            outputs = _spawn_map(n, 0.004)
            wait_until(lambda: outputs.done >= n // 5, 120, "a fifth of the map")
            agents["pg0"].kill_node()
            outputs.join(300)
            outputs.assert_each_once(cluster_work.expected)
    finally:
        for a in agents.values():
            a.stop()
        stop_control_plane(handle)
        restore_env(saved)
        session.reset()
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
