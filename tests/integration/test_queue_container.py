"""Dict and Queue used from inside containers, over the container's channel: a consumer
function takes items with get_many (woken by the client's puts) and writes a Dict the
client reads; ephemeral objects made in a container; what a container may not do."""

from __future__ import annotations

import pytest
from apps import state_worker

import strato


@pytest.fixture(scope="module")
def running(strato_server):
    strato_server.activate()
    with state_worker.app.run(quiet=True):
        yield


def test_a_container_consumes_a_queue_and_writes_a_dict(running, request):
    qname, dname = "t-cq-" + request.node.name[:30], "t-cd-" + request.node.name[:30]
    q = strato.Queue.from_name(qname, create_if_missing=True).hydrate()
    d = strato.Dict.from_name(dname, create_if_missing=True).hydrate()  # made now
    try:
        consumers = [state_worker.consume.spawn(qname, dname, 150) for _ in range(2)]
        for i in range(0, 300, 30):  # the consumers wait (get_many blocks) between puts
            q.put_many(list(range(i, i + 30)))
        assert sorted(c.get(timeout=120) for c in consumers) == [150, 150]
        # each item went to exactly one consumer, and each wrote what it took
        assert d.len() == 301 and d["consumed"] == 150
        assert all(d[i] == i * i for i in range(300))
        assert q.len(total=True) == 0
    finally:
        strato.Queue.delete(qname)
        strato.Dict.delete(dname)


def test_ephemeral_objects_from_a_container(running):
    assert state_worker.ephemeral_round_trip.remote() == [1, [1, 2, 3], 1]


def test_a_container_cannot_delete_named_objects(running, request):
    name = "t-admin-" + request.node.name[:30]
    d = strato.Dict.from_name(name, create_if_missing=True)
    d["kept"] = True
    try:
        refused = state_worker.try_admin.remote(name)
        assert len(refused) == 2, refused
        assert "not open to code in a container" in refused[0]
        assert "named Dict" in refused[1]
        assert d["kept"] is True
    finally:
        strato.Dict.delete(name)


def test_dicts_and_queues_passed_as_arguments(running):
    with strato.Queue.ephemeral() as q, strato.Dict.ephemeral() as d:
        q.put_many([1, 2, 3])
        assert state_worker.drain.remote(q, d) == 3
        assert d["drained"] == [1, 2, 3] and q.len() == 0


def test_large_dict_values_from_a_container(running):
    with strato.Dict.ephemeral() as d:
        assert state_worker.large_value.remote(d) == 3 << 20
        assert d["big"] == b"\x03" * (3 << 20)
