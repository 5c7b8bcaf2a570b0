"""Sandbox tunnels through the web gateway's own port (``Tunnel.url``,
``http://<sandbox-id>-<port>.tunnel.localhost:<gateway port>``): a real control plane and
real sandboxes under bwrap and gVisor with ``block_network=True``; kept-alive HTTP, a
body, a WebSocket echo, the head passed unchanged, 404 for unknown and ended tunnels, 421
for a connection that carried other requests, and a web endpoint on the same gateway.

The tests connect to the gateway's address and send the tunnel's host name in ``Host``
(as a browser or curl does for ``*.localhost``): this machine's resolver does not resolve
``*.localhost`` names, which curl and browsers resolve themselves."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import uuid
from urllib.parse import urlsplit

import pytest
from conftest import wait_until
from test_sandbox_ports import ISOLATING, WS_ECHO

import strato

pytestmark = pytest.mark.slow

# an HTTP/1.1 server (keep-alive) that answers what it was asked, as it saw it
SERVER = r"""
import http.server, json, sys

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, body):
        data = json.dumps({
            "line": self.requestline, "host": self.headers.get("Host"),
            "peer": self.client_address[1], "body": len(body),
            "headers": [k for k, _ in self.headers.items()],
        }).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._answer(b"")

    def do_POST(self):
        self._answer(self.rfile.read(int(self.headers["Content-Length"])))

    def log_message(self, *a):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.fixture(scope="module")
def app(strato_server):
    strato_server.activate()
    return strato.App.lookup(f"sbgw-{uuid.uuid4().hex[:8]}", create_if_missing=True)


def _gateway(url: str) -> tuple[str, int]:
    """(the Host header, the gateway's port) of a URL on the gateway."""
    parts = urlsplit(url)
    assert parts.port is not None, url
    return parts.netloc, parts.port


def _connect(url: str) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", _gateway(url)[1], timeout=30)


def _get(
    conn: http.client.HTTPConnection, host: str, path: str = "/", body: bytes | None = None
) -> tuple[int, bytes]:
    conn.request("GET" if body is None else "POST", path, body=body, headers={"Host": host})
    r = conn.getresponse()
    return r.status, r.read()


def _served(url: str) -> bool:
    """The sandbox's server answers through the gateway (a 502 until it listens)."""
    conn = _connect(url)
    try:
        status, body = _get(conn, _gateway(url)[0], "/ready")
        if status != 200:
            print("not yet:", status, body[:300])
        return status == 200
    finally:
        conn.close()


@pytest.mark.parametrize("runtime", ISOLATING)
def test_http_and_a_websocket_through_the_gateway_url(app, runtime):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    sb = strato.Sandbox.create(
        app=app,
        runtime=runtime,
        block_network=True,
        encrypted_ports=[8000],
        unencrypted_ports=[8765],
        timeout=300,
    )
    try:
        with sb.open("/tmp/server.py", "w") as f:
            f.write(SERVER)
        with sb.open("/tmp/ws.py", "w") as f:
            f.write(WS_ECHO)
        sb.exec("python3", "/tmp/server.py", "8000")
        sb.exec("python3", "/tmp/ws.py", "8765")
        tunnels = sb.tunnels()
        web, ws = tunnels[8000], tunnels[8765]
        host, gw_port = _gateway(web.url)
        assert web.url == f"http://{sb.object_id}-8000.tunnel.localhost:{gw_port}"
        assert ws.url == f"http://{sb.object_id}-8765.tunnel.localhost:{gw_port}"
        assert (web.host, web.port) == web.tls_socket and web.port != gw_port, (
            "the port's own listener stays, for raw TCP"
        )
        wait_until(lambda: _served(web.url), 60, "the sandbox's server through the gateway")

        # kept-alive requests: one client connection, one connection to the server
        conn = _connect(web.url)
        try:
            seen = []
            for i in range(3):
                status, body = _get(conn, host, f"/page/{i}?q={i}")
                assert status == 200, body
                seen.append(json.loads(body))
                sock = conn.sock
                assert sock is not None
                if i == 0:
                    first_sock = sock
                assert sock is first_sock, "the client's connection was kept"
            assert [s["line"] for s in seen] == [f"GET /page/{i}?q={i} HTTP/1.1" for i in range(3)]
            assert {s["peer"] for s in seen} == {seen[0]["peer"]}, "one connection to the server"
            # the head arrives as the client sent it: its Host, no header of the gateway's
            assert seen[0]["host"] == host
            assert not [h for h in seen[0]["headers"] if h.lower().startswith("x-forwarded")]
            payload = os.urandom(300_000)
            status, body = _get(conn, host, "/upload", payload)
            assert status == 200 and json.loads(body)["body"] == len(payload)
            assert conn.sock is first_sock
        finally:
            conn.close()

        # a WebSocket through the gateway's port
        def echo() -> bool:
            sock = socket.create_connection(("127.0.0.1", gw_port), timeout=10)
            try:
                with connect(ws.url.replace("http", "ws", 1) + "/", sock=sock) as c:
                    c.send("hello")
                    assert c.recv(timeout=10) == "hello"
                    big = os.urandom(60_000)  # (the echo server's frames: under 64 KiB)
                    c.send(big)
                    assert c.recv(timeout=10) == big
                return True
            except (OSError, EOFError, InvalidStatus) as e:  # its server may not listen yet
                print("websocket not yet:", type(e).__name__, e)
                sock.close()
                return False

        wait_until(echo, 60, "a WebSocket echo through the gateway")
    finally:
        sb.terminate()
    sb.wait(raise_on_termination=False)

    # the tunnel goes with the sandbox: its host name is a 404 like an unknown one's
    def gone() -> bool:
        conn = _connect(web.url)
        try:
            return _get(conn, host)[0] == 404
        except (OSError, http.client.HTTPException):
            return False  # (a connection of the ended tunnel, reset)
        finally:
            conn.close()

    wait_until(gone, 30, "the ended sandbox's tunnel to answer 404")
    conn = _connect(web.url)
    try:
        status, body = _get(conn, host)
        assert status == 404
        assert json.loads(body)["message"] == f"no sandbox tunnel is served at {host}"
    finally:
        conn.close()


