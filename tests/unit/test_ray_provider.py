"""The ``ray`` provider's parts without a Ray cluster: what it reads from ``ray.nodes()``,
what it reserves and forwards, and the node actor's supervision of its worker agent (run
here as a plain object)."""

from __future__ import annotations

import os
import signal
import socket
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
