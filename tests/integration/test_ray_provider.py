"""The ``ray`` provider on a real multi-node Ray cluster on this machine (a head and
raylets started by Ray's own ``ray.cluster_utils.Cluster``): one strato worker agent per
Ray node (an actor pinned to it, reserving what strato offers there), nodes that join
later get one, functions spread over the Ray nodes, and a Ray node removed in the middle
of a ``.map`` loses nothing. Everything is torn down at the end: no raylet, actor, agent
or container is left.

The machine has 2 cores: the cluster is a head and two raylets of one CPU each, and
strato takes half of each (``STRATO_RAY_SHARE=0.5``), so a function of 0.25 CPU fits two
containers per node and a ``.map`` spreads."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from apps import cluster_work
from cluster_nodes import containers_by_node, nodes, ready_nodes
from conftest import pid_alive, wait_until
from ray_strato import _pids_mentioning, start_server, strato_on_ray

from strato.client import session
from strato.protocol import messages as m

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")

SHARE = 0.5
AUTOSCALER_WAIT_S = 300  # work no node fits waits this long for a node (test_raywait_...)


def ray_ready_nodes() -> dict[str, object]:
    return {k: n for k, n in ready_nodes().items() if n.info.provider == "ray"}


@pytest.fixture(scope="module")
def ray_strato():
    env = {
        "STRATO_RAY_SHARE": str(SHARE),
        "STRATO_WORKER_HEARTBEAT_S": "0.5",
        "STRATO_RAY_AUTOSCALER_WAIT_S": str(AUTOSCALER_WAIT_S),
    }
    raylets = [{"num_cpus": 1, "resources": {"extra": 1}}]
    with strato_on_ray("strato-ray-", raylets, env) as up:
        yield up


def _ray_node_ids(cluster) -> set[str]:
    return {n.node_id for n in cluster.list_all_nodes()}


def test_each_ray_node_runs_one_agent_that_declares_what_ray_gives(ray_strato):
    cluster, handle, raylets, *_ = ray_strato
    ready = wait_until(lambda: len(r := ray_ready_nodes()) == 2 and r, 90, "2 Ray nodes")
    assert {n.info.provider for n in nodes()} == {"ray"}  # no local agent in this mode
    by_ray_id = {n.info.labels["ray.io/node-id"]: n for n in ready.values()}
    assert set(by_ray_id) == _ray_node_ids(cluster)
    for ray_node in ray.nodes():
        n = by_ray_id[ray_node["NodeID"]]
        assert n.info.name == "ray-" + ray_node["NodeID"][:12]
        assert n.info.cpu == pytest.approx(ray_node["Resources"]["CPU"] * SHARE)
        assert n.info.memory_mb == int(ray_node["Resources"]["memory"] * SHARE) // (1 << 20)
        assert n.info.gpus == {}
    # Ray counts what strato reserved: half of each node's CPUs are taken by its actor
    wait_until(
        lambda: ray.available_resources().get("CPU", 0) == pytest.approx(2 * (1 - SHARE)),
        30,
        "Ray to show strato's reservations",
    )

    # a Ray node that joins later gets its agent
    raylets.append(cluster.add_node(num_cpus=1, resources={"extra": 1}))
    cluster.wait_for_nodes()
    wait_until(lambda: len(ray_ready_nodes()) == 3, 90, "the new Ray node's agent")


def test_a_map_spreads_over_ray_nodes(ray_strato):
    wait_until(lambda: len(ray_ready_nodes()) == 3, 90, "3 Ray nodes")
    with cluster_work.app.run(quiet=True) as app:
        n = 200
        out = list(cluster_work.work.map(range(n), [0.02] * n))
        assert out == [cluster_work.expected(x) for x in range(n)]
        spread = containers_by_node(app.app_id)
        ray_nodes = {s.node_id for s in ray_ready_nodes().values()}
        assert set(spread) <= ray_nodes
        assert len(spread) >= 2, spread  # 0.5 CPU per node holds 2 of the 4 containers
        # the containers dialled their own node agent's relay (their home is that node's)
        dialled = cluster_work.channel.remote()
        assert dialled.endswith("/run/relay.sock")


def requested_from_ray_autoscaler() -> list[dict[str, float]]:
    """The bundles Ray's autoscaler was asked for (``request_resources``), read back from
    the GCS where Ray keeps them: the autoscaler v2's cluster resource constraints, or
    the v1 autoscaler's key in the GCS key-value store."""
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get, internal_kv_get_gcs_client

    gcs = internal_kv_get_gcs_client()
    if is_autoscaler_v2(fetch_from_server=True, gcs_client=gcs):
        from ray.autoscaler.v2.sdk import get_cluster_resource_state

        out = []
        for c in get_cluster_resource_state(gcs).cluster_resource_constraints:
            for r in c.resource_requests:
                out += [dict(r.request.resources_bundle)] * r.count
        return out
    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def test_work_no_node_can_place_is_asked_of_rays_autoscaler(ray_strato):
    """Containers that do not fit the nodes' shares are requested from Ray's autoscaler
    (``request_resources``) as bundles of their shape over the share, beside the nodes
    strato holds; the request is cleared once no work waits. Read back from Ray's GCS."""
    from apps import clustersec_demand as demand

    ready = wait_until(lambda: len(r := ray_ready_nodes()) == 3 and r, 90, "3 Ray nodes")
    assert requested_from_ray_autoscaler() == []  # no work waits

    def in_order(bundles: list[dict]) -> list[dict]:
        return sorted(bundles, key=lambda b: json.dumps(b, sort_keys=True))

    held = [
        {k: float(v) for k, v in n["Resources"].items() if k in ("CPU", "GPU", "memory")}
        for n in ray.nodes()
        if n["Alive"]
    ]
    assert len(held) == len(ready)
    container = {"CPU": demand.CPU / SHARE, "memory": float(demand.MEMORY_MB * (1 << 20) / SHARE)}
    with demand.app.run(quiet=True):
        # each node's share (0.5 CPU) holds one container: 3 run, 2 more are wanted
        calls = [demand.hold.spawn(i, 4.0) for i in range(10)]
        want = in_order([*held, container, container])
        seen: list[list] = []

        def asked() -> bool:
            seen.append(in_order(requested_from_ray_autoscaler()))
            return seen[-1] == want

        try:
            wait_until(asked, 60, f"Ray's autoscaler to be asked for {want}")
        except AssertionError as e:
            raise AssertionError(f"{e}; asked: {seen[-1]}") from None
        assert sorted(c.get(timeout=120) for c in calls) == list(range(10))
        wait_until(
            lambda: requested_from_ray_autoscaler() == [],
            30,
            "strato's request to Ray's autoscaler to be cleared once no work waits",
        )


