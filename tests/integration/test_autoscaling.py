"""Autoscaling live: a burst scales out to max_containers, never beyond, and back to zero
after the scale-down window; update_autoscaler changes a running function's limits."""

from __future__ import annotations

import threading
import time

import pytest
from apps import scaling
from conftest import wait_until

from strato.client import session
from strato.protocol import messages as m

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def running(strato_server):
    strato_server.activate()
    with scaling.app.run(quiet=True):
        yield


def _containers(function_name: str) -> int:
    listing = session.api().call(
        "GET", "/containers", None, m.ContainerList, params={"app": scaling.app.app_id}
    )
    return sum(
        1
        for c in listing.containers
        if c.function_name == function_name
        and c.state in ("pending", "starting", "ready", "stopping")
    )


def test_burst_scales_to_max_containers_never_more_then_to_zero(running):
    seen: list[int] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(_containers("half_second"))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        results = list(scaling.half_second.map(range(200)))
    finally:
        done.set()
        watcher.join(5)
    assert results == list(range(200))
    assert max(seen) == 8, f"container counts seen: {sorted(set(seen))}"
    wait_until(lambda: _containers("half_second") == 0, 60, "scale to zero after the window")


def test_update_autoscaler_keeps_warm_containers(running):
    scaling.quick.update_autoscaler(min_containers=2)
    wait_until(lambda: _containers("quick") == 2, 60, "two warm containers")
    assert scaling.quick.get_current_stats().num_total_runners == 2
    scaling.quick.update_autoscaler(min_containers=0)
    wait_until(lambda: _containers("quick") == 0, 60, "scale back to zero")
