"""Which idle containers are stopped to make room for a container that fits nowhere."""

from __future__ import annotations

from strato.server.scheduler import ContainerRequest, NodeView, Placement
from strato.server.scheduler.eviction import Resident, eviction_victims


def _req(cpu: float) -> ContainerRequest:
    return ContainerRequest(cpu=cpu, memory_mb=128, gpu=[])


def _node(node_id: str, residents: list[Resident], cpu_total: float = 4.0) -> NodeView:
    """A node with each resident's share reserved."""
    return NodeView(
        node_id,
        "local",
        None,
        0.0,
        cpu_total,
        8192,
        {},
        cpu_reserved=sum(r.request.cpu for r in residents),
        memory_reserved_mb=sum(r.request.memory_mb for r in residents),
    )


def _res(
    cid: str,
    fid: str,
    cpu: float,
    *,
    idle_since: float | None = 1.0,
    idle: bool = True,
    leaving: bool = False,
    node_id: str = "n1",
) -> Resident:
    return Resident(
        cid,
        fid,
        _req(cpu),
        Placement(node_id, None, []),
        leaving,
        idle,
        idle_since if idle else None,
    )


def _on(node_id: str, residents: list[Resident], cpu_total: float = 4.0):
    return (_node(node_id, residents, cpu_total), residents)


def test_no_idle_container_no_room():
    busy = [_res("a", "f", 2.0, idle=False), _res("b", "g", 2.0, idle=False)]
    assert eviction_victims(_req(1.0), "new", [_on("n1", busy)], {}) is None


def test_containers_leaving_make_room_without_victims():
    residents = [_res("a", "f", 2.0, leaving=True, idle=False), _res("b", "g", 2.0)]
    assert eviction_victims(_req(2.0), "new", [_on("n1", residents)], {}) == []


def test_the_longest_idle_goes_first():
    residents = [_res("young", "f", 2.0, idle_since=50.0), _res("old", "g", 2.0, idle_since=10.0)]
    assert eviction_victims(_req(2.0), "new", [_on("n1", residents)], {}) == ["old"]


def test_a_victim_whose_share_is_not_needed_is_kept():
    # the small one is idle longest and chosen first, but the big one alone makes room
    residents = [_res("small", "f", 1.0, idle_since=1.0), _res("big", "g", 3.0, idle_since=2.0)]
    assert eviction_victims(_req(3.0), "new", [_on("n1", residents)], {}) == ["big"]


def test_several_victims_when_one_is_not_enough():
    residents = [_res(c, c, 1.0, idle_since=i) for i, c in enumerate("abcd")]
    assert eviction_victims(_req(3.0), "new", [_on("n1", residents)], {}) == ["a", "b", "c"]


def test_never_its_own_function_nor_a_busy_container():
    residents = [_res("own", "new", 2.0), _res("busy", "g", 2.0, idle=False)]
    assert eviction_victims(_req(2.0), "new", [_on("n1", residents)], {}) is None


def test_warm_pools_and_functions_with_work_are_kept():
    residents = [_res("a1", "f", 1.0), _res("a2", "f", 1.0), _res("b", "g", 2.0)]
    # f may lose one container (its warm pool keeps the other); g has queued work
    spare = {"f": 1, "g": 0}
    assert eviction_victims(_req(2.0), "new", [_on("n1", residents)], spare) is None
    assert eviction_victims(_req(1.0), "new", [_on("n1", residents)], spare) == ["a1"]
    assert eviction_victims(_req(2.0), "new", [_on("n1", residents)], {"f": 2}) == ["a1", "a2"]


def test_the_next_node_is_tried():
    first = [_res("busy", "f", 4.0, idle=False)]
    second = [_res("idle", "g", 4.0, node_id="n2")]
    victims = eviction_victims(_req(2.0), "new", [_on("n1", first), _on("n2", second)], {})
    assert victims == ["idle"]


def test_the_views_given_are_not_changed():
    residents = [_res("a", "f", 4.0)]
    node = _node("n1", residents)
    assert eviction_victims(_req(2.0), "new", [(node, residents)], {}) == ["a"]
    assert node.cpu_reserved == 4.0