def _agent_pid(agents_home: Path, name: str) -> int:
    """The worker agent process of strato node ``name`` (not its containers)."""
    pids = []
    for pid in _pids_mentioning(str(agents_home / name)):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"strato.providers.ray_agent" in f.read():
                pids.append(pid)
    assert len(pids) == 1, pids
    return pids[0]


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_a_dead_agent_or_actor_is_replaced_and_the_node_comes_back(ray_strato):
    _, _, raylets, agents_home, _ = ray_strato
    wait_until(lambda: len(ray_ready_nodes()) == 3, 90, "3 Ray nodes")
    name = "ray-" + raylets[-1].node_id[:12]
    node_id = ray_ready_nodes()[name].node_id

    def back(old_pid: int) -> bool:
        n = ray_ready_nodes().get(name)
        with contextlib.suppress(AssertionError):
            return (
                n is not None and n.node_id == node_id and _agent_pid(agents_home, name) != old_pid
            )
        return False

    # the agent dies: its actor starts a new one, which registers as the same node
    agent = _agent_pid(agents_home, name)
    actor = _parent(agent)
    os.kill(agent, signal.SIGKILL)
    wait_until(lambda: back(agent), 60, "the actor to restart the agent")
    assert _parent(_agent_pid(agents_home, name)) == actor

    # the actor dies (its Ray node lives on): its agent exits with it, the provider makes
    # a new actor on that node, and the node comes back under the same name
    agent = _agent_pid(agents_home, name)
    os.kill(actor, signal.SIGKILL)
    wait_until(lambda: back(agent), 60, "the provider to replace the actor")
    assert _parent(_agent_pid(agents_home, name)) != actor
    assert not pid_alive(agent)
    with cluster_work.app.run(quiet=True):
        n = 60
        out = list(cluster_work.work.map(range(n)))
        assert out == [cluster_work.expected(x) for x in range(n)]


def test_a_ray_node_removed_mid_map_loses_nothing(ray_strato):
    cluster, handle, raylets, agents_home, _ = ray_strato
    wait_until(lambda: len(ray_ready_nodes()) == 3, 90, "3 Ray nodes")
    ready = ray_ready_nodes()
    # strato's node of each raylet that is not the head (Ray's head stays)
    raylet_of = {ready["ray-" + r.node_id[:12]].node_id: r for r in raylets}
    n = 600
    victim = victim_id = None
    with cluster_work.app.run(quiet=True) as app:
        got: list[int] = []
        for i, y in enumerate(cluster_work.work.map(range(n), [0.03] * n)):
            got.append(y)
            if victim is None and i >= 20:
                busy = [nid for nid in containers_by_node(app.app_id) if nid in raylet_of]
                if busy:  # a raylet running containers of the map right now
                    victim_id = busy[0]
                    victim = raylet_of[victim_id]
                    cluster.remove_node(victim)  # its raylet and workers (strato's actor) die
        assert victim is not None, "no raylet ran a container of the map"
        assert len(got) == n
        assert got == [cluster_work.expected(x) for x in range(n)]  # each once, in order
    # the node is lost in strato, and its agent (with its containers) is gone
    wait_until(
        lambda: {x.node_id: x.state for x in nodes()}.get(victim_id) == "lost",
        60,
        "the removed Ray node to be lost",
    )
    victim_name = "ray-" + victim.node_id[:12]
    wait_until(
        lambda: not _pids_mentioning(str(agents_home / victim_name)),
        60,
        "the removed node's agent and containers to exit",
    )
    raylets.remove(victim)
    assert len(ray_ready_nodes()) == 2


