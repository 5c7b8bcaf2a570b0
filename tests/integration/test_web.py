"""Web endpoints through the gateway, over real HTTP on loopback.

A dedicated control plane with a short HTTP limit (303 after 4 s), a 1 MiB body limit and
a 20 s wait for containers serves the apps in ``apps/web_*.py``; the tests reach them
with httpx (and websockets) at the URLs ``Function.get_web_url()`` returns. A request
that starts a container follows redirects: on a loaded machine a cold start can pass the
4 s limit, and the 303 to its result is then the right answer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from apps import (
    web_basic,
    web_fail,
    web_paths,
    web_redeploy_v1,
    web_redeploy_v2,
    web_scale,
)
from conftest import dedicated_server, wait_until

from strato.client import session
from strato.protocol import messages as m

HTTP_LIMIT_S = 4
MAX_BODY = 1 << 20
WAIT_S = 20
TIMEOUT = httpx.Timeout(60.0)


@pytest.fixture(scope="module")
def web(strato_server):
    env = {
        "STRATO_WEB_HTTP_LIMIT": str(HTTP_LIMIT_S),
        "STRATO_WEB_MAX_BODY": str(MAX_BODY),
        "STRATO_WEB_WAIT_TIMEOUT": str(WAIT_S),
    }
    with dedicated_server(env) as server:
        web_basic.app.deploy()
        yield server
    strato_server.activate()


def app_logs(app: str) -> list[m.LogLine]:
    batch = session.api().call("GET", f"/apps/{app}/logs", None, m.LogBatch, params={"after": 0})
    return batch.lines


def containers(app: str, states=("starting", "ready", "stopping")) -> list[m.ContainerInfo]:
    listing = session.api().call("GET", "/containers", None, m.ContainerList, params={"app": app})
    return [c for c in listing.containers if c.state in states]


# ---------------------------------------------------------------------- kinds of endpoint


def test_fastapi_get_and_post(web):
    url = web_basic.hello.get_web_url()
    assert url.endswith("/web-basic/hello")
    r = httpx.get(url, params={"name": "strato"}, timeout=TIMEOUT, follow_redirects=True)
    assert r.status_code == 200
    assert r.json() == {"hello": "strato"}
    assert r.headers["x-strato-request-id"].startswith("wr-")
    r = httpx.post(
        web_basic.echo.get_web_url(),
        json={"a": 1, "b": [2]},
        timeout=TIMEOUT,
        follow_redirects=True,
    )
    assert r.status_code == 200
    assert r.json() == {"got": {"a": 1, "b": [2]}, "n": 2}
    assert web_basic.echo.get_web_url().endswith("/web-basic/echo-json")  # label=
    # FastAPI validates as usual: a GET to a POST route is the app's 405
    assert httpx.get(web_basic.echo.get_web_url(), timeout=TIMEOUT).status_code == 405


def test_fastapi_docs(web):
    url = web_basic.documented.get_web_url()
    assert httpx.get(url, params={"x": 5}, timeout=TIMEOUT, follow_redirects=True).json() == {
        "x": 5
    }
    page = httpx.get(url + "/docs", timeout=TIMEOUT)
    assert page.status_code == 200
    assert "/web-basic/documented/openapi.json" in page.text  # behind the path prefix
    spec = httpx.get(url + "/openapi.json", timeout=TIMEOUT)
    assert spec.status_code == 200 and "/" in spec.json()["paths"]
    # without docs=True there are none
    assert httpx.get(web_basic.hello.get_web_url() + "/docs", timeout=TIMEOUT).status_code == 404


def test_asgi_app_paths_query_and_client(web):
    url = web_basic.raw.get_web_url()
    r = httpx.get(url + "/some/path", params={"q": "1"}, timeout=TIMEOUT, follow_redirects=True)
    assert r.status_code == 200
    assert r.text == "raw /some/path q=1 client=('127.0.0.1', 0)"


def test_host_based_url(web):
    url = web_basic.raw.get_web_url()
    port = httpx.URL(url).port
    r = httpx.get(
        f"http://127.0.0.1:{port}/x",
        headers={"host": f"web-basic-raw.localhost:{port}"},
        timeout=TIMEOUT,
        follow_redirects=True,
    )
    assert r.status_code == 200
    assert r.text.startswith("raw /x ")  # no prefix, no root_path


@pytest.fixture(scope="module")
def paths(web):
    web_paths.app.deploy()
    return web_paths


def test_path_based_url_sets_root_path(paths):
    base = paths.api.get_web_url()
    assert base.endswith("/web-paths/api")
    r = httpx.get(base + "/where", params={"q": "1"}, timeout=TIMEOUT, follow_redirects=True)
    assert r.status_code == 200
    got = r.json()
    assert got["root_path"] == "/web-paths/api"
    assert got["url"] == base + "/where?q=1"
    assert got["base_url"] == base + "/"
    assert got["link"] == base + "/items/3"
    # a redirect the app builds leads back through the gateway
    r = httpx.get(base + "/go", timeout=TIMEOUT)
    assert r.status_code == 307
    assert r.headers["location"] == base + "/items/7"
    r = httpx.get(r.headers["location"], timeout=TIMEOUT)
    assert r.json() == {"n": 7}
    # by host name there is no prefix
    port = httpx.URL(base).port
    r = httpx.get(
        f"http://127.0.0.1:{port}/where",
        headers={"host": f"web-paths-api.localhost:{port}"},
        timeout=TIMEOUT,
    )
    assert r.json()["root_path"] == ""
    assert r.json()["link"] == f"http://web-paths-api.localhost:{port}/items/3"


def test_response_failing_after_its_head_is_cut_short(paths):
    url = paths.api.get_web_url() + "/stream-fail"
    got = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("GET", url, timeout=TIMEOUT) as r:
            assert r.status_code == 200
            rid = r.headers["x-strato-request-id"]
            for part in r.iter_raw():
                got += part
    assert got == b"first part\n"  # what came before the failure, then no clean end

    def logged():
        lines = [line for line in app_logs("web-paths") if rid in line.text]
        failed = [line for line in lines if line.stream == "stderr" and "failed" in line.text]
        broke = [line for line in app_logs("web-paths") if "the stream broke" in line.text]
        access = [line for line in lines if line.stream == "access"]
        return (failed, access) if failed and broke and access else None

    failed, access = wait_until(logged, 15, "the failure in the app's logs")
    assert "GET /web-paths/api/stream-fail" in failed[0].text
    assert " 200 " in access[0].text and "cut short" in access[0].text


def test_endpoint_that_cannot_be_placed_is_a_503_at_once(paths):
    url = paths.on_gpu.get_web_url()
    t0 = time.monotonic()
    r = httpx.get(url, timeout=TIMEOUT)
    assert r.status_code == 503
    assert time.monotonic() - t0 < WAIT_S / 2  # not the wait for a container
    message = r.json()["message"]
    assert "no node of this cluster can run" in message and "H100" in message
    rid = r.headers["x-strato-request-id"]
    wait_until(
        lambda: any(
            rid in line.text and " 503 " in line.text and "H100" in line.text
            for line in app_logs("web-paths")
        ),
        15,
        "the reason in the app's logs",
    )


def test_wsgi_app(web):
    r = httpx.post(
        web_basic.wsgi.get_web_url() + "/a/b",
        params={"k": "v"},
        content=b"12345",
        timeout=TIMEOUT,
        follow_redirects=True,
    )
    assert r.status_code == 200
    assert r.text == "wsgi POST /web-basic/wsgi|/a/b k=v body=5"


def test_web_server_port(web):
    r = httpx.get(
        web_basic.server.get_web_url() + "/hello.txt", timeout=TIMEOUT, follow_redirects=True
    )
    assert r.status_code == 200
    assert r.text == "served by a plain http.server\n"


def test_unknown_url_is_404_with_request_id(web):
    url = web_basic.hello.get_web_url().rsplit("/", 2)[0] + "/no-such-app/x"
    r = httpx.get(url, timeout=TIMEOUT)
    assert r.status_code == 404
    assert r.json()["request_id"] == r.headers["x-strato-request-id"]


# ---------------------------------------------------------------------- streaming


@pytest.mark.parametrize("path", ["/chunks", "/sse"])
def test_streamed_responses_arrive_as_they_are_produced(web, path):
    url = web_basic.raw.get_web_url() + path
    httpx.get(web_basic.raw.get_web_url() + "/warm", timeout=TIMEOUT, follow_redirects=True)
    arrivals = []
    t0 = time.monotonic()
    with httpx.stream("GET", url, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        if path == "/sse":
            assert r.headers["content-type"] == "text/event-stream"
        for line in r.iter_lines():
            if line:
                arrivals.append((time.monotonic() - t0, line))
    want = [f"data: {i}" for i in range(5)] if path == "/sse" else [f"chunk {i}" for i in range(5)]
    assert [line for _, line in arrivals] == want
    # the app sleeps 0.3 s between items: the first must not wait for the last
    assert arrivals[-1][0] - arrivals[0][0] > 0.9


def test_request_body_streams_through(web):
    def body():
        for _ in range(5):
            yield b"x" * 1000
            time.sleep(0.05)

    r = httpx.post(
        web_basic.raw.get_web_url() + "/echo",
        content=body(),
        timeout=TIMEOUT,
        follow_redirects=True,
    )
    assert r.status_code == 200
    assert r.content == b"x" * 5000


def test_websocket_echo(web):
    from websockets.sync.client import connect

    url = web_basic.raw.get_web_url().replace("http://", "ws://") + "/ws"
    with connect(url, open_timeout=30, close_timeout=5) as ws:
        for i in range(3):
            ws.send(f"hello {i}")
            assert ws.recv(timeout=10) == f"echo:hello {i}"
        ws.send(b"\x00\x01")
        assert ws.recv(timeout=10) == b"\x00\x01"


# ---------------------------------------------------------------------- limits, auth, logs


def test_body_over_the_limit_is_413(web):
    url = web_basic.raw.get_web_url() + "/echo"
    r = httpx.post(url, content=b"y" * (MAX_BODY + 1), timeout=TIMEOUT)
    assert r.status_code == 413
    assert str(MAX_BODY) in r.json()["message"]
    assert r.json()["request_id"] == r.headers["x-strato-request-id"]

    def chunked():  # no content-length: the gateway counts as it streams
        for _ in range(4):
            yield b"z" * (MAX_BODY // 2)

    r = httpx.post(
        web_basic.slow.get_web_url(), params={"seconds": 2}, content=chunked(), timeout=TIMEOUT
    )
    assert r.status_code == 413
    # under the limit is fine
    r = httpx.post(url, content=b"y" * (MAX_BODY - 10), timeout=TIMEOUT, follow_redirects=True)
    assert r.status_code == 200 and len(r.content) == MAX_BODY - 10


def test_requires_auth_needs_the_web_token(web):
    url = web_basic.secret.get_web_url()
    r = httpx.get(url, timeout=TIMEOUT)
    assert r.status_code == 401
    assert "Strato-Token" in r.json()["message"]
    r = httpx.get(url, headers={"Strato-Token": "wrong"}, timeout=TIMEOUT)
    assert r.status_code == 401
    token = (web.home / "web_token").read_text().strip()
    r = httpx.get(url, headers={"Strato-Token": token}, timeout=TIMEOUT, follow_redirects=True)
    assert r.status_code == 200
    assert r.json() == {"secret": 42}


def test_long_request_gets_303_to_its_result(web):
    url = web_basic.slow.get_web_url()
    t0 = time.monotonic()
    r = httpx.get(url, params={"seconds": HTTP_LIMIT_S + 2}, timeout=TIMEOUT)
    took = time.monotonic() - t0
    assert r.status_code == 303
    assert HTTP_LIMIT_S - 0.5 < took < HTTP_LIMIT_S + 2
    location = r.headers["location"]
    result_id = location.removeprefix("/__strato/results/")
    assert location.startswith("/__strato/results/") and len(result_id) >= 22  # 128 bits
    assert r.headers["x-strato-request-id"] not in location  # not the (visible) request id
    result = httpx.get(httpx.URL(url).join(location), timeout=TIMEOUT)
    assert result.status_code == 200
    assert result.json() == {"slept": HTTP_LIMIT_S + 2}
    # a client that follows redirects just gets the result
    r = httpx.get(url, params={"seconds": HTTP_LIMIT_S + 1}, timeout=TIMEOUT, follow_redirects=True)
    assert r.status_code == 200
    assert r.json() == {"slept": HTTP_LIMIT_S + 1}


def test_access_log_and_error_request_id(web):
    r = httpx.get(web_basic.boom.get_web_url(), timeout=TIMEOUT, follow_redirects=True)
    assert r.status_code == 500
    rid = r.headers["x-strato-request-id"]

    def logged():
        lines = [line for line in app_logs("web-basic") if rid in line.text]
        access = [line for line in lines if line.stream == "access" and " 500 " in line.text]
        failed = [line for line in lines if "failed" in line.text and line.stream == "stderr"]
        return (access, failed) if access and failed else None

    access, failed = wait_until(logged, 15, "the access line and the error's log line")
    assert "GET /web-basic/boom 500" in access[0].text
    assert failed[0].container_id == access[0].container_id
    # every request gets an access line
    r = httpx.get(web_basic.hello.get_web_url(), timeout=TIMEOUT)
    rid = r.headers["x-strato-request-id"]
    wait_until(
        lambda: any(rid in line.text and " 200 " in line.text for line in app_logs("web-basic")),
        15,
        "the access line of a successful request",
    )


# ---------------------------------------------------------------------- scaling


def test_scale_from_zero_and_back(web):
    web_scale.app.deploy()
    url = web_scale.work.get_web_url()
    assert containers("web-scale") == []
    r = httpx.get(url, timeout=TIMEOUT, follow_redirects=True)
    assert r.status_code == 200
    first = r.json()["container"]
    assert [c.container_id for c in containers("web-scale")] == [first]
    # idle past its scale-down window: back to zero, and from zero again
    wait_until(lambda: not containers("web-scale"), 30, "the endpoint to scale to zero")
    r = httpx.get(url, timeout=TIMEOUT, follow_redirects=True)
    assert r.status_code == 200
    assert r.json()["container"] != first


def test_containers_follow_requests_in_flight(web):
    if web_scale.app.app_id is None:
        web_scale.app.deploy()
    url = web_scale.work.get_web_url()
    wait_until(lambda: not containers("web-scale"), 30, "the endpoint to be at zero")

    def get(_):  # (slow cold starts, as gVisor's, may pass the HTTP limit: follow the 303)
        return httpx.get(url, params={"seconds": 2}, timeout=TIMEOUT, follow_redirects=True)

    def burst() -> set[str]:
        with ThreadPoolExecutor(4) as pool:
            rs = list(pool.map(get, range(4)))
        assert all(r.status_code == 200 for r in rs)
        return {r.json()["container"] for r in rs}

    first = burst()
    assert len(first) == 4  # one request per container (max_inputs=1): four containers
    assert len(containers("web-scale")) == 4  # max_containers=4
    second = burst()  # within the scale-down window: the same containers, none new
    assert second == first


def test_start_failure_is_a_clear_503(web):
    web_fail.app.deploy()
    url = web_fail.app.registered_functions["Broken.web"].get_web_url()
    t0 = time.monotonic()
    r = httpx.get(url, timeout=TIMEOUT)
    assert r.status_code == 503
    assert time.monotonic() - t0 < WAIT_S / 2
    assert "fail to start" in r.json()["message"]
    assert r.json()["request_id"] == r.headers["x-strato-request-id"]


@pytest.mark.slow
def test_waiting_too_long_for_a_container_is_a_503(web):
    web_fail.app.deploy()
    url = web_fail.app.registered_functions["Sleepy.web"].get_web_url()
    t0 = time.monotonic()
    # (it waits past the HTTP limit too: the 303's result is then the 503)
    r = httpx.get(url, timeout=TIMEOUT, follow_redirects=True)
    took = time.monotonic() - t0
    assert r.status_code == 503
    assert WAIT_S - 1 < took < WAIT_S + HTTP_LIMIT_S + 2
    assert "STRATO_WEB_WAIT_TIMEOUT" in r.json()["message"]


@pytest.mark.slow
def test_redeploy_under_load_drops_nothing(web):
    web_redeploy_v1.app.deploy()
    url = web_redeploy_v1.version.get_web_url()
    old_app = web_redeploy_v1.app.app_id
    assert httpx.get(url, timeout=TIMEOUT).json() == "v1"
    stop = threading.Event()
    seen: list[tuple[float, str]] = []
    failures: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=TIMEOUT) as c:
            while not stop.is_set():
                try:
                    r = c.get(url)
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                else:
                    seen.append((time.monotonic(), r.json()))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        web_redeploy_v2.app.deploy()
        assert web_redeploy_v2.version.get_web_url() == url  # stable across deploys
        wait_until(lambda: any(v == "v2" for _, v in seen[-20:]), 30, "version 2 to serve")
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    versions = [v for _, v in seen]
    assert "v1" in versions and "v2" in versions
    switched = versions.index("v2")
    assert versions[switched + 50 :].count("v1") == 0  # once switched, it stays switched
    # the replaced version's containers drain and stop
    wait_until(lambda: not containers(old_app, ("ready",)), 30, "the old containers to stop")


SERVED = """
import strato

