"""Hostile specs: the control plane checks every number of a function spec (finite, in
range) and the fields that must agree, whatever the client; the SDK refuses the same
values before they leave the process. Also: node reservations never go negative and
return to zero, per-app quotas keep one app from taking the machine, and the smaller API
defects (``?after=`` past 2^63, a duplicated input index, undecodable bind
overrides, a call id reused with another function) answer 4xx instead of 500 or a wrong
result."""

from __future__ import annotations

import copy
import math
import secrets

import edge_apps
import httpx
import msgspec
import pytest
from conftest import dedicated_server, wait_until

import strato
from strato import exceptions as exc
from strato.client import session
from strato.protocol import messages as m

NAN, INF = math.nan, math.inf
BASE = msgspec.to_builtins(m.FunctionSpec(name="f", module="edge_apps", qualname="echo"))


def spec_with(path: str, value: object) -> dict:
    spec = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = spec
    for p in parents:
        if node.get(p) is None:
            node[p] = {"kind": "server", "label": "x", "port": 8000} if p == "web" else {}
        node = node[p]
    node[last] = value
    return spec


BAD_SPECS = [
    ("resources.cpu", -1.0),
    ("resources.cpu", 0.0),
    ("resources.cpu", NAN),
    ("resources.cpu", INF),
    ("resources.cpu", 1e12),
    ("resources.cpu_limit", 0.01),  # below the request
    ("resources.memory_mb", -(2**40)),  # the issue's: left 2^40 MiB reserved on the node
    ("resources.memory_mb", 0),
    ("resources.memory_mb", 2**40),
    ("resources.memory_limit_mb", 1),  # below the request
    ("resources.gpu", ["H100:0"]),
    ("resources.gpu", ["H100:-1"]),
    ("resources.gpu", ["NO-SUCH-GPU"]),
    ("resources.gpu", ["T4:1000"]),
    ("timeout", 0.0),
    ("timeout", -1.0),
    ("timeout", NAN),
    ("timeout", INF),
    ("retries.max_retries", -1),
    ("retries.max_retries", 10**6),
    ("retries.backoff_coefficient", NAN),
    ("retries.initial_delay", -1.0),
    ("max_inputs", 0),
    ("max_inputs", -1),
    ("max_inputs", 10**9),
    ("target_inputs", 5),  # over max_inputs (1)
    ("batch_max_size", -1),
    ("batch_wait_ms", -1),
    ("scaling.min_containers", -1),
    ("scaling.min_containers", 2**63),
    ("scaling.min_containers", 10**6),
    ("scaling.max_containers", 0),
    ("scaling.buffer_containers", -1),
    ("scaling.scaledown_window", NAN),
    ("scaling.scaledown_window", 0.0),
    ("runtime", "docker"),
    ("env", {"STRATO_TOKEN": "x"}),
    ("web.port", 70000),
    ("web.startup_timeout", NAN),
]


def _id(case) -> str:
    return f"{case[0]}={case[1]!r}"[:60]


@pytest.fixture(scope="module")
def api(strato_server):
    strato_server.activate()
    client = session.api()
    with httpx.Client(
        base_url=client.url,
        headers={"Authorization": f"Bearer {client.token}", "Content-Type": "application/msgpack"},
        timeout=30,
    ) as http:
        yield http


def post_app(api, spec: dict, name: str | None = None) -> httpx.Response:
    body = {"name": name, "functions": [spec], "deployed": False, "detached": True}
    return api.post("/apps", content=msgspec.msgpack.encode(body))


def stop(api, resp: httpx.Response) -> None:
    if resp.status_code == 200:
        info = msgspec.msgpack.decode(resp.content, type=m.AppInfo)
        api.post(f"/apps/{info.app_id}/stop")


def test_a_good_spec_is_accepted(api):
    resp = post_app(api, copy.deepcopy(BASE))
    assert resp.status_code == 200, resp.content
    stop(api, resp)


@pytest.mark.parametrize("case", BAD_SPECS, ids=_id)
def test_bad_spec_is_refused_over_http(api, case):
    path, value = case
    resp = post_app(api, spec_with(path, value))
    stop(api, resp)
    assert resp.status_code == 400, f"{path}={value!r}: HTTP {resp.status_code} {resp.content!r}"
    err = msgspec.msgpack.decode(resp.content, type=m.ErrorBody)
    assert err.error == "InvalidError"
    field = path.split(".")[-1].replace("_mb", "")
    assert field.split("_")[0] in err.message.replace(" ", "_") or "Invalid gpu" in err.message, (
        f"the message does not name the field {path}: {err.message}"
    )


@pytest.mark.parametrize("case", BAD_SPECS[:12], ids=_id)
def test_bad_spec_is_refused_through_the_sdk_client(api, case):
    """The SDK's own client, bypassing its option checks: the server still refuses."""
    path, value = case
    raw = msgspec.msgpack.encode(
        {"name": None, "functions": [spec_with(path, value)], "detached": True}
    )
    with pytest.raises(exc.InvalidError):
        session.api().request_raw("POST", "/apps", raw)


