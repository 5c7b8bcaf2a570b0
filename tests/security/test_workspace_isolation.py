"""Workspace isolation, enforced by the control plane for every route and channel message.

Workspace A owns real objects (a deployed app with a function and a finished call, a
Dict, a Queue, a Volume, a Secret, a sandbox, an API token). Every route of the running
control plane (read from its own route table, ``/openapi.json``, so a route added later
is covered without touching this file) is then tried:

- with workspace B's admin token, naming A's objects: each is refused (403, or 404 with
  exactly the body a missing object of that kind gets, so existence does not leak);
- with A's read-only token: every route that is not a read answers 403;
- with A's tokens on the operator routes: 403;
- listings with B's token show nothing of A's.

Then code in a container of workspace B sends the same requests over its channel, and a
revoked token is refused at once, over HTTP and over an open local-channel connection.
"""

from __future__ import annotations

import os
import re
import secrets
from collections import Counter

import msgspec
import pytest
import requests

from strato import exceptions as exc
from strato.protocol import messages as m

# routes whose parameters name nothing that belongs to a workspace (with why)
WORKSPACE_FREE = {
    "/health": "liveness, no token",
    "/whoami": "the caller's own workspace and role",
    "/blobs/{key}": "content-addressed: a key is the sha256 of what its holder already has",
    "/blobs/check": "content-addressed",
    "/volume-blobs": "content-addressed",
    "/volume-blobs/get": "content-addressed",
}


class Client:
    def __init__(self, url: str, token: str, workspace: str | None = None) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/msgpack"}
        if workspace:
            self.headers["Strato-Workspace"] = workspace

    def __call__(self, method: str, path: str, body=None, **params) -> requests.Response:
        data = msgspec.msgpack.encode(body) if body is not None else b""
        r = requests.request(
            method, self.url + path, data=data, headers=self.headers, params=params, timeout=30
        )
        return r

    def ok(self, method: str, path: str, body=None, **params):
        r = self(method, path, body, **params)
        assert r.status_code == 200, (method, path, r.status_code, r.content)
        return msgspec.msgpack.decode(r.content) if r.content else None


def _error(r: requests.Response) -> str:
    return msgspec.msgpack.decode(r.content, type=m.ErrorBody).message


@pytest.fixture(scope="module")
def world(strato_server):
    """Workspaces A and B, their tokens, and A's objects (made through the SDK and API
    with A's token)."""
    from strato.client import session

    server = strato_server
    server.activate()
    suffix = secrets.token_hex(3)
    ws_a, ws_b = f"iso-a-{suffix}", f"iso-b-{suffix}"
    operator = Client(server.url, (server.home / "token").read_text().strip())
    for ws in (ws_a, ws_b):
        operator.ok("POST", "/workspaces", {"name": ws})
    as_a = Client(server.url, (server.home / "token").read_text().strip(), ws_a)
    as_b = Client(server.url, (server.home / "token").read_text().strip(), ws_b)
    a_admin = as_a.ok("POST", "/tokens", {"role": "admin", "name": "a"})
    a_read = as_a.ok("POST", "/tokens", {"role": "read-only", "name": "r"})
    b_admin = as_b.ok("POST", "/tokens", {"role": "admin", "name": "b"})
    a = Client(server.url, a_admin["token"])
    saved = os.environ.get("STRATO_TOKEN")
    os.environ["STRATO_TOKEN"] = a_admin["token"]
    session.reset()
    try:
        import workspace_apps

        workspace_apps.app.deploy()
        call = workspace_apps.double.spawn(21)
        assert call.get(timeout=60) == 42
        sandbox = _sandbox(workspace_apps.app)
        objects = {
            "app": a.ok("GET", f"/apps/{workspace_apps.app.name}"),
            "call_id": call.object_id,
            "dict": a.ok("POST", "/dicts/lookup", {"name": "iso-d", "create_if_missing": True}),
            "queue": a.ok("POST", "/queues/lookup", {"name": "iso-q", "create_if_missing": True}),
            "volume": a.ok("POST", "/volumes", {"name": "iso-v", "create_if_missing": True}),
            "secret": a.ok("POST", "/secrets", {"name": "iso-s", "values": {"K": "v"}}),
            "sandbox_id": sandbox,
            "token_id": a_admin["info"]["token_id"],
        }
        a.ok("POST", f"/dicts/{objects['dict']['object_id']}/put", {"entries": [[b"k", b"v"]]})
        a.ok("POST", f"/queues/{objects['queue']['object_id']}/put", {"items": [b"x"]})
        yield {
            "ws_a": ws_a,
            "ws_b": ws_b,
            "a": a,
            "a_read": Client(server.url, a_read["token"]),
            "b": Client(server.url, b_admin["token"]),
            "b_token": b_admin["token"],
            "operator": operator,
            "objects": objects,
            "apps": workspace_apps,
        }
    finally:
        if saved is None:
            os.environ.pop("STRATO_TOKEN", None)
        else:
            os.environ["STRATO_TOKEN"] = saved
        session.reset()


