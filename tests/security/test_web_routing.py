"""Web isolation between apps, through the real gateway on loopback.

- Route names are unique across apps: an app whose URLs another live app serves is
  refused when it is deployed or run (``RouteConflictError``, naming the other app); the
  same app redeploying keeps its routes.
- A 303's result id is 128 random bits, not the request id, and a result of a
  ``requires_auth`` endpoint is bound to the request's ``Strato-Token``: anyone else gets
  a 404, as for an id that does not exist.
- Client-supplied forwarding and request-id headers never reach the app (the gateway's
  own replace them, one value each); hop-by-hop headers, those named in ``Connection``
  included, are stripped.
"""

from __future__ import annotations

import base64
import json
import socket
import sys
from pathlib import Path

import httpx
import pytest
from conftest import dedicated_server

from strato.exceptions import RouteConflictError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import web_apps as apps  # noqa: E402

HTTP_LIMIT_S = 2
TIMEOUT = httpx.Timeout(60.0)


@pytest.fixture(scope="module")
def server(strato_server):
    env = {"STRATO_RUNTIME": "process", "STRATO_WEB_HTTP_LIMIT": str(HTTP_LIMIT_S)}
    with dedicated_server(env) as handle:
        yield handle
    strato_server.activate()


def gateway_port(server) -> int:
    url = json.loads((server.home / "server.json").read_text())["gateway_url"]
    port = httpx.URL(url).port
    assert port is not None
    return port


# ---------------------------------------------------------------------- route names


def test_an_app_cannot_take_another_apps_host(server):
    apps.shop.deploy()
    with pytest.raises(RouteConflictError) as info:
        apps.shop_cart.deploy()  # label "api": shop-cart-api.localhost, as shop's cart-api
    msg = str(info.value)
    assert "'shop'" in msg and "shop-cart-api.localhost" in msg, msg
    assert "label=" in msg and "strato app stop shop" in msg, msg  # says what to do
    # the refused app routes nothing (the gateway's own 404)
    r = httpx.get(f"http://127.0.0.1:{gateway_port(server)}/shop-cart/api", timeout=TIMEOUT)
    assert r.status_code == 404 and "no web endpoint" in r.json()["message"]
    # the same app redeploying keeps its routes
    url = apps.shop_cart_api.get_web_url()
    apps.shop.deploy()
    assert apps.shop_cart_api.get_web_url() == url


def test_app_names_differing_in_case_are_one_route(server):
    apps.web_lower.deploy()
    with pytest.raises(RouteConflictError) as info:
        apps.web_upper.deploy()
    assert "'web'" in str(info.value) and "'WEB'" in str(info.value), str(info.value)
    assert apps.home_lower.get_web_url().endswith("/web/home")


def test_the_dev_suffix_of_ephemeral_apps_counts(server):
    # the ephemeral "shop" routes as shop-dev: a deployed app of that name shadows it
    apps.shop_dev.deploy()
    with pytest.raises(RouteConflictError) as info:
        with apps.shop.run(quiet=True):
            pass
    assert "'shop-dev'" in str(info.value), str(info.value)


# ---------------------------------------------------------------------- deferred results


def _result_id(location: str) -> str:
    assert location.startswith("/__strato/results/"), location
    return location.removeprefix("/__strato/results/")


def _fetch(url: str, headers: dict | None = None) -> httpx.Response:
    """Fetch a result, following its 303s to itself while it runs."""
    return httpx.get(url, headers=headers or {}, timeout=TIMEOUT, follow_redirects=True)