@pytest.mark.parametrize(
    "options",
    [
        {"cpu": -1},
        {"cpu": NAN},
        {"memory": -(2**40)},
        {"memory": 0},
        {"gpu": "H100:0"},
        {"timeout": 0},
        {"timeout": NAN},
        {"retries": -1},
        {"min_containers": -1},
        {"min_containers": 10**6},
        {"max_containers": 0},
        {"scaledown_window": NAN},
    ],
    ids=lambda o: ",".join(f"{k}={v!r}" for k, v in o.items()),
)
def test_bad_options_are_refused_by_the_sdk(options):
    app = strato.App("strato-test-edge-options")
    with pytest.raises(exc.InvalidError):

        @app.function(**options)
        def f():
            return 1


def test_bad_with_options_are_refused(api):
    with pytest.raises(exc.InvalidError):
        edge_apps.echo.with_options(memory=-(2**40))
    with pytest.raises(exc.InvalidError):
        edge_apps.echo.with_options(min_containers=10**6)


# ---------------------------------------------------------------- updates and variants


def _app_with_echo(api) -> tuple[str, str]:
    resp = post_app(api, copy.deepcopy(BASE))
    assert resp.status_code == 200
    info = msgspec.msgpack.decode(resp.content, type=m.AppInfo)
    return info.app_id, info.functions[0].function_id


@pytest.mark.parametrize(
    "body",
    [
        {"min_containers": -1},
        {"min_containers": 2**63},
        {"max_containers": 0},
        {"scaledown_window": NAN},
        {"scaledown_window": INF},
        {"min_containers": 5, "max_containers": 2},
    ],
    ids=str,
)
def test_bad_autoscaler_update_is_refused(api, body):
    app_id, fid = _app_with_echo(api)
    try:
        resp = api.post(f"/functions/{fid}/autoscaler", content=msgspec.msgpack.encode(body))
        assert resp.status_code == 400, resp.content
    finally:
        api.post(f"/apps/{app_id}/stop")


@pytest.mark.parametrize(
    "overrides",
    [
        b"\xc1\xc1 not msgpack",  # the 500
        msgspec.msgpack.encode([1, 2]),
        msgspec.msgpack.encode({"mount_id": "someone-elses"}),  # code of another app
        msgspec.msgpack.encode({"serialized": b"x"}),
        msgspec.msgpack.encode({"resources": {"memory_mb": -(2**40)}}),
        msgspec.msgpack.encode({"timeout": NAN}),
        msgspec.msgpack.encode({1: 2}),
    ],
    ids=["undecodable", "list", "mount_id", "serialized", "memory", "nan-timeout", "int-key"],
)
def test_bad_bind_overrides_are_refused(api, overrides):
    app_id, fid = _app_with_echo(api)
    try:
        body = msgspec.msgpack.encode({"overrides": overrides})
        resp = api.post(f"/functions/{fid}/bind", content=body)
        assert resp.status_code == 400, resp.content
    finally:
        api.post(f"/apps/{app_id}/stop")


# ---------------------------------------------------------------- smaller defects


def test_after_past_two_to_the_63_is_a_400(api):
    app_id, fid = _app_with_echo(api)
    try:
        call_id = "fc-" + secrets.token_hex(8)
        body = {"call_id": call_id, "function_id": fid, "inputs": [], "closed": False}
        assert api.post("/calls", content=msgspec.msgpack.encode(body)).status_code == 200
        for after in (2**63, 2**64 + 5, -1, "nan", "1e400"):
            resp = api.get(f"/calls/{call_id}/outputs", params={"after": after})
            assert resp.status_code == 400, (after, resp.content)
        resp = api.get(f"/apps/{app_id}/logs", params={"after": 2**63})
        assert resp.status_code == 400
        resp = api.get(f"/calls/{call_id}/outputs", params={"timeout": "nan"})
        assert resp.status_code == 400
    finally:
        api.post(f"/apps/{app_id}/stop")


def test_duplicated_input_index_is_a_400(api):
    app_id, fid = _app_with_echo(api)
    try:
        call_id = "fc-" + secrets.token_hex(8)
        args = msgspec.msgpack.encode(None)
        body = {
            "call_id": call_id,
            "function_id": fid,
            "inputs": [[0, args, None], [0, args, None]],
        }
        resp = api.post("/calls", content=msgspec.msgpack.encode(body))
        assert resp.status_code == 400, resp.content
        assert b"appears twice" in resp.content
        # and in a later batch of inputs for an existing call
        body["inputs"] = [[0, args, None]]
        body["closed"] = False
        assert api.post("/calls", content=msgspec.msgpack.encode(body)).status_code == 200
        more = {"inputs": [[1, args, None], [1, args, None]]}
        resp = api.post(f"/calls/{call_id}/inputs", content=msgspec.msgpack.encode(more))
        assert resp.status_code == 400, resp.content
    finally:
        api.post(f"/apps/{app_id}/stop")