def _sandbox(app) -> str | None:
    """A sandbox of A's app, where this machine can run one (the ``process`` runtime)."""
    import strato

    sb = strato.Sandbox.create("sleep", "120", app=app, runtime="process", timeout=120)
    return sb.object_id


def _values(world) -> tuple[dict, dict]:
    """Path parameter values naming A's objects, and ones naming nothing (same shapes),
    by (first path segment, parameter)."""
    o = world["objects"]
    app = o["app"]
    fn = app["functions"][0]
    real = {
        ("apps", "ref"): app["name"],
        ("apps", "app_id"): app["app_id"],
        ("apps", "app"): app["name"],
        ("apps", "name"): fn["name"],
        ("functions", "function_id"): fn["function_id"],
        ("calls", "call_id"): o["call_id"],
        ("dicts", "object_id"): o["dict"]["object_id"],
        ("queues", "object_id"): o["queue"]["object_id"],
        ("volumes", "ref"): o["volume"]["name"],
        ("secrets", "name"): o["secret"]["name"],
        ("sandboxes", "sandbox_id"): o["sandbox_id"],
        ("sandboxes", "pid"): "1",
        ("tokens", "token_id"): o["token_id"],
    }
    missing = {
        ("apps", "ref"): "iso-missing-app",
        ("apps", "app_id"): "ap-" + secrets.token_hex(8),
        ("apps", "app"): "iso-missing-app",
        ("apps", "name"): fn["name"],
        ("functions", "function_id"): "fu-" + secrets.token_hex(8),
        ("calls", "call_id"): "fc-" + secrets.token_hex(8),
        ("dicts", "object_id"): o["dict"]["object_id"][:3] + secrets.token_hex(8),
        ("queues", "object_id"): o["queue"]["object_id"][:3] + secrets.token_hex(8),
        ("volumes", "ref"): "iso-missing-vol",
        ("secrets", "name"): "iso-missing-secret",
        ("sandboxes", "sandbox_id"): "sb-" + secrets.token_hex(8),
        ("sandboxes", "pid"): "1",
        ("tokens", "token_id"): secrets.token_hex(8),
    }
    return real, missing


def _routes(world) -> list[tuple[str, str, str]]:
    """(method, path template, access) of every route of the running control plane."""
    spec = requests.get(world["a"].url + "/openapi.json", timeout=30).json()
    return [
        (method.upper(), path, op.get("x-strato-access", "?"))
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
    ]


def _fill(path: str, values: dict) -> tuple[str, list[str]] | None:
    """The path with its parameters filled from ``values``; None if one is not known."""
    first = path.strip("/").split("/")[0]
    used = []
    for p in re.findall(r"{(\w+)}", path):
        v = values.get((first, p))
        if v is None:
            return None
        used.append(v)
        path = path.replace("{" + p + "}", v)
    return path, used


def test_every_route_refuses_another_workspaces_token(world):
    real, missing = _values(world)
    b = world["b"]
    tried: Counter = Counter()
    for method, path, access in _routes(world):
        if path in WORKSPACE_FREE:
            continue
        params = re.findall(r"{(\w+)}", path)
        if not params:
            continue  # (listings and creations: test_listings_show_nothing_of_another...)
        if access == "operator":  # refused before anything it names is looked at
            got = b(method, re.sub(r"{\w+}", "x", path), {})
            assert got.status_code == 403, (method, path, got.status_code, got.content)
            tried[403] += 1
            continue
        filled = _fill(path, real)
        assert filled is not None, (
            f"{method} {path}: this test does not know what its parameters name; add them "
            "to _values (or to WORKSPACE_FREE, with why)"
        )
        got = b(method, filled[0], {})
        tried[got.status_code] += 1
        if got.status_code == 403:
            continue
        # anything else must be exactly what a missing object of that kind gets: a 404
        # (or, for a keep-alive of an unknown app, the same empty answer), same text
        gone_path, gone_values = _fill(path, missing)  # type: ignore[misc]
        gone = b(method, gone_path, {})
        assert got.status_code == gone.status_code, (method, path, got.status_code, got.content)
        assert got.status_code == 404 or path.endswith("/heartbeat"), (method, path, got)
        if got.status_code != 404:
            assert got.content == gone.content, (method, path, got.content)
            continue
        mine, theirs = _error(got), _error(gone)
        for v in filled[1]:
            mine = mine.replace(v, "<ref>")
        for v in gone_values:
            theirs = theirs.replace(v, "<ref>")
        assert mine == theirs, (method, path, mine, theirs)
    print(f"refusals of workspace B's token on A's objects: {dict(tried)}")
    assert sum(tried.values()) >= 40, tried  # every object route was tried


