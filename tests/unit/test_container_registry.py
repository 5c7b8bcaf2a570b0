"""The container registry: containers by function, their states, and what the autoscaler
sees of them."""

from __future__ import annotations

from strato.server.containers import Container, ContainerRegistry, ContainerState
from strato.server.scheduler import ContainerRequest, Placement


def _container(cid: str, fid: str, state: ContainerState, app_id: str = "ap-1") -> Container:
    c = Container(
        cid,
        fid,
        app_id,
        "n1",
        ContainerRequest(cpu=1.0, memory_mb=128, gpu=[]),
        Placement("n1", None, []),
        started_at=5.0,
        state=state,
        idle_since=7.0,
    )
    return c


def test_indexes_follow_adds_and_removes():
    reg = ContainerRegistry()
    a = _container("a", "f", ContainerState.READY)
    b = _container("b", "f", ContainerState.STARTING)
    c = _container("c", "g", ContainerState.STOPPING, app_id="ap-2")
    for x in (a, b, c):
        reg.add(x)
    assert [x.container_id for x in reg.of_function("f")] == ["a", "b"]
    assert [x.container_id for x in reg.ready_of("f")] == ["a"]
    assert [x.container_id for x in reg.live_of("g")] == []
    assert [x.container_id for x in reg.of_app("ap-2")] == ["c"]
    reg.remove(a)
    reg.remove(b)
    assert not reg.has_function("f") and "a" not in reg and len(reg) == 1


def test_stats_say_only_ready_containers_are_idle_and_leaving_ones_stop():
    reg = ContainerRegistry()
    for cid, state in [
        ("r", ContainerState.READY),
        ("s", ContainerState.STARTING),
        ("k", ContainerState.KILLING),
    ]:
        reg.add(_container(cid, "f", state))
    stats = {s.container_id: s for s in reg.stats("f")}
    assert [(s.state, s.idle_since, s.inflight) for s in stats.values()] == [
        ("ready", 7.0, 0),
        ("starting", None, 0),
        ("stopping", None, 0),
    ]
    # the gateway's view of load replaces the leases
    web = reg.stats("f", load=lambda c: (3, None) if c.container_id == "r" else (0, 1.0))
    assert [(s.inflight, s.idle_since) for s in web] == [(3, None), (0, None), (0, None)]


def test_marking_killing_and_idle_notes():
    reg = ContainerRegistry()
    c = _container("a", "f", ContainerState.READY)
    reg.add(c)
    c.note_busy()
    assert c.idle_since is None
    c.note_idle(9.0)
    assert c.idle_since == 9.0
    reg.mark_killing(c)
    assert c.state == ContainerState.KILLING and reg.ready_of("f") == []
    c.note_idle(10.0)  # not ready: not idle either
    assert c.idle_since == 9.0