app = strato.App("served-app")


@app.function()
@strato.fastapi_endpoint(label="hi")
def hi() -> str:
    return "{version}"
"""


@pytest.mark.slow
def test_serve_reloads_on_change(web, tmp_path):
    app_file = tmp_path / "served_app.py"
    app_file.write_text(SERVED.format(version="one"))
    gateway = json.loads((web.home / "server.json").read_text())["gateway_url"]
    url = f"{gateway}/served-app-dev/hi"  # an ephemeral app's routes: <name>-dev
    env = {**os.environ, "STRATO_HOME": str(web.home), "STRATO_SERVER_URL": web.url}
    cmd = [sys.executable, "-m", "strato.cli.main", "serve", str(app_file), "--timeout", "180"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def answer() -> str | None:
        try:
            r = httpx.get(url, timeout=TIMEOUT)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    failures: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=TIMEOUT) as c:
            while not stop.is_set():
                r = c.get(url)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    try:
        wait_until(lambda: answer() == "one", 90, "strato serve to serve the app")
        poller.start()
        time.sleep(0.5)
        app_file.write_text(SERVED.format(version="two"))
        wait_until(lambda: answer() == "two", 90, "the reloaded app to serve")
        time.sleep(0.5)
    finally:
        stop.set()
        if poller.is_alive():
            poller.join(30)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert failures == [], out
    assert "files changed: reloading" in out
    # both versions' apps are stopped with the command
    wait_until(lambda: answer() is None, 30, "the served app to stop")


def test_cli_deploy_prints_each_endpoint_url(web, tmp_path):
    app_file = tmp_path / "cli_web_app.py"
    app_file.write_text(SERVED.format(version="deployed").replace("served-app", "cli-web"))
    env = {**os.environ, "STRATO_HOME": str(web.home), "STRATO_SERVER_URL": web.url}
    out = subprocess.run(
        [sys.executable, "-m", "strato.cli.main", "deploy", str(app_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    gateway = json.loads((web.home / "server.json").read_text())["gateway_url"]
    url = f"{gateway}/cli-web/hi"
    assert f"hi: {url}" in out.stdout
    r = httpx.get(url, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json() == "deployed"
