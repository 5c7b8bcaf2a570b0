"""GET /metrics: Prometheus exposition of the control plane, scraped with the official
client's text parser while real work runs (calls, failures, cold starts, web requests)."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
import pytest
from apps import ops_dash
from prometheus_client.parser import text_string_to_metric_families

APP = "strato-test-ops"


def scrape(server, token: str | None = "from-home") -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of one scrape."""
    headers = {}
    if token == "from-home":
        token = (server.home / "token").read_text().strip()
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    r = httpx.get(f"{server.url}/metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )


@pytest.fixture(scope="module")
def ops_app(strato_server):
    strato_server.activate()
    with ops_dash.app.run(quiet=True):
        yield ops_dash.app


def test_metrics_need_the_token(strato_server):
    r = httpx.get(f"{strato_server.url}/metrics", timeout=30)
    assert r.status_code == 401
    assert "token" in r.text
    r = httpx.get(
        f"{strato_server.url}/metrics", headers={"authorization": "Bearer nope"}, timeout=30
    )
    assert r.status_code == 401


def test_values_move_as_work_runs(server, ops_app):
    before = scrape(server)
    fn = {"app": APP, "function": "double"}
    assert [ops_dash.double.remote(i) for i in range(5)] == [0, 2, 4, 6, 8]
    with pytest.raises(ValueError, match="exploded"):
        ops_dash.explode.remote(1)
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("strato_inputs_total", status="success", **fn) == 5
    assert moved("strato_inputs_total", app=APP, function="explode", status="failure") == 1
    assert moved("strato_input_duration_seconds_count", **fn) == 5
    # end-to-end latency: from acceptance to output, never shorter than the run time
    assert moved("strato_input_latency_seconds_count", **fn) == 5
    assert moved("strato_input_latency_seconds_count", app=APP, function="explode") == 1
    assert moved("strato_input_latency_seconds_sum", **fn) >= moved(
        "strato_input_duration_seconds_sum", **fn
    )
    assert value(after, "strato_input_duration_seconds_bucket", le="+Inf", **fn) >= 5
    # the first call of each function started a container: a cold start, with its time
    assert value(after, "strato_cold_starts_total", **fn) >= 1
    assert value(after, "strato_cold_start_seconds_count", **fn) >= 1
    assert value(after, "strato_cold_start_seconds_sum", **fn) > 0
    # state at scrape time: containers ready, nothing queued now, a node with its capacity
    assert value(after, "strato_containers", state="ready") >= 1
    assert value(after, "strato_inputs_queued", **fn) == 0
    assert value(after, "strato_node_up") >= 1
    assert value(after, "strato_node_cpu_cores") > 0
    assert value(after, "strato_node_memory_bytes") > 0
    assert value(after, "strato_node_cpu_reserved_cores") > 0  # the live containers' share
    # the store's operations are timed (reads and committed write batches)
    assert moved("strato_store_operation_seconds_count", operation="write_batch") > 0
    assert value(after, "strato_store_operation_seconds_count", operation="read") > 0


def test_gateway_requests_by_status(server, ops_app):
    before = scrape(server)
    url = ops_dash.hello.get_web_url()
    assert url
    r = httpx.get(url, params={"name": "m"}, timeout=60, follow_redirects=True)
    assert r.json() == {"hello": "m"}
    r = httpx.get(url.rstrip("/") + "/no/such/path", timeout=60)
    assert r.status_code == 404
    base = "{0.scheme}://{0.netloc}".format(urlsplit(url))
    assert httpx.get(f"{base}/no-such-app/x", timeout=60).status_code == 404
    after = scrape(server)
    assert (
        value(after, "strato_gateway_requests_total", app="unrouted", code="404")
        - value(before, "strato_gateway_requests_total", app="unrouted", code="404")
        == 1
    )
    moved = {
        code: value(after, "strato_gateway_requests_total", app=APP, code=code)
        - value(before, "strato_gateway_requests_total", app=APP, code=code)
        for code in ("200", "404")
    }
    assert moved == {"200": 1, "404": 1}
    assert (
        value(after, "strato_gateway_request_duration_seconds_count", app=APP)
        - value(before, "strato_gateway_request_duration_seconds_count", app=APP)
        == 2
    )


def test_queued_and_running_at_scrape_time(server, ops_app, tmp_path):
    marker = tmp_path / "go"
    call = ops_dash.chatter.spawn(str(marker))
    try:
        from conftest import wait_until

        fn = {"app": APP, "function": "chatter"}
        wait_until(
            lambda: value(scrape(server), "strato_inputs_running", **fn) == 1,
            60,
            "chatter to run",
        )
    finally:
        marker.touch()
    assert call.get(timeout=60) == "done"
    assert value(scrape(server), "strato_inputs_running", app=APP, function="chatter") == 0


def test_no_id_is_a_label(server, ops_app):
    ops_dash.double.remote(1)
    for (_, labels), _ in scrape(server).items():
        for k, v in labels:
            assert k not in ("call_id", "input_id", "container_id")
            assert not v.startswith(("fc-", "in-", "ct-")), (k, v)


def test_open_to_loopback_when_set():
    """STRATO_METRICS_OPEN_LOOPBACK=1: a scraper on this host needs no token."""
    from conftest import dedicated_server

    with dedicated_server({"STRATO_METRICS_OPEN_LOOPBACK": "1"}) as other:
        samples = scrape(other, token=None)
        assert value(samples, "strato_node_up") >= 1
        # the rest of the API still needs the token
        assert httpx.get(f"{other.url}/apps", timeout=30).status_code == 401


def test_apps_of_one_name_in_two_workspaces_keep_apart_series(server, ops_app):
    """An app outside the default workspace is labelled ``<workspace>--<name>`` (as its
    URLs are), so it never adds to the series of the default workspace's app of that name."""
    import os
    import secrets

    from apps import ops_other_ws

    from strato.client import session

    ws = f"metrics-{secrets.token_hex(3)}"
    token = (server.home / "token").read_text().strip()
    r = httpx.post(
        f"{server.url}/workspaces",
        json={"name": ws},
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    before = scrape(server)
    saved = os.environ.get("STRATO_WORKSPACE")
    os.environ["STRATO_WORKSPACE"] = ws
    session.reset()
    try:
        with ops_other_ws.app.run(quiet=True):
            assert ops_other_ws.triple.remote(2) == 6
    finally:
        if saved is None:
            os.environ.pop("STRATO_WORKSPACE", None)
        else:
            os.environ["STRATO_WORKSPACE"] = saved
        session.reset()
    after = scrape(server)
    mine = {"app": f"{ws}--{APP}", "function": "triple"}
    assert value(after, "strato_inputs_total", status="success", **mine) == 1
    assert value(after, "strato_inputs_total", app=APP, function="triple") == 0
    assert value(before, "strato_inputs_total", **mine) == 0
