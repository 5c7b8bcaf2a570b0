"""Errors a user can meet, each raised in the caller as its own clear exception."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from apps import basic, failures
from conftest import free_port, wait_until

import strato
from strato import exceptions as exc
from strato.client import session
from strato.client.http import ApiClient
from strato.protocol import messages as m


@pytest.fixture(scope="module")
def running_failures(strato_server):
    strato_server.activate()
    with failures.app.run(quiet=True):
        yield failures.app


def _remote_notes(e: BaseException) -> str:
    return "\n".join(getattr(e, "__notes__", []))


def attempts(path) -> list[float]:
    try:
        return [float(x) for x in path.read_text().split()]
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------- exceptions


def test_exception_keeps_its_type_and_remote_traceback(running_failures):
    with pytest.raises(ValueError, match="bad value 3") as info:
        failures.raise_value_error.remote(3)
    notes = _remote_notes(info.value)
    assert "Remote traceback" in notes
    assert "in raise_value_error" in notes
    assert 'raise ValueError(f"bad value {x}")' in notes


def test_custom_exception_of_the_app_module(running_failures):
    with pytest.raises(failures.CustomError) as info:
        failures.raise_custom.remote(17)
    assert type(info.value) is failures.CustomError
    assert info.value.code == 17
    assert "in raise_custom" in _remote_notes(info.value)


def test_exception_type_missing_here_is_a_remote_error(running_failures):
    with pytest.raises(exc.RemoteError) as info:
        failures.raise_container_only.remote()
    assert info.value.type_name == "container_only_mod.OnlyInContainerError"
    assert "you cannot import me" in str(info.value)
    assert "in raise_container_only" in _remote_notes(info.value)


def test_spawned_call_raises_on_get(running_failures):
    call = failures.raise_custom.spawn(5)
    with pytest.raises(failures.CustomError):
        call.get(timeout=60)


# ---------------------------------------------------------------------- serialization


def test_unpicklable_argument(running_failures):
    lock = threading.Lock()
    with pytest.raises(exc.SerializationError) as info:
        failures.identity.remote(lock)
    msg = str(info.value)
    assert "argument 0" in msg and "identity" in msg and "lock" in msg


def test_unpicklable_keyword_argument(running_failures):
    with pytest.raises(exc.SerializationError, match="keyword argument 'x'"):
        failures.identity.remote(x=(i for i in range(3)))


def test_unpicklable_argument_in_a_map(running_failures):
    with pytest.raises(exc.SerializationError, match="lock"):
        list(failures.identity.map([1, threading.Lock()]))


def test_unpicklable_result(running_failures):
    with pytest.raises(exc.SerializationError) as info:
        failures.return_lock.remote()
    msg = str(info.value)
    assert "return_lock" in msg and "lock" in msg


# ---------------------------------------------------------------------- containers dying


def test_sigkill_without_retries_says_how_the_container_died(running_failures):
    with pytest.raises(exc.ContainerDiedError) as info:
        failures.sigkill_self.remote()
    assert not isinstance(info.value, exc.OutOfMemoryError)
    assert "SIGKILL" in str(info.value)


def test_sigkill_is_retried(running_failures, tmp_path):
    path = tmp_path / "attempts"
    assert failures.sigkill_first_attempt.remote(str(path)) == 2
    assert len(attempts(path)) == 2


def test_segfault(running_failures):
    with pytest.raises(exc.ContainerDiedError) as info:
        failures.segfault.remote()
    assert "SIGSEGV" in str(info.value)


def test_out_of_memory(running_failures):
    with pytest.raises(exc.OutOfMemoryError) as info:
        failures.allocate.remote(500)
    assert "memory" in str(info.value)
    assert "200 MiB" in str(info.value)


def test_within_memory_limit_works(running_failures):
    assert failures.allocate.remote(20) == 20


def test_timeout(running_failures):
    with pytest.raises(exc.FunctionTimeoutError) as info:
        failures.too_slow.remote(30)
    assert "timeout of 2s" in str(info.value)


def test_within_timeout_works(running_failures):
    assert failures.too_slow.remote(0.1) == "finished"


# ---------------------------------------------------------------------- retries


def test_retries_with_backoff_count_attempts(running_failures, tmp_path):
    path = tmp_path / "attempts"
    with pytest.raises(RuntimeError, match="attempt 3 failed"):
        failures.always_fails.remote(str(path))
    times = attempts(path)
    assert len(times) == 3  # the first attempt and max_retries=2 retries
    # Retries(initial_delay=0.5, backoff_coefficient=2): waits of 0.5 s, then 1 s
    assert times[1] - times[0] >= 0.45
    assert times[2] - times[1] >= 0.95


def test_retry_succeeds(running_failures, tmp_path):
    path = tmp_path / "attempts"
    assert failures.fails_twice.remote(str(path)) == 3
    assert len(attempts(path)) == 3


# ---------------------------------------------------------------------- cancellation


def test_cancel_a_spawned_call(running_failures, tmp_path):
    path = tmp_path / "progress"
    call = failures.sleep_long.spawn(60, str(path))
    wait_until(lambda: path.exists(), 60, "the spawned input to start")
    call.cancel()
    with pytest.raises(exc.InputCancellation):
        call.get(timeout=30)
    with pytest.raises(exc.InputCancellation):
        strato.FunctionCall.from_id(call.object_id).get(timeout=5)
    time.sleep(0.5)
    assert path.read_text().split() == ["started"]  # it was interrupted, not finished
    # the function still works afterwards
    assert failures.sleep_long.remote(0, str(tmp_path / "again")) == "finished"


def test_cancel_a_queued_call(running_failures, tmp_path):
    call = failures.sleep_long.spawn(60, str(tmp_path / "queued"))
    call.cancel()
    with pytest.raises(exc.InputCancellation):
        call.get(timeout=30)


def test_cancel_with_terminate_containers(running_failures, tmp_path):
    path = tmp_path / "progress"
    call = failures.sleep_long.spawn(60, str(path))
    wait_until(lambda: path.exists(), 60, "the spawned input to start")
    call.cancel(terminate_containers=True)
    with pytest.raises(exc.InputCancellation):
        call.get(timeout=30)
    assert failures.sleep_long.remote(0, str(tmp_path / "again")) == "finished"


# ---------------------------------------------------------------------- stopped apps


def test_calling_a_function_of_a_stopped_app(strato_server):
    strato_server.activate()
    with basic.app.run(quiet=True):
        assert basic.square.remote(3) == 9
        call = basic.sleep_then.spawn(60, "never")
    with pytest.raises(exc.AppStoppedError, match="stopped"):
        basic.square.remote(3)
    with pytest.raises(exc.AppStoppedError):
        basic.square.spawn(3)
    with pytest.raises(exc.AppStoppedError):
        list(basic.square.map([1, 2]))
    # an input still running when the app stopped ends with the same error
    with pytest.raises(exc.AppStoppedError):
        call.get(timeout=30)


# ---------------------------------------------------------------------- the API itself


def test_unreachable_server_fails_fast():
    client = ApiClient(f"http://127.0.0.1:{free_port()}", "token", reconnect_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(exc.ConnectionError, match="cannot reach"):
        client.call("GET", "/apps", None, m.AppList)
    assert time.monotonic() - t0 < 10  # gave up; did not hang


def test_request_without_token_is_refused(server):
    req = urllib.request.Request(f"{server.url}/apps")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 401
    bad = ApiClient(server.url, "not-the-token")
    with pytest.raises(exc.AuthError):
        bad.call("GET", "/apps", None, m.AppList)
    bad.close()
    # with the token it works
    assert isinstance(session.api().call("GET", "/apps", None, m.AppList), m.AppList)


def test_openapi_lists_the_routes(server):
    with urllib.request.urlopen(f"{server.url}/openapi.json", timeout=10) as resp:
        schema = json.loads(resp.read())
    paths = schema["paths"]
    for path in (
        "/health",
        "/apps",
        "/apps/{ref}/stop",
        "/calls",
        "/calls/{call_id}/inputs",
        "/calls/{call_id}/outputs",
        "/calls/{call_id}/cancel",
        "/blobs/{key}",
    ):
        assert path in paths, path
    assert "post" in paths["/calls"]
    assert "CreateCall" in schema["components"]["schemas"]


def test_bad_request_body_is_an_invalid_error(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    token = (server.home / "token").read_text().strip()
    conn.request(
        "POST",
        "/calls",
        body=b"\x93not msgpack",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/msgpack"},
    )
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 400


# ---------------------------------------------------------------------- blame


@pytest.mark.parametrize(
    "how, error", [("segfault", exc.ContainerDiedError), ("sleep", exc.FunctionTimeoutError)]
)
def test_only_the_guilty_input_of_a_fast_map_fails(running_failures, how, error):
    """A fast function's container holds many inputs at once: when one input crashes it (or
    runs past the timeout), that input fails, and the others it held still succeed."""
    n, bad = 400, 200
    assert list(failures.poison.map(range(50), [-1] * 50, ["none"] * 50)) == list(range(50))
    out = list(failures.poison.map(range(n), [bad] * n, [how] * n, return_exceptions=True))
    failed = {i: o for i, o in enumerate(out) if isinstance(o, BaseException)}
    assert list(failed) == [bad], {i: repr(e)[:120] for i, e in failed.items()}
    assert type(failed[bad]) is error
    assert [o for i, o in enumerate(out) if i != bad] == [i for i in range(n) if i != bad]


# ---------------------------------------------------------------------- containers failing to start


def test_module_failing_to_import_in_the_container(strato_server):
    from apps import broken_import

    strato_server.activate()
    with broken_import.app.run(quiet=True):
        with pytest.raises(RuntimeError, match="refuses to import in a container") as info:
            broken_import.unreachable.remote(1)
        assert "Remote traceback" in _remote_notes(info.value)
        # a map fails the same way, without hanging
        out = list(broken_import.unreachable.map(range(3), return_exceptions=True))
        assert [type(o) for o in out] == [RuntimeError] * 3
