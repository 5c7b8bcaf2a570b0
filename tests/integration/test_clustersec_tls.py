"""The HTTP API over TLS (``STRATO_TLS_CERT``/``STRATO_TLS_KEY``): an HTTPS client that
trusts the certificate works, plain HTTP to that port is refused with an error that says
to use https://, and a client that trusts another CA fails with an error naming it."""

from __future__ import annotations

import http.client
import os
import subprocess

import pytest
from cluster_nodes import start_control_plane, stop_control_plane
from conftest import restore_env

from strato import exceptions as exc
from strato.client import config as client_config
from strato.client import session
from strato.client.http import ApiClient
from strato.client.tls import client_context
from strato.protocol import messages as m

pytestmark = pytest.mark.slow


def make_cert(folder, name: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key."""
    cert, key = folder / f"{name}.pem", folder / f"{name}-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(cert), str(key)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = make_cert(folder, "strato-test")
    other, _ = make_cert(folder, "another-ca")
    saved = {k: os.environ.get(k) for k in ("STRATO_HOME", "STRATO_SERVER_URL", "STRATO_TLS_CA")}
    os.environ["STRATO_TLS_CA"] = cert  # this process verifies the API with it
    handle = start_control_plane({"STRATO_TLS_CERT": cert, "STRATO_TLS_KEY": key})
    try:
        yield handle, cert, other
    finally:
        stop_control_plane(handle)
        restore_env(saved)
        session.reset()


def test_an_https_client_that_trusts_the_certificate_works(tls_server):
    handle, cert, _ = tls_server
    assert handle.url.startswith("https://127.0.0.1:")
    token = (handle.home / "token").read_text().strip()
    api = ApiClient(handle.url, token)  # verifies with STRATO_TLS_CA
    assert api.call("GET", "/apps", None, m.AppList).apps == []
    assert client_config.ping(handle.url)["version"]
    given = ApiClient(handle.url, token, tls_context=client_context(cert))  # as --tls-ca
    assert given.call("GET", "/nodes", None, m.NodeList).nodes == []
    with pytest.raises(exc.AuthError):  # HTTPS changes nothing of the token's check
        ApiClient(handle.url, "wrong-token").call("GET", "/apps", None, m.AppList)


def test_plain_http_to_the_https_port_is_refused_with_what_to_do(tls_server):
    handle, *_ = tls_server
    plain = handle.url.replace("https://", "http://")
    token = (handle.home / "token").read_text().strip()
    with pytest.raises(exc.ConnectionError, match="speaks HTTPS") as e:
        ApiClient(plain, token, reconnect_timeout=10).call("GET", "/apps", None, m.AppList)
    assert handle.url in str(e.value)  # it names the URL to use
    # a plain HTTP client gets no HTTP answer at all: the connection is closed
    conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        conn.request("GET", "/apps", headers={"Authorization": f"Bearer {token}"})
        conn.getresponse()
    conn.close()
    assert client_config.ping(plain) is None


def test_a_client_that_trusts_another_ca_fails_with_a_clear_error(tls_server, monkeypatch):
    handle, _, other = tls_server
    token = (handle.home / "token").read_text().strip()
    monkeypatch.setenv("STRATO_TLS_CA", other)
    with pytest.raises(exc.ConnectionError, match="does not verify") as e:
        ApiClient(handle.url, token).call("GET", "/apps", None, m.AppList)
    assert other in str(e.value) and "STRATO_TLS_CA" in str(e.value)
    monkeypatch.delenv("STRATO_TLS_CA")  # the system's CAs do not know a self-signed one
    with pytest.raises(exc.ConnectionError, match="system's trust store"):
        ApiClient(handle.url, token).call("GET", "/apps", None, m.AppList)
    with pytest.raises(exc.ConnectionError, match="it was given"):
        ApiClient(handle.url, token, tls_context=client_context(other)).call(
            "GET", "/apps", None, m.AppList
        )
    assert client_config.ping(handle.url) is None  # (nothing answers that it trusts)
