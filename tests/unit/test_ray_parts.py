"""The ``ray`` provider's parts without a Ray cluster: what it reads from ``ray.nodes()``,
what it reserves and forwards, and the node actor's supervision of its worker agent (run
here as a plain object)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import pytest

from strato.exceptions import InvalidError
from strato.providers import ray as rp
from strato.providers.ray_agent import AgentSpec, NodeAgent, gpu_inventory, node_home

NODE = {
    "NodeID": "881a044f5674e36ddfa4f220e9330fdc8320aa75bf0cf7132164aa82",
    "Alive": True,
    "NodeManagerAddress": "10.0.0.7",
    "Resources": {
        "CPU": 8.0,
        "GPU": 4.0,
        "memory": 64 * 1024**3,
        "accelerator_type:H100": 1.0,
        "node:10.0.0.7": 1.0,
        "strato": 1.0,
    },
    "Labels": {"ray.io/node-id": "881a044f", "zone": "b"},
}


def test_a_node_shape_is_the_share_of_what_ray_reports():
    shape = rp.shape_of(NODE, 0.5)
    assert shape is not None
    assert shape.name == "ray-881a044f5674"
    assert (shape.cpu, shape.memory_mb, shape.gpu_count) == (4.0, 32 * 1024, 2)
    assert shape.accelerator == "H100"
    assert shape.labels == {"ray.io/node-id": "881a044f", "zone": "b", "ray.io/node-ip": "10.0.0.7"}
    opts = shape.actor_options()
    assert opts["num_cpus"] == 4.0 and opts["num_gpus"] == 2
    assert opts["memory"] == 32 * 1024**3 and opts["accelerator_type"] == "H100"
    assert opts["max_restarts"] == 0


def test_gpus_are_whole_and_cpu_is_kept_to_thousandths():
    shape = rp.shape_of({**NODE, "Resources": {"CPU": 3.0, "GPU": 3.0, "memory": 1 << 30}}, 0.33)
    assert shape is not None
    assert shape.gpu_count == 0 and shape.cpu == 0.99
    assert "accelerator_type" not in shape.actor_options()


@pytest.mark.parametrize(
    ("node", "required"),
    [
        ({**NODE, "Alive": False}, ""),  # dead
        ({**NODE, "Resources": {"CPU": 0.0, "memory": 1 << 30}}, ""),  # no CPU to offer
        (NODE, "strato-only"),  # lacks the resource STRATO_RAY_NODE_RESOURCE names
        ({k: v for k, v in NODE.items() if k != "NodeID"}, ""),
    ],
)
def test_nodes_strato_does_not_use(node, required):
    assert rp.shape_of(node, 1.0, required) is None


def test_a_node_with_the_required_resource_is_used():
    assert rp.shape_of(NODE, 1.0, "strato") is not None


def test_gpu_types_take_strato_names():
    assert rp.gpu_type("H100") == "H100"
    assert rp.gpu_type("A100") == "A100-40GB"
    assert rp.gpu_type("SOME-NEW-CHIP") == "SOME-NEW-CHIP"
    assert rp.gpu_type(None) is None


def test_worker_settings_reach_the_agents_but_not_per_node_ones():
    env = {
        "STRATO_RUNTIME": "process",
        "STRATO_WORKER_HEARTBEAT_S": "0.5",
        "STRATO_NODE_CPU": "3",  # from Ray, per node
        "STRATO_HOME": "/srv/strato",  # the control plane's
        "STRATO_PORT": "7749",  # not a worker setting
        "STRATO_WORKER_PARENT_PID": "1",  # internal
        "PATH": "/bin",
    }
    assert rp.forwarded_env(env) == {
        "STRATO_RUNTIME": "process",
        "STRATO_WORKER_HEARTBEAT_S": "0.5",
    }


def test_agents_dial_the_hosts_address_or_the_drivers_in_ray():
    assert rp.advertised_host("0.0.0.0", "10.0.0.2") == "10.0.0.2"
    assert rp.advertised_host("10.0.0.9", "10.0.0.2") == "10.0.0.9"
    assert rp.advertised_host("127.0.0.1", "10.0.0.2") == "127.0.0.1"


def test_an_unreachable_ray_address_fails_at_once_naming_it():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    with pytest.raises(InvalidError, match=f"RAY_ADDRESS=127.0.0.1:{port}"):
        rp.reachable(f"127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(InvalidError, match="HOST:PORT"):
        rp.reachable("no-port-here")


def _spec(tmp_path, **kw) -> AgentSpec:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    addr = port.getsockname()[1]
    port.close()
    fields = dict(
        name="ray-0123456789ab",
        ray_node_id="0123456789ab" * 4,
        channel=f"tcp:127.0.0.1:{addr}",  # nothing answers: the agent keeps dialling
        server_url=f"http://127.0.0.1:{addr}",
        join_token="stj_x_y",
        cpu=1.0,
        memory_mb=512,
        env={"STRATO_RUNTIME": "process"},
        agent_home=str(tmp_path / "agents"),
    )
    fields.update(kw)
    return AgentSpec(**fields)


def test_a_spec_travels_as_json_and_names_its_home(tmp_path):
    spec = _spec(tmp_path, gpu_count=2, gpu_type="H100", labels={"a": "b"})
    assert AgentSpec.from_json(spec.to_json()) == spec
    assert node_home(spec) == tmp_path / "agents" / "ray-0123456789ab"
    assert node_home(_spec(tmp_path, agent_home="")).name == "ray-0123456789ab"


def test_the_agent_offers_the_gpus_ray_assigned_by_their_physical_index(tmp_path):
    spec = _spec(tmp_path, gpu_count=2, gpu_type="H100")
    assert gpu_inventory(spec, ["3", "1"]) == {"H100": [1, 3]}
    assert gpu_inventory(_spec(tmp_path), []) == {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def test_the_node_actor_restarts_its_agent_and_stops_it(tmp_path, monkeypatch):
    import sys

    monkeypatch.setenv("STRATO_WORKER_RESTART_BACKOFF", "0.1,0.2")
    ray_before = "ray" in sys.modules
    actor = NodeAgent(_spec(tmp_path).to_json())
    try:
        first = actor.info()
        assert first["alive"] and first["restarts"] == 0 and first["actor_pid"] == os.getpid()
        os.kill(first["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while actor.info()["restarts"] < 1 or not actor.info()["alive"]:
            assert time.monotonic() < deadline, "the agent was not restarted"
            time.sleep(0.05)
        second = actor.info()["pid"]
        assert second != first["pid"]
    finally:
        code = actor.stop(grace_s=10)
    assert code is not None
    assert not _alive(second)
    time.sleep(0.5)  # the supervisor saw the stop: nothing was started again
    assert actor.info()["pid"] == second and not actor.info()["alive"]
    assert ("ray" in sys.modules) == ray_before  # outside Ray, it never imports it


# ---------------------------------------------------------------------------------------
# The provider's loop against a fake ``ray`` module: which actors it makes, and what it
# does when a node dies, an actor dies, or an actor waits for its resources


class _Ref:
    def __init__(self, value=None, error: Exception | None = None, ready: bool = True):
        self.value, self.error, self.ready = value, error, ready


class _Actor:
    def __init__(self, fake: _FakeRay, options: dict, spec: str) -> None:
        self.fake, self.options, self.spec = fake, options, spec
        self.dead = False
        self.stopped = False
        outer = self

        class _Method:
            def __init__(self, name: str) -> None:
                self.name = name

            def remote(self, *a):
                if self.name == "stop":
                    outer.stopped = True
                    return _Ref(0)
                if outer.dead:
                    return _Ref(error=RuntimeError("The actor died unexpectedly"))
                return _Ref({"alive": True}, ready=not outer.fake.pending)

        self.info = _Method("info")
        self.stop = _Method("stop")


class _FakeRay:
    def __init__(self, nodes: list[dict]) -> None:
        self._nodes = nodes
        self.actors: list[_Actor] = []
        self.pending = False
        self.shut = False

    def nodes(self):
        return self._nodes

    def remote(self, cls):
        fake = self

        class _Cls:
            def options(self, **opts):
                class _Opt:
                    def remote(self, spec):
                        actor = _Actor(fake, opts, spec)
                        fake.actors.append(actor)
                        return actor

                return _Opt()

        return _Cls()

    def wait(self, refs, num_returns, timeout):
        ready = [r for r in refs if r.ready]
        return ready, [r for r in refs if not r.ready]

    def get(self, ref):
        if ref.error is not None:
            raise ref.error
        return ref.value

    def kill(self, actor):
        actor.dead = True

    def shutdown(self):
        self.shut = True


@pytest.fixture
def fake_ray(monkeypatch):
    import types

    fake = _FakeRay([dict(NODE), {**NODE, "NodeID": "ff" * 28, "Resources": {"CPU": 2.0}}])
    strategies = types.SimpleNamespace(
        NodeAffinitySchedulingStrategy=lambda node_id, soft: ("affinity", node_id, soft)
    )
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.util", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "ray.util.scheduling_strategies", strategies)
    return fake


def _provider(lost: list) -> rp.RayProvider:
    return rp.RayProvider(
        channel="tcp:10.0.0.1:7751",
        server_url="http://10.0.0.1:7749",
        join_token="stj_a_b",
        on_node_lost=lambda name, why: lost.append((name, why)),
        share=0.5,
        env={"STRATO_RUNTIME": "process"},
    )


def test_each_live_node_gets_one_pinned_actor_reserving_its_share(fake_ray):
    lost: list = []
    p = _provider(lost)
    p.reconcile()
    p.reconcile()  # nothing new: no second actor
    assert len(fake_ray.actors) == 2
    by_node = {a.options["scheduling_strategy"][1]: a for a in fake_ray.actors}
    gpu_node = by_node[NODE["NodeID"]]
    assert gpu_node.options["scheduling_strategy"] == ("affinity", NODE["NodeID"], False)
    assert gpu_node.options["num_cpus"] == 4.0 and gpu_node.options["num_gpus"] == 2
    assert gpu_node.options["accelerator_type"] == "H100"
    spec = AgentSpec.from_json(gpu_node.spec)
    assert (spec.name, spec.cpu, spec.gpu_count, spec.gpu_type) == (
        "ray-881a044f5674",
        4.0,
        2,
        "H100",
    )
    assert (spec.channel, spec.join_token, spec.env) == (
        "tcp:10.0.0.1:7751",
        "stj_a_b",
        {"STRATO_RUNTIME": "process"},
    )
    # a node without memory in Ray's view still gets an agent, offering none
    assert by_node["ff" * 28].options["memory"] == 0
    assert lost == []


def test_a_dead_node_is_lost_once_and_gets_no_actor(fake_ray):
    lost: list = []
    p = _provider(lost)
    p.reconcile()
    fake_ray._nodes[0] = {**NODE, "Alive": False}
    p.reconcile()
    p.reconcile()
    assert lost == [("ray-881a044f5674", "its Ray node left the cluster")]
    assert NODE["NodeID"] not in p.agents and len(fake_ray.actors) == 2


def test_a_dead_actor_on_a_live_node_is_replaced_after_a_backoff(fake_ray, monkeypatch):
    lost: list = []
    p = _provider(lost)
    p.reconcile()
    first = next(a for a in fake_ray.actors if NODE["NodeID"] in a.spec)
    first.dead = True
    p.agents[NODE["NodeID"]].ping = first.info.remote()
    p.reconcile()  # its answer is an error: the node is lost, a new actor waits 0.5 s
    assert lost == [("ray-881a044f5674", "its Ray actor died")]
    assert NODE["NodeID"] not in p.agents and len(fake_ray.actors) == 2
    later = time.monotonic() + 1.0
    monkeypatch.setattr(rp.time, "monotonic", lambda: later)
    p.reconcile()
    assert len(fake_ray.actors) == 3 and NODE["NodeID"] in p.agents


def test_an_actor_that_waits_for_its_resources_is_reported(fake_ray, monkeypatch, caplog):
    fake_ray.pending = True
    p = _provider([])
    p.reconcile()
    later = time.monotonic() + rp.PENDING_WARN_S + 1
    monkeypatch.setattr(rp.time, "monotonic", lambda: later)
    with caplog.at_level("WARNING", logger="strato.providers.ray"):
        p.reconcile()
        p.reconcile()
    waits = [r for r in caplog.records if "has not started" in r.getMessage()]
    assert len(waits) == 2  # once per node, not once per look
    assert "lower STRATO_RAY_SHARE" in waits[0].getMessage()


def test_close_stops_every_agent_then_leaves_the_cluster(fake_ray):
    p = _provider([])
    p.reconcile()
    p.close()
    assert all(a.stopped and a.dead for a in fake_ray.actors) and fake_ray.shut
    assert p.agents == {}
