"""A joined worker agent's credential (``server/cluster/node_credentials.py``): it is not
the API token; it fetches blobs and its own node's volumes over the HTTP API and nothing
else; it cannot act as another node; it stops working when its node is removed or its
join token revoked. Agents here are protocol-level clients of the agent listener (one
real agent runs a function, so that a container holds a volume on its node)."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys

import pytest
from cluster_nodes import joined_nodes
from conftest import wait_until

from strato import exceptions as exc
from strato.client import session
from strato.client.http import ApiClient
from strato.protocol import frames
from strato.protocol import messages as m

pytestmark = pytest.mark.slow

NODE_ENV = {"STRATO_NODE_CPU": "0.5", "STRATO_NODE_MEMORY_MB": "4096"}


@pytest.fixture(scope="module")
def cluster():
    # the protocol-level agents send no heartbeats: they must not be lost for it mid-test
    server_env = {"STRATO_WORKER_HEARTBEAT_TIMEOUT": "300"}
    with joined_nodes(("beta",), env=NODE_ENV, server_env=server_env) as joined:
        yield joined.handle, joined.token, joined.port


class ProtocolAgent:
    """A worker agent's hello over TCP, too small for any function: its welcome."""

    def __init__(self, port: int, token: str, name: str, provider: str = "joined") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        info = m.NodeInfo(name=name, provider=provider, cpu=0.01, memory_mb=1)
        self.sock.sendall(frames.encode(m.WorkerHello(token, info, "wk-" + secrets.token_hex(6))))
        self.welcome = frames.SocketReader(self.sock).read()

    def closed_by_server(self) -> bool:
        self.sock.settimeout(0.2)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def _cli(handle, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "strato.cli.main", *args],
        env=dict(os.environ, STRATO_HOME=str(handle.home), STRATO_SERVER_URL=handle.url),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def test_a_joined_agent_gets_a_node_credential_that_opens_no_admin_route(cluster):
    handle, token, port = cluster
    api_token = (handle.home / "token").read_text().strip()
    alpha = ProtocolAgent(port, token, "alpha", provider="local")  # it claims to be local
    try:
        assert isinstance(alpha.welcome, m.WorkerWelcome)
        cred = alpha.welcome.api_token
        assert cred.startswith("stn_") and api_token not in cred
        nodes = {
            n.info.name: n for n in session.api().call("GET", "/nodes", None, m.NodeList).nodes
        }
        assert nodes["alpha"].info.provider == "joined"  # never this machine's own node
        data = os.urandom(1000)
        key = __import__("hashlib").sha256(data).hexdigest()
        session.api().put_blob(key, data)
        agent = ApiClient(handle.url, cred, reconnect_timeout=5)
        assert agent.get_blob(key) == data  # what it needs: blobs (code, image inputs)
        for method, path in [
            ("GET", "/apps"),
            ("GET", "/nodes"),
            ("POST", "/cluster/nodes/beta/cordon"),
            ("DELETE", "/cluster/nodes/beta"),
            ("GET", "/volumes"),
            ("GET", "/secrets"),
        ]:
            # (HTTP 403: strato.exceptions.PermissionDeniedError where the client knows it)
            with pytest.raises(exc.Error, match="never the admin API"):
                agent.request_raw(method, path)
        # nor is it a join token, nor a token for the control plane's channel
        again = ProtocolAgent(port, cred, "alpha-again")
        assert again.welcome is None  # the listener closed it
        again.close()
    finally:
        alpha.close()


def test_a_credential_reaches_only_the_volumes_of_its_own_nodes_containers(cluster):
    from apps import volumes

    handle, token, port = cluster
    alpha = ProtocolAgent(port, token, "alpha-vol")
    try:
        with volumes.app.run(quiet=True):
            # beta's agent fetched the volume's manifest with beta's credential to mount it
            assert volumes.read.remote() == {"srv": {}, "media": {}}
            agent = ApiClient(handle.url, alpha.welcome.api_token, reconnect_timeout=5)
            with pytest.raises(exc.NotFoundError, match="not mounted on this node"):
                agent.call("GET", f"/volumes/{volumes.VOL}/manifest", None, m.VolumeManifest)
            with pytest.raises(exc.NotFoundError, match="not mounted on this node"):
                agent.call(
                    "POST",
                    f"/volumes/{volumes.VOL}/commit",
                    m.VolumeCommit([m.VolumeFile("x.txt", 1, data=b"x")], []),
                    m.VolumeVersion,
                )
    finally:
        alpha.close()


def test_a_removed_nodes_credential_is_refused(cluster):
    handle, token, port = cluster
    gamma = ProtocolAgent(port, token, "gamma")
    try:
        agent = ApiClient(handle.url, gamma.welcome.api_token, reconnect_timeout=5)
        assert agent.call("POST", "/blobs/check", m.BlobCheck([]), m.MissingBlobs).missing == []
        _cli(handle, "node", "remove", "gamma")
        with pytest.raises(exc.AuthError, match="wrong or revoked token"):
            agent.call("POST", "/blobs/check", m.BlobCheck([]), m.MissingBlobs)
        assert gamma.closed_by_server()
    finally:
        gamma.close()


def test_revoking_a_join_token_revokes_its_agents_credentials(cluster):
    handle, _, port = cluster
    once = _cli(handle, "server", "join-token", "--name", "once").strip()
    delta = ProtocolAgent(port, once, "delta")
    try:
        agent = ApiClient(handle.url, delta.welcome.api_token, reconnect_timeout=5)
        assert agent.call("POST", "/blobs/check", m.BlobCheck([]), m.MissingBlobs).missing == []
        _cli(handle, "server", "join-token", "revoke", once.split("_")[1])
        with pytest.raises(exc.AuthError, match="wrong or revoked token"):
            agent.call("POST", "/blobs/check", m.BlobCheck([]), m.MissingBlobs)
        # and its connection is cut (the listener looks every second)
        wait_until(delta.closed_by_server, 10, "delta's connection to be closed")
    finally:
        delta.close()
