"""Dict and Queue survive a SIGKILL of the control plane: every put that was answered is
kept, and no item is handed out twice, whether the kill comes between the puts and the
gets or while consumers are taking items (a request whose answer the kill lost is sent
again by the client, and the control plane answers it as it did the first time)."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator

import pytest
from conftest import dedicated_server, postgres_database, restore_env, wait_until

import strato

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _database(kind: str) -> Iterator[dict[str, str]]:
    """The control plane's environment: its default SQLite, or a fresh PostgreSQL database."""
    if kind == "sqlite":
        yield {}
        return
    with postgres_database() as url:
        yield {"STRATO_DATABASE_URL": url}


def _restart(srv, env: dict[str, str]) -> None:
    """SIGKILL the control plane, then start it again on the same home and database."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        srv.restart()
    finally:
        restore_env(saved)


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_sigkill_between_puts_and_gets_loses_nothing_and_repeats_nothing(db):
    with _database(db) as env, dedicated_server(env) as srv:
        q = strato.Queue.from_name("jobs", create_if_missing=True)
        d = strato.Dict.from_name("results", create_if_missing=True)
        for i in range(0, 1000, 100):
            q.put_many(list(range(i, i + 100)))
        q.put_many(["a", "b"], partition="side")
        d.update({f"k{i}": i for i in range(500)})
        d["big"] = b"\x02" * (2 << 20)  # in the blob store
        first = q.get_many(300)
        old_pid = srv.pid
        _restart(srv, env)
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


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_sigkill_while_consumers_take_items(db):
    n, consumers = 3000, 4
    with _database(db) as env, dedicated_server(env) as srv:
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
        _restart(srv, env)
        for t in threads:
            t.join(120)
        assert not errors, errors
        taken = sorted(x for g in got for x in g)
        assert taken == list(range(n))  # nothing lost, nothing twice
        assert q.len(total=True) == 0
