"""Node credentials of joined worker agents (``server/cluster/node_credentials.py``), what
the router lets them do (only ``node=True`` routes, never the admin API), and the HTTP
API's TLS options."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import subprocess

import msgspec
import pytest

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.providers.ray import JOIN_TOKEN_NAME
from strato.server.api.router import Reply, Request, Router, reply
from strato.server.cluster.agents import api_tls_options, check_exposure, joined_hello
from strato.server.cluster.join_tokens import RAY_PROVIDER_TOKEN, JoinTokens
from strato.server.cluster.node_credentials import NodeCredentials

API_TOKEN = "t" * 32


def test_a_credential_names_its_node_until_revoked(tmp_path):
    tokens = JoinTokens(tmp_path)
    rec, _ = tokens.create("rack")
    creds = NodeCredentials(tokens)
    a = creds.issue("node-a", rec.id)
    b = creds.issue("node-b", rec.id)
    assert creds.node_of(a) == "node-a" and creds.node_of(b) == "node-b"
    secret = a.split("_", 2)[2]
    assert secret not in repr(creds.__dict__)  # kept hashed only
    for bad in ("", "stn_", a + "x", a[:-1], API_TOKEN, "stj_" + a[4:], "x" * 500):
        assert creds.node_of(bad) is None, bad
    a2 = creds.issue("node-a", rec.id)  # a new hello of the node: its old one stops
    assert creds.node_of(a) is None and creds.node_of(a2) == "node-a"
    assert creds.revoke_node("node-a") and creds.node_of(a2) is None
    assert creds.node_of(b) == "node-b"


def test_revoking_the_join_token_revokes_its_nodes_credentials(tmp_path):
    tokens = JoinTokens(tmp_path)
    keep, _ = tokens.create("keep")
    gone, _ = tokens.create("gone")
    creds = NodeCredentials(tokens)
    a = creds.issue("node-a", gone.id)
    b = creds.issue("node-b", keep.id)
    c = creds.issue("node-c", gone.id)
    assert creds.node_of(a) == "node-a"
    JoinTokens(tmp_path).revoke(gone.id)  # as `strato server join-token revoke` does
    assert creds.node_of(a) is None  # seen at once: the file changed
    assert creds.revoked_join_tokens() == ["node-a", "node-c"]
    assert creds.node_of(c) is None and creds.node_of(b) == "node-b"


def test_a_joined_node_is_of_provider_joined_whatever_it_claims(tmp_path):
    assert RAY_PROVIDER_TOKEN == JOIN_TOKEN_NAME
    tokens = JoinTokens(tmp_path)
    plain, _ = tokens.create("rack")
    ray, _ = tokens.create(RAY_PROVIDER_TOKEN)

    def hello(provider: str) -> m.WorkerHello:
        return m.WorkerHello(
            "x", m.NodeInfo(name="box", provider=provider, cpu=1, memory_mb=64), "wk-1"
        )

    for claimed in ("local", "sim", "ray", "joined"):
        assert joined_hello(hello(claimed), plain).node.provider == "joined"
    assert joined_hello(hello("ray"), ray).node.provider == "ray"
    assert joined_hello(hello("local"), ray).node.provider == "joined"


def _router() -> Router:
    api = Router("t", "0", API_TOKEN, 1 << 20)
    seen: list[Request] = []

    @api.add("GET", "/blobs/{key}", "blob", node=True)
    async def blob(req: Request) -> Reply:
        seen.append(req)
        return reply({"node": req.agent.node_id if req.agent else None})

    @api.add("GET", "/apps", "admin")
    async def apps(req: Request) -> Reply:
        return reply({"admin": True})

    api.node_of = {"stn_good": "node-a"}.get
    return api


def _get(api: Router, path: str, token: str) -> tuple[int, object]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(msg: dict) -> None:
        sent.append(msg)

    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "headers": [(b"authorization", f"Bearer {token}".encode())],
        "query_string": b"",
    }
    asyncio.run(api(scope, receive, send))
    return sent[0]["status"], msgspec.msgpack.decode(sent[1]["body"])


def test_the_router_opens_only_node_routes_to_a_node_credential():
    api = _router()
    assert _get(api, "/blobs/abc", "stn_good") == (200, {"node": "node-a"})
    status, body = _get(api, "/apps", "stn_good")
    assert status == 403 and body["error"] == "PermissionDeniedError"
    assert "never the admin API" in body["message"]
    assert _get(api, "/blobs/abc", "stn_bad")[0] == 401
    assert _get(api, "/apps", API_TOKEN) == (200, {"admin": True})
    assert _get(api, "/blobs/abc", API_TOKEN) == (200, {"node": None})
    marked = {(r.method, r.path) for r in api.routes if r.node}
    assert marked == {("GET", "/blobs/{key}")}
    assert json.loads(api.openapi())["paths"]["/apps"]


def test_the_control_planes_node_routes_are_what_agents_need():
    """Every route open to a node credential, pinned: adding one must be deliberate (its
    handler checks ``req.agent`` before ``req.principal``). Read from the route modules'
    source: building the whole API needs a control plane."""
    from strato.server.api import routes, routes_volumes

    found = set()
    for mod in (routes, routes_volumes):
        for call in re.finditer(r"@route\((.*?)\)\n    async def", inspect.getsource(mod), re.S):
            if "node=True" in call.group(1):
                method, path = re.findall(r'"([^"]+)"', call.group(1))[:2]
                found.add((method, path))
    assert found == {
        ("GET", "/blobs/{key}"),
        ("PUT", "/blobs/{key}"),
        ("POST", "/blobs/check"),
        ("POST", "/volume-blobs"),
        ("POST", "/volume-blobs/get"),
        ("GET", "/volumes/{ref}/manifest"),
        ("POST", "/volumes/{ref}/commit"),
    }


def test_with_a_certificate_the_api_is_https_and_nothing_warns(tmp_path, monkeypatch):
    assert any("plain HTTP" in w for w in check_exposure("0.0.0.0", "x" * 43))
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=t"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    monkeypatch.setenv("STRATO_TLS_CERT", str(cert))
    assert check_exposure("0.0.0.0", "x" * 43) == []
    assert api_tls_options(cert, key) == {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    assert api_tls_options(None, None) == {}
    with pytest.raises(exc.InvalidError, match="STRATO_TLS_CERT"):
        api_tls_options(cert, tmp_path / "missing.pem")
