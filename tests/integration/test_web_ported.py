"""Web endpoints as ported Modal apps write them, in a Debian image that has only what the
app imports (Flask), in bwrap containers: strato's serving stack (uvicorn, httptools,
websockets) comes with strato's runtime layer, read-only and behind the image's own
packages; path-based URLs give the app its prefix (``SCRIPT_NAME``, ``root_path``);
Flask reads JSON bodies; a response that fails half-way is cut short and logged.

The image is built once per machine into the shared test image cache (as
test_isolation_e2e's), so a rerun pays only for the containers.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest
from conftest import dedicated_server, wait_until

from strato.client import session
from strato.protocol import messages as m

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

if os.geteuid() != 0 or not shutil.which("bwrap") or not shutil.which("debootstrap"):
    pytest.fail("these tests need root, bubblewrap and debootstrap (.ci/run installs them)")

from apps import web_ported  # noqa: E402

IMAGE_CACHE = os.environ.get("STRATO_TEST_IMAGE_CACHE", "/tmp/strato-test-image-cache")
SERVING = "/opt/strato/serving/"
TIMEOUT = httpx.Timeout(120.0)


@pytest.fixture(scope="module")
def ported(strato_server):
    env = {
        "STRATO_RUNTIME": "bwrap",
        "STRATO_IMAGE_CACHE": IMAGE_CACHE,
        "STRATO_WEB_WAIT_TIMEOUT": "300",  # a first run builds the image meanwhile
    }
    with dedicated_server(env):
        web_ported.app.deploy()
        yield web_ported
    strato_server.activate()


def app_logs(app: str) -> list[m.LogLine]:
    batch = session.api().call("GET", f"/apps/{app}/logs", None, m.LogBatch, params={"after": 0})
    return batch.lines


def get(url: str, **kw) -> httpx.Response:
    return httpx.get(url, timeout=TIMEOUT, follow_redirects=True, **kw)


def test_flask_app_in_an_image_without_a_server(ported):
    base = ported.flask_app.get_web_url()
    assert base.endswith("/web-ported/flask-app")
    r = get(base + "/")
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["uvicorn"].startswith(SERVING)  # strato's, the image has none
    assert "/dist-packages/flask/" in got["flask"]  # the image's
    # the path prefix is the WSGI SCRIPT_NAME: links and URLs lead back through the gateway
    assert got["script_root"] == "/web-ported/flask-app"
    assert got["path"] == "/"
    assert got["url"] == base + "/"
    assert got["link"] == "/web-ported/flask-app/item/3"
    assert got["external"] == base + "/item/3"
    r = httpx.get(base + "/go", timeout=TIMEOUT)
    assert r.status_code == 302
    target = httpx.URL(base).join(r.headers["location"])
    assert str(target) == base + "/item/7"
    assert get(str(target)).json() == {"n": 7}


def test_flask_reads_json_and_form_bodies(ported):
    base = ported.flask_app.get_web_url()
    item = {"a": 1, "b": ["x" * 5000, None]}
    r = httpx.post(base + "/json", json=item, timeout=TIMEOUT, follow_redirects=True)
    assert r.status_code == 200, r.text
    assert r.json()["got"] == item
    r = httpx.post(base + "/form", data={"k": "v", "n": "2"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json() == {"form": {"k": "v", "n": "2"}}


def test_flask_stream_failing_half_way_is_cut_short_and_logged(ported):
    url = ported.flask_app.get_web_url() + "/stream-fail"
    get(ported.flask_app.get_web_url() + "/")  # warm: the failure is the subject here
    got = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("GET", url, timeout=TIMEOUT) as r:
            assert r.status_code == 200
            rid = r.headers["x-strato-request-id"]
            for part in r.iter_raw():
                got += part
    assert got == b"first part\n"

    def logged():
        lines = app_logs("web-ported")
        failed = [x for x in lines if rid in x.text and "failed" in x.text]
        broke = [x for x in lines if "the stream broke half-way" in x.text]
        cut = [x for x in lines if rid in x.text and x.stream == "access" and "cut short" in x.text]
        return failed and broke and cut

    wait_until(logged, 20, "the failure in the app's logs")


def test_websocket_and_root_path_of_an_asgi_app_in_the_image(ported):
    from websockets.sync.client import connect

    base = ported.sockets.get_web_url()
    r = get(base + "/x/y")
    assert r.status_code == 200, r.text
    got = r.json()
    for name in ("uvicorn", "httptools", "websockets"):
        assert got[name].startswith(SERVING), got
    assert got["root_path"] == "/web-ported/sockets"
    assert got["path"] == "/web-ported/sockets/x/y"
    assert got["raw_path"] == "/web-ported/sockets/x/y"
    with connect(base.replace("http://", "ws://") + "/ws", open_timeout=60) as ws:
        for i in range(3):
            ws.send(f"hi {i}")
            assert ws.recv(timeout=20) == f"echo:hi {i}"


def test_a_server_the_user_installed_is_not_shadowed(ported):
    r = get(ported.own_uvicorn.get_web_url() + "/")
    assert r.status_code == 200, r.text
    got = r.json()
    assert "/dist-packages/uvicorn/" in got["uvicorn"]  # the image's own
    assert got["httptools"].startswith(SERVING)  # what it lacks still comes from strato


def test_mcp_server_over_streamable_http(ported):
    url = ported.mcp_server.get_web_url() + "/mcp"
    headers = {"accept": "application/json, text/event-stream"}

    def rpc(n: int, method: str, params: dict, **extra: str) -> dict:
        body = {"jsonrpc": "2.0", "id": n, "method": method, "params": params}
        r = httpx.post(
            url, json=body, headers={**headers, **extra}, timeout=TIMEOUT, follow_redirects=True
        )
        assert r.status_code == 200, r.text
        return r.json()["result"]

    hello = {"name": "test", "version": "1"}
    init = rpc(
        1, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": hello}
    )
    assert init["serverInfo"]["name"] == "strato-test"
    version = {"mcp-protocol-version": init["protocolVersion"]}
    tools = rpc(2, "tools/list", {}, **version)
    assert [t["name"] for t in tools["tools"]] == ["add"]
    out = rpc(3, "tools/call", {"name": "add", "arguments": {"a": 2, "b": 3}}, **version)
    assert out["content"][0]["text"] == "5"
