"""Sandbox tunnels (``encrypted_ports``/``unencrypted_ports``, ``sb.tunnels()``) end to
end, through each port's own listener (``host``/``port``, ``tcp_socket``, ``tls_socket``):
a real control plane and real sandboxes under bwrap and gVisor with
``block_network=True``; HTTP and a WebSocket echo through the tunnels, the tunnels gone
at terminate, out of reach of another app's containers, and from inside a container.
``Tunnel.url``, through the web gateway's port, is test_sandbox_gateway_tunnels.py's."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
import urllib.request
import uuid

import pytest
from conftest import wait_until

import strato
from strato import exceptions as exc
from strato.sdk.tunnel import Tunnel

pytestmark = pytest.mark.slow

ISOLATING = [r for r in ("bwrap", "gvisor") if shutil.which("bwrap" if r == "bwrap" else "runsc")]
if os.geteuid() != 0 or len(ISOLATING) < 2:
    pytest.fail("these tests need root, bubblewrap and runsc (.ci/run installs them)")

# a WebSocket echo server with the standard library only (the sandbox's Python is the host's)
WS_ECHO = r"""
import base64, hashlib, socket, struct, sys, threading
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

def serve(c):
    f = c.makefile("rb")
    key = ""
    while (line := f.readline().strip()):
        k, _, v = line.decode().partition(":")
        if k.lower() == "sec-websocket-key":
            key = v.strip()
    accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    c.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").encode())
    while len(hdr := f.read(2)) == 2:
        op, n = hdr[0] & 0x0F, hdr[1] & 0x7F
        if n == 126:
            n = struct.unpack(">H", f.read(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", f.read(8))[0]
        mask = f.read(4)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(f.read(n)))
        if op == 8:
            c.sendall(b"\x88\x00")
            break
        size = bytes([n]) if n < 126 else b"\x7e" + struct.pack(">H", n)
        c.sendall(bytes([0x80 | op]) + size + data)
    c.close()

srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""


@pytest.fixture(scope="module")
def app(strato_server):
    strato_server.activate()
    return strato.App.lookup(f"sbports-{uuid.uuid4().hex[:8]}", create_if_missing=True)


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read()
    except OSError:
        return None  # (its server may not listen yet)


def _listener(t: Tunnel) -> str:
    """The URL of a tunnel's own listener (``Tunnel.url`` is the gateway's)."""
    return f"{'https' if t.tls else 'http'}://{t.host}:{t.port}"


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
        return False
    except OSError:
        return True


@pytest.mark.parametrize("runtime", ISOLATING)
def test_http_and_a_websocket_through_the_tunnels_of_a_sandbox_without_network(app, runtime):
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
        sb.mkdir("/tmp/www", parents=True)
        with sb.open("/tmp/www/hello.txt", "w") as f:
            f.write("hello through a tunnel\n")
        with sb.open("/tmp/ws.py", "w") as f:
            f.write(WS_ECHO)
        sb.exec("python3", "-m", "http.server", "8000", "--bind", "127.0.0.1", "-d", "/tmp/www")
        sb.exec("python3", "/tmp/ws.py", "8765")
        tunnels = asyncio.run(sb.tunnels.aio())  # (the .aio twin)
        assert tunnels == sb.tunnels()
        assert set(tunnels) == {8000, 8765}
        web, ws = tunnels[8000], tunnels[8765]
        assert web.url == f"http://{sb.object_id}-8000.tunnel.localhost:{web.url.rsplit(':')[-1]}"
        assert web.tls_socket == (web.host, web.port)
        assert ws.tcp_socket == (ws.unencrypted_host, ws.unencrypted_port) == (ws.host, ws.port)
        with pytest.raises(exc.InvalidError, match="unencrypted_ports"):
            web.tcp_socket  # noqa: B018 - an encrypted port has no plain TCP socket

        body = wait_until(lambda: _get(_listener(web) + "/hello.txt"), 60, "the sandbox's server")
        assert body == b"hello through a tunnel\n"
        # several clients at once, each its own connection through the sandbox's agent
        results: list[bytes | None] = []
        threads = [
            threading.Thread(target=lambda: results.append(_get(_listener(web) + "/hello.txt")))
            for _ in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [b"hello through a tunnel\n"] * 6

        wait_until(lambda: not _refused(ws.host, ws.port), 30, "the tunnel's listener")

        def echo() -> bool:
            try:
                with connect(f"ws://{ws.host}:{ws.port}/", open_timeout=10) as conn:
                    conn.send("hello")
                    assert conn.recv(timeout=10) == "hello"
                    big = os.urandom(50_000)
                    conn.send(big)
                    assert conn.recv(timeout=10) == big
                return True
            except (OSError, EOFError) as e:  # its server may not listen yet
                print("websocket not yet:", e)
                return False

        wait_until(echo, 60, "a WebSocket echo through the tunnel")

        # another app's container reaches neither the tunnel's listener nor the port
        other = strato.App.lookup(f"sbports-other-{uuid.uuid4().hex[:8]}", create_if_missing=True)
        probe = strato.Sandbox.create(app=other, runtime=runtime, timeout=120)
        try:
            code = (
                "import socket, sys\n"
                "for h in ('127.0.0.1', '10.0.2.2'):\n"
                "    try:\n"
                f"        socket.create_connection((h, {web.port}), timeout=3).close()\n"
                "        print('reached', h)\n"
                "    except OSError as e:\n"
                "        print('no', h)\n"
            )
            p = probe.exec("python3", "-c", code)
            assert p.stdout.read() == "no 127.0.0.1\nno 10.0.2.2\n", p.stderr.read()
        finally:
            probe.terminate()
    finally:
        sb.terminate()
    sb.wait(raise_on_termination=False)
    # the tunnels go with the sandbox
    wait_until(lambda: _refused(web.host, web.port), 30, "the tunnel's listener to close")
    assert _refused(ws.host, ws.port)
    with pytest.raises(exc.SandboxTerminatedError):
        sb.tunnels()


def test_bad_ports_get_a_clear_error(app):
    with pytest.raises(exc.InvalidError, match="70000 is out of range"):
        strato.Sandbox.create(app=app, runtime="bwrap", encrypted_ports=[70000])
    with pytest.raises(exc.InvalidError, match="out of range"):
        strato.Sandbox.create(app=app, runtime="bwrap", unencrypted_ports=[0])
    with pytest.raises(exc.InvalidError, match="port 8000 is given twice"):
        strato.Sandbox.create(
            app=app, runtime="bwrap", encrypted_ports=[8000], unencrypted_ports=[8000]
        )
    assert not [s for s in strato.Sandbox.list(app_id=app.app_id) if s.object_id], "none made"


def test_tunnels_from_inside_a_container(server):
    """A function (its own app's sandbox, ``Sandbox.create`` without ``app=``) opens a
    tunnel and fetches through it."""
    app = strato.App(f"sbports-inner-{uuid.uuid4().hex[:6]}")

    @app.function(serialized=True, timeout=300)
    def through_a_tunnel() -> str:
        import time
        import urllib.request

        import strato

        sb = strato.Sandbox.create(runtime="bwrap", block_network=True, encrypted_ports=[8080])
        try:
            with sb.open("/tmp/index.html", "w") as f:
                f.write("from inside")
            sb.exec("python3", "-m", "http.server", "8080", "--bind", "127.0.0.1", "-d", "/tmp")
            host, port = sb.tunnels()[8080].tls_socket
            url = f"http://{host}:{port}"  # its own listener (*.localhost may not resolve)
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(url + "/index.html", timeout=10) as r:
                        return r.read().decode()
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        finally:
            sb.terminate()

    with app.run(quiet=True):
        assert through_a_tunnel.remote() == "from inside"


@pytest.fixture
def joined_node():
    from cluster_nodes import one_joined_node

    with one_joined_node("sbports-node") as handle:
        yield handle


def test_tunnels_of_a_sandbox_on_a_joined_node_go_through_the_relay(joined_node):
    from websockets.sync.client import connect

    app = strato.App.lookup("sbports-joined", create_if_missing=True)
    sb = strato.Sandbox.create(
        app=app, runtime="bwrap", block_network=True, unencrypted_ports=[8000, 8765]
    )
    try:
        big = os.urandom(3 << 20)  # several relay frames each way
        with sb.open("/tmp/big.bin", "wb") as f:
            f.write(big)
        with sb.open("/tmp/ws.py", "w") as f:
            f.write(WS_ECHO)
        sb.exec("python3", "-m", "http.server", "8000", "--bind", "127.0.0.1", "-d", "/tmp")
        sb.exec("python3", "/tmp/ws.py", "8765")
        tunnels = sb.tunnels()
        body = wait_until(lambda: _get(_listener(tunnels[8000]) + "/big.bin"), 60, "the server")
        assert body == big

        def echo() -> bool:
            try:
                ws_url = _listener(tunnels[8765]).replace("http", "ws")
                with connect(ws_url, open_timeout=10) as c:
                    c.send("over the relay")
                    return c.recv(timeout=10) == "over the relay"
            except (OSError, EOFError) as e:
                print("websocket not yet:", e)
                return False

        wait_until(echo, 60, "a WebSocket echo through the relay")
    finally:
        sb.terminate()


def test_encrypted_ports_speak_tls_where_the_control_plane_has_a_certificate(tmp_path):
    import ssl
    import subprocess

    from cluster_nodes import one_joined_node
    from conftest import restore_env

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=strato-test"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    saved = {"STRATO_TLS_CA": os.environ.get("STRATO_TLS_CA")}
    os.environ["STRATO_TLS_CA"] = str(cert)  # this client verifies the API's HTTPS with it
    tls = {"STRATO_TLS_CERT": str(cert), "STRATO_TLS_KEY": str(key)}
    try:
        with one_joined_node("sbports-tls", server_env=tls, extra=("--tls-ca", str(cert))):
            app = strato.App.lookup("sbports-tls", create_if_missing=True)
            sb = strato.Sandbox.create(
                app=app, runtime="bwrap", encrypted_ports=[8000], unencrypted_ports=[8001]
            )
            try:
                with sb.open("/tmp/index.html", "w") as f:
                    f.write("over tls")
                for port in ("8000", "8001"):
                    sb.exec(
                        "python3", "-m", "http.server", port, "--bind", "127.0.0.1", "-d", "/tmp"
                    )
                tunnels = sb.tunnels()
                secure, plain = tunnels[8000], tunnels[8001]
                assert secure.tls and _listener(secure).startswith("https://")
                assert not plain.tls and _listener(plain).startswith("http://")
                ctx = ssl.create_default_context(cafile=str(cert))

                def get_tls() -> bytes | None:
                    try:
                        url = _listener(secure) + "/index.html"
                        with urllib.request.urlopen(url, timeout=10, context=ctx) as r:
                            return r.read()
                    except OSError:
                        return None  # (its server may not listen yet)

                assert wait_until(get_tls, 60, "a GET over TLS") == b"over tls"
                assert wait_until(lambda: _get(_listener(plain) + "/index.html"), 60, "plain") == (
                    b"over tls"
                )
                assert _get(_listener(secure).replace("https", "http") + "/index.html") is None
            finally:
                sb.terminate()
    finally:
        restore_env(saved)