def test_server_status_names_ray_nodes(ray_strato):
    _, handle, *_ = ray_strato
    out = subprocess.run(
        [sys.executable, "-m", "strato.cli.main", "server", "status"],
        env=dict(os.environ, STRATO_HOME=str(handle.home), STRATO_SERVER_URL=handle.url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(", ray): ready") == 2, out.stdout
    info = json.loads((handle.home / "server.json").read_text())
    assert info["agent_port"]  # the provider opened the agent listener


def _app_logs(app_id: str) -> list[m.LogLine]:
    batch = session.api().call(
        "GET", f"/apps/{app_id}/logs", None, m.LogBatch, params={"after": 0, "timeout": 0}
    )
    return batch.lines


def test_raywait_work_bigger_than_any_ray_node_waits_for_a_node_that_fits(ray_strato):
    """A function needing more than any Ray node's share (1 CPU; the nodes' shares are 0.5)
    waits (STRATO_RAY_AUTOSCALER_WAIT_S) instead of failing: the app's logs say so and its
    shape is asked of Ray's autoscaler (read back from the GCS). Ray's autoscaler's part is
    played by hand: a 2-CPU raylet joins the cluster, its agent comes up and the call runs
    there. (The wait's end and Ray's "infeasible" are in tests/unit/test_raywait_decision.py:
    no Ray autoscaler runs on this machine.)"""
    from apps import raywait_big as big

    cluster, _, raylets, *_ = ray_strato
    wait_until(lambda: len(ray_ready_nodes()) == 2, 90, "2 Ray nodes")
    want = {"CPU": big.CPU / SHARE, "memory": float(big.MEMORY_MB * (1 << 20) / SHARE)}
    with big.app.run(quiet=True) as app:
        call = big.double.spawn(21)

        def told() -> bool:
            return any(
                "waiting up to" in line.text
                and "for Ray's autoscaler to add a node with 1 CPU and 200 MiB for strato"
                in line.text
                for line in _app_logs(app.app_id)
            )

        wait_until(told, 60, "the app's logs to say the function waits for Ray's autoscaler")
        wait_until(
            lambda: want in requested_from_ray_autoscaler(),
            30,
            f"Ray's autoscaler to be asked for {want}",
        )
        # (a failed call would have ended with ResourceUnavailableError by now)
        raylets.append(cluster.add_node(num_cpus=2, resources={"extra": 1}))
        big_node = "ray-" + raylets[-1].node_id[:12]
        try:
            assert call.get(timeout=AUTOSCALER_WAIT_S) == 42
            ran_on = {ready.node_id: name for name, ready in ray_ready_nodes().items()}
            assert {ran_on.get(nid) for nid in containers_by_node(app.app_id)} == {big_node}
        finally:
            cluster.remove_node(raylets.pop())
    wait_until(
        lambda: big_node not in ray_ready_nodes() and len(ray_ready_nodes()) == 2,
        60,
        "the added Ray node to be lost",
    )
    wait_until(lambda: requested_from_ray_autoscaler() == [], 30, "the request to be cleared")


def test_a_control_plane_killed_takes_its_agents_with_it_and_a_new_one_starts_them(ray_strato):
    """Ray ends the actors of a dead driver: the agents of a SIGKILLed control plane exit
    (they never serve two control planes), and a new one makes agents on every node."""
    _, handle, raylets, agents_home, env = ray_strato
    before = {name: _agent_pid(agents_home, name) for name in ray_ready_nodes()}
    assert len(before) == len(raylets) + 1
    os.kill(handle.pid, signal.SIGKILL)
    wait_until(lambda: not any(pid_alive(p) for p in before.values()), 60, "the agents to exit")
    session.reset()
    start_server(env)

    def back() -> bool:
        with contextlib.suppress(AssertionError):
            new = {name: _agent_pid(agents_home, name) for name in before}
            return set(ray_ready_nodes()) == set(before) and not set(new.values()) & set(
                before.values()
            )
        return False

    wait_until(back, 90, "new agents on every node")
    with cluster_work.app.run(quiet=True):
        n = 40
        assert list(cluster_work.work.map(range(n))) == [cluster_work.expected(x) for x in range(n)]