def test_read_only_and_workspace_tokens_are_refused_what_their_role_may_not(world):
    real, _ = _values(world)
    counts: Counter = Counter()
    for method, path, access in _routes(world):
        if path == "/health":
            continue
        filled = _fill(path, real)
        target = filled[0] if filled is not None else re.sub(r"{\w+}", "x", path)
        if access != "read":  # a read-only token: refused before anything is read
            got = world["a_read"](method, target, {})
            assert got.status_code == 403, (method, path, got.status_code, got.content)
            assert msgspec.msgpack.decode(got.content)["error"] == "PermissionDeniedError"
            counts["read-only refused"] += 1
        if access == "operator":  # a workspace's admin: not the installation's token
            got = world["a"](method, target, {})
            assert got.status_code == 403, (method, path, got.status_code, got.content)
            counts["operator refused"] += 1
    print(f"role refusals: {dict(counts)}")
    assert counts["read-only refused"] >= 30 and counts["operator refused"] >= 5, counts
    # and what a read-only token may do, it does: A's own objects
    app = world["objects"]["app"]
    assert world["a_read"].ok("GET", f"/apps/{app['app_id']}")["name"] == app["name"]


def test_listings_show_nothing_of_another_workspace(world):
    o = world["objects"]
    secrets_of_a = [
        o["app"]["app_id"],
        o["app"]["name"],
        o["call_id"],
        o["dict"]["object_id"],
        o["queue"]["object_id"],
        o["volume"]["volume_id"],
        "iso-s",
        o["token_id"],
    ] + ([o["sandbox_id"]] if o["sandbox_id"] else [])
    listed = 0
    for method, path, _access in _routes(world):
        if method != "GET" or "{" in path or path in WORKSPACE_FREE:
            continue
        got = world["b"](method, path)
        assert got.status_code in (200, 403), (path, got.status_code, got.content)
        for s in secrets_of_a:
            assert s.encode() not in got.content, (path, s)
        listed += got.status_code == 200
    assert listed >= 8
    # while A's own listings show them
    assert o["dict"]["object_id"].encode() in world["a"]("GET", "/dicts").content


def test_names_are_per_workspace_and_bodies_naming_another_workspaces_objects(world):
    o = world["objects"]
    b = world["b"]
    fn = o["app"]["functions"][0]["function_id"]
    call = {"function_id": fn, "call_id": "fc-iso-" + secrets.token_hex(4), "inputs": []}
    assert b("POST", "/calls", call).status_code == 404  # A's function, by id in a body
    assert b("POST", "/dicts/lookup", {"name": "iso-d"}).status_code == 404
    mine = b.ok("POST", "/dicts/lookup", {"name": "iso-d", "create_if_missing": True})
    assert mine["object_id"] != o["dict"]["object_id"]  # B's own Dict of that name
    assert (
        b.ok("POST", "/volumes", {"name": "iso-v", "create_if_missing": True})["volume_id"]
        != (o["volume"]["volume_id"])
    )
    b.ok("POST", "/secrets", {"name": "iso-s", "values": {"K": "b"}})  # no clash with A's


def test_code_in_another_workspaces_container_reaches_nothing_of_a(world):
    from strato.client import session

    real, _ = _values(world)
    o = world["objects"]
    asks = []
    for method, path, _access in _routes(world):
        if path in WORKSPACE_FREE or "{" not in path:
            continue
        filled = _fill(path, real)
        if filled is not None:
            asks.append((method, filled[0], None))
    fn = o["app"]["functions"][0]["function_id"]
    asks.append(("POST", "/calls", {"function_id": fn, "call_id": "fc-x", "inputs": []}))
    asks.append(("POST", "/queues/lookup", {"name": "iso-q"}))  # only A has one
    saved = os.environ.get("STRATO_TOKEN")
    os.environ["STRATO_TOKEN"] = world["b_token"]
    session.reset()
    try:
        apps = world["apps"]
        with apps.probe_app.run():
            answers = apps.probe.remote(asks)
    finally:
        os.environ["STRATO_TOKEN"] = saved or ""
        if saved is None:
            del os.environ["STRATO_TOKEN"]
        session.reset()
    reached = [(a[0], a[1], r) for a, r in zip(asks, answers, strict=True) if r == "ok"]
    assert not reached, reached
    assert set(answers) <= {"NotFoundError", "AuthError", "PermissionDeniedError"}, answers
    print(f"refusals over a B container's channel: {dict(Counter(answers))}")


