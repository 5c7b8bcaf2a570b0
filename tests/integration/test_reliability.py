"""Reliability: a ``.map`` of 2,000 inputs survives a container killed (SIGKILL) in its
middle, and a restart of the control plane in its middle. Every output arrives exactly
once, with the right value, in input order."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator

import pytest

from apps import reliable

from conftest import container_pid, live_containers, pid_alive, wait_until

pytestmark = pytest.mark.slow

N = 2000
EXPECTED = [reliable.expected(x) for x in range(N)]


@pytest.fixture(scope="module")
def reliable_app(strato_server):
    strato_server.activate()
    with reliable.app.run(quiet=True):
        # warm up: the function's containers exist and its duration is known
        assert list(reliable.work.map(range(6), [0.0] * 6)) == [reliable.expected(x) for x in range(6)]
        yield reliable.app


def _paced(n: int, every: int, pause: float) -> Iterator[int]:
    """0..n-1, pausing now and then, so that inputs are still being sent mid-map."""
    for x in range(n):
        if x and x % every == 0:
            time.sleep(pause)
        yield x


def _kill_containers(app_id: str, killed: list[tuple[str, int]], count: int | None) -> None:
    """SIGKILL ``count`` (None: all) of the app's ready containers."""

    def find():
        found = [(cid, container_pid(cid)) for cid in live_containers(app_id)]
        return [(cid, pid) for cid, pid in found if pid is not None]

    victims = wait_until(find, 30, "a live container of the map's function")
    for cid, pid in victims[:count]:
        os.kill(pid, signal.SIGKILL)
        killed.append((cid, pid))


def _map_call(server, n_inputs: int) -> dict:
    """The newest map call of ``reliable.work`` with ``n_inputs`` inputs, from the store:
    how many of its inputs ended, and how many attempts failed along the way."""
    db = sqlite3.connect(f"file:{server.home / 'state.db'}?mode=ro", uri=True)
    try:
        (call_id,) = db.execute(
            "SELECT call_id FROM calls WHERE function_id = ? AND kind = 'map' AND n_inputs = ? "
            "ORDER BY created_at DESC LIMIT 1",
            (reliable.work.object_id, n_inputs),
        ).fetchone()
        done, failed_attempts, successes = db.execute(
            "SELECT SUM(status = 'done'), SUM(attempts), SUM(out_status = 'success') "
            "FROM inputs WHERE call_id = ?",
            (call_id,),
        ).fetchone()
    finally:
        db.close()
    return {"done": done, "failed_attempts": failed_attempts, "successes": successes}


@pytest.mark.parametrize("sleep_s", [0.002, 0.01], ids=["prefetched", "one-at-a-time"])
def test_map_survives_sigkilled_containers(reliable_app, strato_server, sleep_s):
    app_id = reliable_app.app_id
    killed: list[tuple[str, int]] = []
    # outputs are yielded in input order, behind those that arrived: kill early enough that
    # inputs are surely still running. First one container, then every one of them.
    kills = {N // 10: 1, N // 4: None}
    results = []
    for i, value in enumerate(reliable.work.map(range(N), [sleep_s] * N)):
        results.append(value)
        if i + 1 in kills:
            _kill_containers(app_id, killed, kills[i + 1])
    assert len(killed) >= 2
    assert len(results) == N
    assert results == EXPECTED  # each exactly once, right value, in order
    call = _map_call(strato_server, N)
    assert call["done"] == call["successes"] == N
    assert call["failed_attempts"] >= 1  # the kills did interrupt running inputs
    for _, pid in killed:
        wait_until(lambda pid=pid: not pid_alive(pid), 30, f"container {pid} to be reaped")


def test_unordered_map_survives_a_sigkilled_container(reliable_app):
    killed: list[tuple[str, int]] = []
    results = []
    for i, value in enumerate(reliable.work.map(range(N), [0.004] * N, order_outputs=False)):
        results.append(value)
        if i + 1 == N // 4:
            _kill_containers(reliable_app.app_id, killed, 1)
    assert len(killed) == 1
    assert len(results) == N
    assert sorted(results) == EXPECTED  # each exactly once, right value


def test_map_survives_a_control_plane_restart(reliable_app, strato_server):
    progress = {"n": 0}
    restarted = threading.Event()
    errors: list[BaseException] = []

    def restart_mid_map():
        try:
            wait_until(lambda: progress["n"] >= N // 4, 120, "a quarter of the outputs")
            strato_server.restart()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
        finally:
            restarted.set()

    old_pid = strato_server.pid
    t = threading.Thread(target=restart_mid_map, daemon=True)
    t.start()
    results = []
    # inputs trickle in while the map runs, so some are sent across the restart
    for value in reliable.work.map(_paced(N, 100, 0.1), [0.004] * N):
        results.append(value)
        progress["n"] = len(results)
    assert restarted.wait(120)
    t.join(10)
    assert not errors, errors
    assert strato_server.pid != old_pid  # it really restarted
    assert len(results) == N
    assert results == EXPECTED
    # the restart did happen mid-map: the new control plane found inputs to recover
    log = (strato_server.home / "logs" / "server.log").read_text()
    recovered = re.findall(r"recovered (\d+) inputs without outputs", log)
    assert recovered and int(recovered[-1]) > 0
    call = _map_call(strato_server, N)
    assert call["done"] == call["successes"] == N
    # the app is still usable after the restart
    assert reliable.work.remote(5, 0.0) == reliable.expected(5)


def _restart_when(server, condition, what: str) -> tuple[threading.Thread, list]:
    errors: list[BaseException] = []

    def run():
        try:
            wait_until(condition, 120, what)
            server.restart()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def test_remote_in_flight_survives_a_restart(reliable_app, strato_server, tmp_path):
    old_pid = strato_server.pid
    started = time.monotonic()
    # restart while .remote() waits on its (long-polled) result
    t, errors = _restart_when(
        strato_server, lambda: time.monotonic() - started > 1.0, "the call to be under way"
    )
    assert reliable.slow_value.remote(7, 2.5) == reliable.expected(7)
    t.join(60)
    assert not errors, errors
    assert strato_server.pid != old_pid


def test_generator_survives_a_restart(reliable_app, strato_server):
    old_pid = strato_server.pid
    got: list[int] = []
    t, errors = _restart_when(strato_server, lambda: len(got) >= 2, "two items")
    for item in reliable.slow_items.remote_gen(6, 0.4):
        got.append(item)
    t.join(60)
    assert not errors, errors
    assert strato_server.pid != old_pid
    # the generator ran again after the restart: items already received are not repeated
    assert got == [reliable.expected(i) for i in range(6)]