def test_reusing_a_call_id_with_another_function_is_refused(strato_server):
    strato_server.activate()
    with edge_apps.victim.run(quiet=True):
        call = edge_apps.echo.spawn("first")
        assert call.get(timeout=60) == "first"
        body = m.CreateCall(
            call.object_id,
            edge_apps.whoami.object_id,
            [m.InputItem(0, msgspec.msgpack.encode(None))],
            wait=1.0,
        )
        with pytest.raises(exc.AlreadyExistsError, match="another function"):
            session.api().call("POST", "/calls", body, m.Outputs)
        # the same function and id is a retry: idempotent, the first result
        again = m.CreateCall(call.object_id, edge_apps.echo.object_id, [], wait=0.0)
        session.api().call("POST", "/calls", again, m.Outputs)
        assert call.get(timeout=10) == "first"


# ---------------------------------------------------------------- reservations and quotas


def _node() -> m.NodeStatus:
    nodes = session.api().call("GET", "/nodes", None, m.NodeList).nodes
    assert len(nodes) == 1
    return nodes[0]


def test_reservations_never_negative_and_back_to_zero():
    with dedicated_server({"STRATO_NODE_CPU": "2"}):
        client = session.api()
        raw = msgspec.msgpack.encode(
            {"name": None, "functions": [spec_with("resources.memory_mb", -(2**40))]}
        )
        with pytest.raises(exc.InvalidError, match="memory"):
            client.request_raw("POST", "/apps", raw)
        with edge_apps.bystander.run(quiet=True):
            assert list(edge_apps.square.map(range(20))) == [x * x for x in range(20)]
            node = _node()
            assert node.cpu_reserved > 0 and node.memory_reserved_mb > 0
        wait_until(
            lambda: _node().memory_reserved_mb == 0 and _node().cpu_reserved == 0.0,
            30,
            "the node's reservations to return to zero after the app stopped",
        )
        node = _node()
        assert node.cpu_reserved == 0.0 and node.memory_reserved_mb == 0


def test_min_containers_over_the_app_quota_is_refused(api):
    resp = post_app(api, spec_with("scaling.min_containers", 5000))
    stop(api, resp)
    assert resp.status_code == 400
    assert b"STRATO_APP_MAX_CONTAINERS" in resp.content


def test_a_huge_warm_pool_is_capped_and_other_apps_still_run():
    """``min_containers`` far past the machine: the warm pool takes at most its share
    (STRATO_APP_WARM_SHARE=0.5 of 2 CPUs: 8 containers of 0.125 CPU), and another app's
    function still gets containers."""
    hog = strato.App("strato-test-edge-hog")

    @hog.function(min_containers=500, serialized=True)
    def idle() -> None:
        return None

    with dedicated_server({"STRATO_NODE_CPU": "2", "STRATO_RUNTIME": "process"}):
        with hog.run(quiet=True):
            app_id = hog.app_id

            def hog_containers() -> int:
                listing = session.api().call(
                    "GET", "/containers", None, m.ContainerList, params={"app": app_id}
                )
                return len(listing.containers)

            wait_until(lambda: hog_containers() >= 8, 120, "the hog's warm pool of 8")
            with edge_apps.bystander.run(quiet=True):
                assert edge_apps.square.remote(12) == 144
            assert hog_containers() == 8, "the warm pool grew past its share"


def test_a_big_backlog_does_not_starve_another_app():
    """One app's .map fills the node (1 CPU: 8 containers of 0.125); another app's call
    still gets a container while that backlog runs: the big app is over its fair share
    (STRATO_APP_FAIR_SHARE=0.5) and gives back its surplus."""
    import threading

    with dedicated_server(
        {"STRATO_NODE_CPU": "1", "STRATO_RUNTIME": "process", "STRATO_APP_FAIR_SHARE": "0.5"}
    ):
        with edge_apps.hog.run(quiet=True), edge_apps.bystander.run(quiet=True):
            done = threading.Event()
            results: list[int] = []

            def big_map() -> None:
                results.extend(edge_apps.busy.map(range(400)))
                done.set()

            t = threading.Thread(target=big_map, daemon=True)
            t.start()
            hog_id = edge_apps.hog.app_id

            def hog_containers() -> int:
                listing = session.api().call(
                    "GET", "/containers", None, m.ContainerList, params={"app": hog_id}
                )
                return sum(1 for c in listing.containers if c.state == "ready")

            wait_until(lambda: hog_containers() >= 8, 120, "the map to fill the node")
            assert edge_apps.square.remote(9) == 81
            assert not done.is_set(), (
                "the map (400 inputs x 0.3 s on at most 8 containers: >= 15 s) finished "
                "before the other app's call: it waited for the whole backlog (no fair "
                "share), or the machine is too slow for this test to show anything"
            )
            t.join(timeout=300)
            assert results == list(range(400))