@pytest.mark.slow
def test_deferred_result_ids_are_random_and_bound_to_the_token(server):
    apps.echo_app.deploy()
    base = f"http://127.0.0.1:{gateway_port(server)}"
    token = (server.home / "web_token").read_text().strip()
    sleep = {"sleep": HTTP_LIMIT_S + 2}

    # an endpoint without auth: the unguessable id is what lets a caller fetch it
    url = apps.echo.get_web_url()
    r1 = httpx.get(url, params=sleep, timeout=TIMEOUT)
    r2 = httpx.get(url, params=sleep, timeout=TIMEOUT)
    assert r1.status_code == r2.status_code == 303
    ids = [_result_id(r.headers["location"]) for r in (r1, r2)]
    for rid, r in zip(ids, (r1, r2), strict=True):
        raw = base64.urlsafe_b64decode(rid + "=" * (-len(rid) % 4))
        assert len(raw) >= 16, f"result id {rid!r} has under 128 bits"
        assert r.headers["x-strato-request-id"] not in rid  # not the request id
    assert ids[0] != ids[1]
    # the request id (which the app and the logs see) and a near miss fetch nothing
    for guess in (
        r1.headers["x-strato-request-id"],
        ids[0][:-1] + ("A" if ids[0][-1] != "A" else "B"),
    ):
        assert httpx.get(f"{base}/__strato/results/{guess}", timeout=TIMEOUT).status_code == 404
    got = _fetch(f"{base}/__strato/results/{ids[0]}")
    assert got.status_code == 200 and got.json()["path"] == "/"

    # requires_auth: bound to the request's Strato-Token
    url = apps.echo_auth.get_web_url()
    r = httpx.get(url, params=sleep, headers={"Strato-Token": token}, timeout=TIMEOUT)
    assert r.status_code == 303
    rid = _result_id(r.headers["location"])
    missing = httpx.get(f"{base}/__strato/results/{'x' * 22}", timeout=TIMEOUT)
    for headers in ({}, {"Strato-Token": "wt-wrong"}):
        other = httpx.get(f"{base}/__strato/results/{rid}", headers=headers, timeout=TIMEOUT)
        assert other.status_code == 404, (headers, other.text)
        # the same answer as for an id that does not exist (nothing says it is there)
        assert other.json()["message"].replace(rid, "x" * 22) == missing.json()["message"]
    got = _fetch(f"{base}/__strato/results/{rid}", {"Strato-Token": token})
    assert got.status_code == 200 and got.json()["path"] == "/"
    # the token never reached the app
    assert "strato-token" not in {k for k, _ in got.json()["headers"]}


# ---------------------------------------------------------------------- headers


def raw_request(port: int, head: bytes) -> tuple[bytes, dict]:
    """Send a raw request head (``Connection: close`` added), return (head, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    resp_head, _, body = data.partition(b"\r\n\r\n")
    assert resp_head.startswith(b"HTTP/1.1 200"), data[:500]
    if b"transfer-encoding: chunked" in resp_head.lower():
        out, rest = b"", body
        while True:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2 :]
        body = out
    return resp_head, json.loads(body)


def echoed(port: int, path: str, headers: list[tuple[str, str]]) -> tuple[bytes, dict]:
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers)]
    head, body = raw_request(port, ("\r\n".join(lines) + "\r\n").encode("latin-1"))
    got: dict[str, list[str]] = {}
    for k, v in body["headers"]:
        got.setdefault(k.lower(), []).append(v)
    return head, got


def test_forged_forwarding_headers_are_replaced(server):
    if apps.echo_app.app_id is None:
        apps.echo_app.deploy()
    port = gateway_port(server)
    prefix = "/" + apps.echo.get_web_url().split("/", 3)[3]  # /<app>/<label>
    head, got = echoed(
        port,
        prefix + "/x",
        [
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Forwarded-Prefix", "/evil"),
            ("X-FORWARDED-PREFIX", "/evil2"),
            ("X-Forwarded-Port", "443"),
            ("X-Real-IP", "203.0.113.9"),
            ("Forwarded", "for=203.0.113.9;proto=https"),
            ("X-Strato-Request-Id", "wr-forged-1"),
            ("X-Kept", "yes"),
        ],
    )
    rid = next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"x-strato-request-id:")
    )
    assert got["x-forwarded-for"] == ["127.0.0.1"]
    assert got["x-forwarded-proto"] == ["http"]
    assert got["x-forwarded-host"] == [f"127.0.0.1:{port}"]
    assert got["x-forwarded-prefix"] == [prefix]
    assert got["x-strato-request-id"] == [rid] and rid != "wr-forged-1"
    for name in ("x-forwarded-port", "x-real-ip", "forwarded"):
        assert name not in got, (name, got[name])
    assert got["x-kept"] == ["yes"]  # other headers pass


def test_hop_by_hop_headers_are_stripped(server):
    if apps.echo_app.app_id is None:
        apps.echo_app.deploy()
    port = gateway_port(server)
    prefix = "/" + apps.echo.get_web_url().split("/", 3)[3]
    _, got = echoed(
        port,
        prefix,
        [
            ("Connection", "keep-alive, X-Hop-Secret, x-other-hop"),
            ("X-Hop-Secret", "1"),
            ("X-Other-Hop", "2"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Trailer", "X-Late"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("Proxy-Anything", "x"),
            ("Upgrade", "h2c"),  # not a real upgrade: Connection does not name it
            ("X-Kept", "yes"),
        ],
    )
    for name in (
        "x-hop-secret",
        "x-other-hop",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-anything",
        "upgrade",
    ):
        assert name not in got, (name, got[name])
    # the only Connection header the app sees is the one its own server got from the
    # gateway's rewritten head, if any: never the client's list of hop-by-hop names
    assert all("hop" not in v.lower() for v in got.get("connection", []))
    assert got["x-kept"] == ["yes"]