def test_a_revoked_token_is_refused_at_once(world, server):
    from strato.client.local_channel import LocalChannelClient

    a = world["a"]
    new = a.ok("POST", "/tokens", {"role": "developer", "name": "short-lived"})
    mine = Client(server.url, new["token"])
    assert mine.ok("GET", "/whoami")["workspace"] == world["ws_a"]
    info = __import__("json").loads((server.home / "server.json").read_text())
    channel = LocalChannelClient(server.url, new["token"], info["channel"])
    try:
        assert channel.call("GET", "/whoami", None, m.WhoAmI).role == "developer"
        a.ok("DELETE", f"/tokens/{new['info']['token_id']}")
        assert mine("GET", "/whoami").status_code == 401  # the next request, over HTTP
        with pytest.raises(exc.AuthError):  # and over the connection opened before
            channel.call("GET", "/whoami", None, m.WhoAmI)
    finally:
        channel.close()
    listed = a.ok("GET", "/tokens")["tokens"]
    assert [t["revoked"] for t in listed if t["token_id"] == new["info"]["token_id"]] == [True]


def test_a_workspace_token_may_not_name_another_workspace(world, server):
    b = Client(server.url, world["b_token"], world["ws_a"])
    got = b("GET", "/apps")
    assert got.status_code == 401
    assert "STRATO_WORKSPACE" in _error(got) and world["ws_b"] in _error(got)


def test_one_app_name_in_two_workspaces_gets_two_urls_each_serving_its_own(world, server):
    """Web URLs carry the workspace (``<ws>--<app>``) outside the default one, and a
    function's secrets are found by name in its own workspace."""
    import httpx

    from strato.client import session

    apps = world["apps"]
    tokens = {world["ws_a"]: world["a"], world["ws_b"]: world["b"]}
    urls = {}
    saved = os.environ.get("STRATO_TOKEN")
    try:
        for ws, client in tokens.items():
            client.ok("POST", "/secrets", {"name": "ws-iso-who", "values": {"WHO": ws}})
            os.environ["STRATO_TOKEN"] = client.headers["Authorization"][7:]
            session.reset()
            apps.web_app.deploy()
            urls[ws] = apps.who.get_web_url()
            assert f"/{ws}--ws-iso-web/" in urls[ws], urls[ws]
    finally:
        os.environ.pop("STRATO_TOKEN", None)
        if saved is not None:
            os.environ["STRATO_TOKEN"] = saved
        session.reset()
    for ws, url in urls.items():
        got = httpx.get(url, timeout=60)
        assert got.status_code == 200 and got.json() == {"who": ws}, (url, got.text)


def test_the_dashboard_shows_a_workspace_token_its_own_workspace_only(world, server):
    """Log in with a workspace's token: its apps, calls and objects, nothing of another
    workspace (as missing), no node page; a read-only token stops nothing; a revoked
    token's session ends at once."""
    import httpx

    o = world["objects"]
    app_id, call_id = o["app"]["app_id"], o["call_id"]
    b_token = world["b_token"]
    with httpx.Client(base_url=server.url, timeout=30) as ui:
        r = ui.post("/ui/login", data={"token": b_token, "next": "/ui"})
        assert r.status_code == 303, r.text
        home = ui.get("/ui").text
        assert app_id not in home and world["ws_b"] in home and "/ui/nodes" not in home
        for page in (f"/ui/apps/{app_id}", f"/ui/calls/{call_id}"):
            assert ui.get(page).status_code == 404, page
        missing = ui.get("/ui/apps/ap-0000000000000000")
        assert missing.status_code == 404
        assert ui.get(f"/ui/sse/logs?app={app_id}").status_code == 404
        assert ui.get("/ui/nodes").status_code == 403
        assert o["dict"]["object_id"] not in ui.get("/ui/objects/dicts").text
    read_only = {"Authorization": world["a_read"].headers["Authorization"]}
    with httpx.Client(base_url=server.url, timeout=30, headers=read_only) as ui:
        assert o["app"]["name"] in ui.get("/ui").text  # its own workspace's app
        assert o["dict"]["object_id"] in ui.get("/ui/objects/dicts").text
        assert ui.post(f"/ui/apps/{app_id}/stop").status_code == 403
        assert ui.post("/ui/logout").status_code == 303  # (a POST it may send)
    assert world["a"].ok("GET", f"/apps/{app_id}")["state"] == "deployed"
    new = world["a"].ok("POST", "/tokens", {"role": "developer"})
    with httpx.Client(base_url=server.url, timeout=30) as ui:
        assert ui.post("/ui/login", data={"token": new["token"]}).status_code == 303
        assert ui.get(f"/ui/apps/{app_id}").status_code == 200
        world["a"].ok("DELETE", f"/tokens/{new['info']['token_id']}")
        assert ui.get(f"/ui/apps/{app_id}").status_code == 303  # back to the login page