def test_unknown_tunnels_get_404_and_a_connection_is_a_tunnels_from_its_first_request(app):
    sb = strato.Sandbox.create(app=app, runtime="bwrap", block_network=True, encrypted_ports=[80])
    try:
        url = sb.tunnels()[80].url
        host, gw_port = _gateway(url)
        unknown = [
            f"sb-{'0' * 16}-80.tunnel.localhost:{gw_port}",  # no such sandbox
            host.replace("-80.", "-81.", 1),  # a port the sandbox did not ask for
            f"{sb.object_id}.tunnel.localhost",  # no port
            f"{sb.object_id}-99999.tunnel.localhost",
        ]
        conn = _connect(url)
        try:
            for name in unknown:
                status, body = _get(conn, name)
                assert status == 404, (name, body)
                assert json.loads(body)["message"] == f"no sandbox tunnel is served at {name}"
            # (a 404 keeps the connection, as an unknown endpoint's does)
            status, body = _get(conn, f"127.0.0.1:{gw_port}", "/__strato/health")
            assert status == 200, body
            # this connection carried other requests: a tunnel wants one of its own
            status, body = _get(conn, host)
            assert status == 421, body
            assert "connection of its own" in json.loads(body)["message"]
        finally:
            conn.close()
        # nothing listens on the port in the sandbox: a 502 that says so
        conn = _connect(url)
        try:
            status, body = _get(conn, host)
            assert status == 502, body
            assert re.search(r"nothing accepts connections on port 80", body.decode()), body
        finally:
            conn.close()
    finally:
        sb.terminate()


def test_a_web_endpoint_on_the_same_gateway_still_works(app):
    import httpx
    from apps import web_basic

    sb = strato.Sandbox.create(
        app=app, runtime="bwrap", block_network=True, unencrypted_ports=[8000], timeout=300
    )
    try:
        with sb.open("/tmp/server.py", "w") as f:
            f.write(SERVER)
        sb.exec("python3", "/tmp/server.py", "8000")
        url = sb.tunnels()[8000].url
        wait_until(lambda: _served(url), 60, "the sandbox's server through the gateway")
        with web_basic.app.run(quiet=True):
            endpoint = web_basic.hello.get_web_url()
            assert _gateway(endpoint)[1] == _gateway(url)[1], "one gateway port for both"
            r = httpx.get(endpoint, params={"name": "gw"}, timeout=60, follow_redirects=True)
            assert r.status_code == 200 and r.json() == {"hello": "gw"}
            # and by host name (<app>-<label>.localhost), next to the tunnel's
            app_host = f"web-basic-dev-hello.localhost:{_gateway(url)[1]}"
            conn = _connect(url)
            try:
                status, body = _get(conn, app_host, "/?name=host")
                assert status == 200 and json.loads(body) == {"hello": "host"}, body
            finally:
                conn.close()
            assert _served(url)
    finally:
        sb.terminate()
