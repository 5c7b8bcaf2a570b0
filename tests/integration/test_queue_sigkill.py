"""Dict and Queue survive a SIGKILL of the control plane: every put that was answered is
kept, and no item is handed out twice, whether the kill comes between the puts and the
gets or while consumers are taking items (a request whose answer the kill lost is sent
again by the client, and the control plane answers it as it did the first time)."""

from __future__ import annotations

import queue
import threading

import pytest
from conftest import dedicated_server, wait_until

import strato

pytestmark = pytest.mark.slow


def test_a_sigkill_between_puts_and_gets_loses_nothing_and_repeats_nothing():
    with dedicated_server({}) as srv:
        q = strato.Queue.from_name("jobs", create_if_missing=True)
        d = strato.Dict.from_name("results", create_if_missing=True)
        for i in range(0, 1000, 100):
            q.put_many(list(range(i, i + 100)))
        q.put_many(["a", "b"], partition="side")
        d.update({f"k{i}": i for i in range(500)})
        d["big"] = b"\x02" * (2 << 20)  # in the blob store
        first = q.get_many(300)
        old_pid = srv.pid
        srv.restart()  # SIGKILL, then start again on the same home
        assert srv.pid != old_pid
        rest: list[int] = []
        while True:
            try:
                rest += q.get_many(100, timeout=0.5)
            except queue.Empty:
                break
        assert first + rest == list(range(1000))  # FIFO, each once
        assert q.get_many(5, partition="side") == ["a", "b"]
        assert d.len() == 501 and d["k123"] == 123 and d["big"] == b"\x02" * (2 << 20)


def test_a_sigkill_while_consumers_take_items():
    n, consumers = 3000, 4
    with dedicated_server({}) as srv:
        q = strato.Queue.from_name("work", create_if_missing=True)
        for i in range(0, n, 500):
            q.put_many(list(range(i, i + 500)))
        got: list[list[int]] = [[] for _ in range(consumers)]
        errors: list[BaseException] = []

        def consume(mine: list[int]) -> None:
            try:
                while True:
                    try:
                        mine.extend(q.get_many(7, timeout=10.0))
                    except queue.Empty:
                        return
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=consume, args=(g,)) for g in got]
        for t in threads:
            t.start()
        wait_until(lambda: sum(map(len, got)) >= n // 3, 60, "a third of the items taken")
        srv.restart()
        for t in threads:
            t.join(120)
        assert not errors, errors
        taken = sorted(x for g in got for x in g)
        assert taken == list(range(n))  # nothing lost, nothing twice
        assert q.len(total=True) == 0
