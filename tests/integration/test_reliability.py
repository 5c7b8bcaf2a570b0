"""Reliability: a ``.map`` of 2,000 inputs survives containers killed (SIGKILL) in its
middle, and a restart of the control plane (SIGKILL, then start again) in its middle.
Every output arrives exactly once, with the right value, in input order where asked."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from apps import reliable
from conftest import container_pid, live_containers, pid_alive, stored_map_call, wait_until

pytestmark = pytest.mark.slow

N = 2000
EXPECTED = [reliable.expected(x) for x in range(N)]


@pytest.fixture(scope="module")
def reliable_app(strato_server):
    strato_server.activate()
    with reliable.app.run(quiet=True):
        # warm up: the function's containers exist and its duration is known
        assert list(reliable.work.map(range(6), [0.0] * 6)) == EXPECTED[:6]
        yield reliable.app


def _paced(n: int, every: int, pause: float) -> Iterator[int]:
    """0..n-1, pausing now and then, so that inputs are still being sent mid-map."""
    for x in range(n):
        if x and x % every == 0:
            time.sleep(pause)
        yield x


def _kill_containers(app_id: str, count: int | None) -> list[int]:
    """SIGKILL ``count`` (None: all) of the app's ready containers; returns their pids."""

    def find():
        found = [container_pid(cid) for cid in live_containers(app_id)]
        return [pid for pid in found if pid is not None]

    victims = wait_until(find, 30, "a live container of the map's function")[:count]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    return victims


def _runs(path) -> collections.Counter:
    """How many times each input started running (``reliable.work`` logs each run)."""
    return collections.Counter(int(x) for x in path.read_text().split())


@pytest.mark.parametrize("sleep_s", [0.002, 0.007], ids=["prefetched", "one-at-a-time"])
def test_map_survives_sigkilled_containers(reliable_app, strato_server, tmp_path, sleep_s):
    """A fast function's container holds many inputs at once ("prefetched"); a slower
    one's holds one. Kill one container, then all of them, while the map runs."""
    runs_log = tmp_path / "runs"
    killed: list[int] = []
    # outputs are yielded in input order, behind those that arrived: kill early enough that
    # inputs are surely still running
    kills = {N // 10: 1, N // 4: None}
    results = []
    for i, value in enumerate(reliable.work.map(range(N), [sleep_s] * N, [str(runs_log)] * N)):
        results.append(value)
        if i + 1 in kills:
            killed += _kill_containers(reliable_app.app_id, kills[i + 1])
    assert len(killed) >= 2
    assert len(results) == N
    assert results == EXPECTED  # each exactly once, with its value, in order
    runs = _runs(runs_log)
    assert set(runs) == set(range(N))
    assert max(runs.values()) >= 2  # the kills interrupted running inputs, which ran again
    stored = stored_map_call(strato_server.home, reliable.work.object_id, N, page=97)
    assert stored["done"] == stored["successes"] == N
    assert sorted(stored["indices"]) == list(range(N))  # one output each, no repeats
    for pid in killed:
        wait_until(lambda pid=pid: not pid_alive(pid), 30, f"container {pid} to be reaped")


def test_unordered_map_survives_a_sigkilled_container(reliable_app):
    killed: list[int] = []
    results = []
    for i, value in enumerate(reliable.work.map(range(N), [0.004] * N, order_outputs=False)):
        results.append(value)
        if i + 1 == N // 4:
            killed += _kill_containers(reliable_app.app_id, 1)
    assert len(killed) == 1
    assert len(results) == N
    assert sorted(results) == EXPECTED  # each exactly once, with its value


def _restart_when(server, condition, what: str) -> tuple[threading.Thread, list]:
    """Restart the control plane from another thread once ``condition()`` holds."""
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


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_map_survives_a_control_plane_restart(reliable_app, strato_server, tmp_path, ordered):
    runs_log = tmp_path / "runs"
    old_pid = strato_server.pid
    results: list[int] = []
    t, errors = _restart_when(strato_server, lambda: len(results) >= N // 4, "N/4 outputs")
    # inputs trickle in while the map runs, so some are sent across the restart
    for value in reliable.work.map(
        _paced(N, 100, 0.1), [0.004] * N, [str(runs_log)] * N, order_outputs=ordered
    ):
        results.append(value)
    t.join(120)
    assert not t.is_alive() and not errors, errors
    assert strato_server.pid != old_pid  # it really restarted
    assert len(results) == N
    assert (results if ordered else sorted(results)) == EXPECTED
    runs = _runs(runs_log)
    assert set(runs) == set(range(N))
    # the restart happened mid-map: inputs running then lost their outputs and ran again
    assert max(runs.values()) >= 2
    stored = stored_map_call(strato_server.home, reliable.work.object_id, N, page=97)
    assert stored["done"] == stored["successes"] == N
    assert sorted(stored["indices"]) == list(range(N))  # one output each, no repeats
    # the app is still usable after the restart
    assert reliable.work.remote(5, 0.0) == reliable.expected(5)


def test_remote_in_flight_survives_a_restart(reliable_app, strato_server):
    old_pid = strato_server.pid
    started = time.monotonic()
    # restart while .remote() waits on its (long-polled) result
    t, errors = _restart_when(
        strato_server, lambda: time.monotonic() - started > 1.0, "the call to be under way"
    )
    assert reliable.slow_value.remote(7, 2.5) == reliable.expected(7)
    t.join(120)
    assert not t.is_alive() and not errors, errors
    assert strato_server.pid != old_pid


def test_generator_survives_a_restart(reliable_app, strato_server):
    old_pid = strato_server.pid
    got: list[int] = []
    t, errors = _restart_when(strato_server, lambda: len(got) >= 2, "two items")
    for item in reliable.slow_items.remote_gen(6, 0.4):
        got.append(item)
    t.join(120)
    assert not t.is_alive() and not errors, errors
    assert strato_server.pid != old_pid
    # the generator ran again after the restart: items already received are not repeated
    assert got == EXPECTED[:6]
