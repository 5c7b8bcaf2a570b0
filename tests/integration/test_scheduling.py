"""Scheduling on a control plane whose node declares its resources through the worker
agent's environment (``STRATO_NODE_CPU``, ``STRATO_NODE_GPUS``): a GPU function runs only
where its GPU is, and idle containers make room for functions that wait."""

from __future__ import annotations

import pytest
from apps import scheduling as gpu
from conftest import dedicated_server

import strato
from strato import exceptions as exc
from strato.client import session
from strato.protocol import messages as m


@pytest.fixture(scope="module")
def gpu_app(strato_server):
    with dedicated_server({"STRATO_NODE_CPU": "2", "STRATO_NODE_GPUS": "H100:1,T4:1"}):
        with gpu.app.run(quiet=True):
            yield gpu.app
    strato_server.activate()


def test_the_node_declares_its_gpus(gpu_app):
    nodes = session.api().call("GET", "/nodes", None, m.NodeList).nodes
    assert [(n.info.cpu, n.info.gpus) for n in nodes] == [(2.0, {"H100": [0], "T4": [1]})]


def test_gpu_function_gets_its_device(gpu_app):
    assert gpu.on_h100.remote() == "0"
    assert gpu.on_t4.remote() == "1"


def test_missing_gpu_type_is_unavailable(gpu_app):
    with pytest.raises(exc.ResourceUnavailableError) as info:
        gpu.on_a100.remote()
    assert "A100-80GB" in str(info.value)


def test_too_many_gpus_is_unavailable(gpu_app):
    with pytest.raises(exc.ResourceUnavailableError) as info:
        gpu.on_two_h100.remote()
    assert "H100" in str(info.value)


def test_gpu_fallback_list_runs_on_the_available_type(gpu_app):
    # the H100 is held by on_h100's idle container from the test above, if it still runs:
    # the fallback function must get it all the same
    assert gpu.on_h100.remote() == "0"
    assert gpu.on_a100_or_h100.remote() == "0"
    calls = [gpu.on_a100_or_h100.spawn() for _ in range(3)]
    assert strato.FunctionCall.gather(*calls) == ["0", "0", "0"]


def test_cpu_function_runs_beside_gpu_functions(gpu_app):
    assert gpu.on_cpu.remote() == "cpu"


def test_idle_containers_make_room_for_a_waiting_function(gpu_app):
    # two containers of a (1 CPU each) fill the node's 2 CPUs, then idle
    assert list(gpu.whole_cpu_a.map([0.5, 0.5])) == ["a", "a"]
    # b needs a whole CPU: it runs within seconds, not after a's 60 s scale-down window
    assert gpu.whole_cpu_b.spawn().get(timeout=30) == "b"
    assert gpu.whole_cpu_a.spawn(0).get(timeout=30) == "a"
