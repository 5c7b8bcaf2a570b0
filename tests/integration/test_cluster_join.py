"""Worker agents that join a control plane over TCP (``strato worker start``), on this
machine's loopback: join tokens, the relay of containers' channels (results, large values
in chunks, nested calls), and a container that tries to speak for another node."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from apps import cluster_work
from cluster_nodes import (
    agent_port,
    containers_by_node,
    join_token,
    joined_nodes,
    ready_nodes,
    start_agent,
    start_control_plane,
    stop_control_plane,
    wait_nodes,
)

from strato.client import session

pytestmark = pytest.mark.slow

NODE_ENV = {"STRATO_NODE_CPU": "0.5", "STRATO_NODE_MEMORY_MB": "4096"}


@pytest.fixture(scope="module")
def cluster():
    server_env = {"STRATO_WORKER_HEARTBEAT_TIMEOUT": "5"}
    with joined_nodes(("alpha", "beta"), env=NODE_ENV, server_env=server_env) as joined:
        yield joined.handle, joined.token, joined.port, joined.agents


def test_joined_nodes_run_a_map_spread_over_them(cluster):
    handle, *_ = cluster
    nodes = ready_nodes()
    assert {n.info.provider for n in nodes.values()} == {"joined"}
    with cluster_work.app.run(quiet=True) as app:
        n = 400
        out = list(cluster_work.work.map(range(n), [0.01] * n))
        assert out == [cluster_work.expected(x) for x in range(n)]
        spread = containers_by_node(app.app_id)
        assert len(spread) == 2, spread  # both nodes ran containers
        # its containers dialled their own agent's relay, not the control plane's socket
        dialled = cluster_work.channel.remote()
        assert dialled.endswith("/run/relay.sock") and "strato-node-" in dialled


def test_relay_carries_nested_calls_and_large_values(cluster):
    with cluster_work.app.run(quiet=True):
        assert cluster_work.nested_sum.remote(10) == sum(x * x for x in range(10)) + 100
        value = cluster_work.big.remote(3 << 20)  # sent in 1 MiB chunks over the relay
        assert value == bytes(range(256)) * ((3 << 20) // 256)


def test_a_wrong_join_token_is_refused(cluster):
    handle, token, port, _ = cluster
    bad = token[:-4] + ("aaaa" if not token.endswith("aaaa") else "bbbb")
    intruder = start_agent(handle.url, port, bad, "intruder", env=NODE_ENV)
    try:
        time.sleep(3)  # it would have joined within this on loopback (the others take <1s)
        assert "intruder" not in ready_nodes()
        assert intruder.proc.poll() is None  # it keeps trying, as an agent does
    finally:
        intruder.stop()


def test_a_revoked_join_token_lets_no_new_agent_in(cluster):
    handle, _, port, _ = cluster
    import os

    env = dict(os.environ, STRATO_HOME=str(handle.home))
    token = subprocess.run(
        [sys.executable, "-m", "strato.cli.main", "server", "join-token", "--name", "once"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    token_id = token.split("_")[1]
    listed = subprocess.run(
        [sys.executable, "-m", "strato.cli.main", "server", "join-token", "list"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert token_id in listed and token not in listed  # the token itself is not kept
    assert token not in (handle.home / "join-tokens.json").read_text()
    subprocess.run(
        [sys.executable, "-m", "strato.cli.main", "server", "join-token", "revoke", token_id],
        env=env,
        check=True,
        capture_output=True,
    )
    late = start_agent(handle.url, port, token, "late", env=NODE_ENV)
    try:
        time.sleep(3)
        assert "late" not in ready_nodes()
    finally:
        late.stop()


def _strato(handle, *args: str) -> str:
    import os

    env = dict(os.environ, STRATO_HOME=str(handle.home), STRATO_SERVER_URL=handle.url)
    out = subprocess.run(
        [sys.executable, "-m", "strato.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_drain_lets_the_running_input_finish_and_places_nothing_there(cluster):
    from strato.protocol import messages as m

    handle, *_ = cluster
    with cluster_work.app.run(quiet=True) as app:
        call = cluster_work.work.spawn(7, 4.0)  # runs for 4 s
        from conftest import wait_until

        def running_on():
            listing = session.api().call(
                "GET", "/containers", None, m.ContainerList, params={"app": app.app_id}
            )
            live = [c for c in listing.containers if c.state == "ready"]
            return live[0].node_id if live else None

        node_id = wait_until(running_on, 60, "the input's container")
        time.sleep(0.5)  # the input is running in it (it takes 4 s)
        out = _strato(handle, "node", "drain", node_id, "--wait", "60")
        assert "drained" in out
        assert call.get(timeout=60) == cluster_work.expected(7)  # it finished, not killed
        d = session.api().call("GET", f"/cluster/nodes/{node_id}", None, m.NodeDetail)
        assert d.state == "draining" and d.containers == []
    with cluster_work.app.run(quiet=True) as app2:
        n = 40
        assert list(cluster_work.work.map(range(n))) == [cluster_work.expected(x) for x in range(n)]
        used = containers_by_node(app2.app_id)
        assert node_id not in used and used, used
    listed = _strato(handle, "node", "list")
    assert "draining" in listed
    _strato(handle, "node", "uncordon", node_id)
    d = session.api().call("GET", f"/cluster/nodes/{node_id}", None, m.NodeDetail)
    assert d.state == "ready"
    described = _strato(handle, "node", "describe", node_id)
    assert "state:       ready" in described and "joined" in described


def test_a_lost_node_can_be_removed(cluster):
    handle, token, port, _ = cluster
    gamma = start_agent(handle.url, port, token, "gamma", env=NODE_ENV)
    try:
        wait_nodes({"gamma"})
    finally:
        gamma.stop()
    from conftest import wait_until

    wait_until(lambda: "gamma" not in ready_nodes(), 30, "gamma to be lost once its agent stopped")
    assert "lost" in _strato(handle, "node", "list")
    _strato(handle, "node", "remove", "gamma")
    assert "gamma" not in _strato(handle, "node", "list")


def test_server_start_beyond_loopback_needs_a_token_and_warns_without_tls(tmp_path):
    import os

    from conftest import free_port

    port = free_port()
    home = tmp_path / "home"
    env = dict(
        os.environ,
        STRATO_HOME=str(home),
        STRATO_SERVER_URL=f"http://127.0.0.1:{port}",
        STRATO_LOCAL_WORKER="0",
    )
    env.pop("STRATO_TOKEN", None)
    argv = [sys.executable, "-m", "strato.cli.main", "server", "start", "--host", "0.0.0.0"]
    weak = subprocess.run(
        argv, env={**env, "STRATO_TOKEN": "short"}, capture_output=True, text=True, timeout=120
    )
    assert weak.returncode != 0
    assert "beyond loopback" in weak.stdout + weak.stderr
    started = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        assert "0.0.0.0" in started.stdout
        log = (home / "logs" / "server.log").read_text()
        assert "plain HTTP" in log and "plain TCP" in log
        info = __import__("json").loads((home / "server.json").read_text())
        assert info["agent_port"] == port + 2  # agents join on the API's port + 2
    finally:
        subprocess.run(
            [sys.executable, "-m", "strato.cli.main", "server", "stop"],
            env=env,
            capture_output=True,
            timeout=60,
        )


def test_web_endpoints_on_joined_nodes_answer_through_the_relay(cluster):
    import httpx
    from apps import web_basic

    from strato.protocol import messages as m

    web_basic.app.deploy()
    try:
        url = web_basic.hello.get_web_url()
        for i in range(20):  # keep-alive tunnels reused across requests
            r = httpx.get(url, params={"name": f"n{i}"}, timeout=60, follow_redirects=True)
            assert r.status_code == 200 and r.json() == {"hello": f"n{i}"}
        r = httpx.post(web_basic.echo.get_web_url(), json={"a": "x" * 300_000}, timeout=60)
        assert r.status_code == 200 and r.json()["n"] == 1  # a body of many relay chunks
        listing = session.api().call(
            "GET", "/containers", None, m.ContainerList, params={"app": "web-basic"}
        )
        joined = {n.node_id for n in ready_nodes().values()}
        assert listing.containers and all(c.node_id in joined for c in listing.containers)
    finally:
        session.api().call("POST", "/apps/web-basic/stop", None, None)


def test_agents_join_over_tls(tmp_path):
    """A control plane with a certificate: an agent that trusts it joins and runs work;
    one that speaks plain TCP to it does not join."""
    import os

    from conftest import restore_env

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=strato-test"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    saved = {k: os.environ.get(k) for k in ("STRATO_HOME", "STRATO_SERVER_URL", "STRATO_TLS_CA")}
    os.environ["STRATO_TLS_CA"] = str(cert)  # this client verifies the API's HTTPS with it
    handle = start_control_plane({"STRATO_TLS_CERT": str(cert), "STRATO_TLS_KEY": str(key)})
    agents = []
    try:
        assert handle.url.startswith("https://")
        token, port = join_token(handle), agent_port(handle)
        agents.append(
            start_agent(
                handle.url, port, token, "secure", env=NODE_ENV, extra=("--tls-ca", str(cert))
            )
        )
        plain = handle.url.replace("https://", "http://")
        agents.append(start_agent(plain, port, token, "plain", env=NODE_ENV))
        wait_nodes({"secure"})
        with cluster_work.app.run(quiet=True):
            assert list(cluster_work.work.map(range(20))) == [
                cluster_work.expected(x) for x in range(20)
            ]
        assert "plain" not in ready_nodes()
    finally:
        for a in agents:
            a.stop()
        stop_control_plane(handle)
        restore_env(saved)
        session.reset()


def test_block_network_containers_under_bwrap_work_on_joined_nodes(cluster):
    import shutil

    if shutil.which("bwrap") is None:
        pytest.skip("bwrap is not installed")
    with cluster_work.app.run(quiet=True):
        out = cluster_work.sealed.remote(6)
    assert out == {"double": 12, "nested": 36, "network": False}


def test_placement_with_many_nodes_goes_through_the_index(cluster):
    """40 more agents (protocol-level clients, too small for the function) make the fleet
    place with its index (from 32 nodes on): work still lands on the nodes that fit."""
    import secrets
    import socket

    from strato.protocol import frames
    from strato.protocol import messages as m

    handle, token, port, _ = cluster
    socks = []
    try:
        for i in range(40):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            info = m.NodeInfo(name=f"tiny-{i}", provider="sim", cpu=0.1, memory_mb=64)
            s.sendall(frames.encode(m.WorkerHello(token, info, "wk-" + secrets.token_hex(6))))
            assert isinstance(frames.SocketReader(s).read(), m.WorkerWelcome)
            socks.append(s)
        assert len(ready_nodes()) >= 42
        with cluster_work.app.run(quiet=True):
            n = 100
            assert list(cluster_work.work.map(range(n))) == [
                cluster_work.expected(x) for x in range(n)
            ]
    finally:
        for s in socks:
            s.close()
