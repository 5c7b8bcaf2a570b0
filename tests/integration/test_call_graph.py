"""``FunctionCall.get_call_graph()`` end to end: calls made from inside containers (over
their channels) form a tree of Modal's ``InputInfo``, with Modal's statuses; cancelling a
call cancels the calls made below it, recursively; a container reads the graphs of its
own app's calls only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from apps import call_graph as app_module
from conftest import wait_until

import strato
from strato import exceptions as exc
from strato.call_graph import InputInfo, InputStatus


@pytest.fixture(scope="module")
def running(strato_server):
    strato_server.activate()
    with app_module.app.run(quiet=True):
        yield app_module.app


def _marker(name: str) -> str:
    return os.path.join(tempfile.mkdtemp(prefix="strato-graph-"), name)


def _shape(info: InputInfo) -> tuple:
    return (info.function_name, info.status, [_shape(c) for c in info.children])


def test_the_graph_is_the_tree_of_calls_made_from_containers(running):
    call = app_module.top.spawn(3)
    assert call.get(timeout=180) == 2 * 3 + 2 * 4 + 1
    graph = call.get_call_graph()
    assert [_shape(i) for i in graph] == [
        (
            "top",
            InputStatus.SUCCESS,
            [
                (
                    "middle",
                    InputStatus.SUCCESS,
                    [("leaf", InputStatus.SUCCESS, []), ("leaf", InputStatus.SUCCESS, [])],
                )
            ],
        )
    ]
    (root,) = graph
    assert root.function_call_id == call.object_id
    assert root.module_name == app_module.__name__
    assert root.task_id.startswith("ct-")  # the container that ran it
    middle = root.children[0]
    leaves = middle.children
    assert len({root.function_call_id, middle.function_call_id}) == 2
    assert len({leaf.function_call_id for leaf in leaves}) == 2  # .remote() then .spawn()
    assert all(leaf.input_id and leaf.task_id for leaf in leaves)
    # the .aio twin answers the same
    import asyncio

    again = asyncio.run(call.get_call_graph.aio())
    assert [_shape(i) for i in again] == [_shape(i) for i in graph]


def test_a_failed_child_shows_as_failure_under_its_failed_parent(running):
    call = app_module.top_of_failure.spawn(2)
    with pytest.raises(ValueError, match="leaf failed on 2"):
        call.get(timeout=180)
    assert [_shape(i) for i in call.get_call_graph()] == [
        ("top_of_failure", InputStatus.FAILURE, [("fails", InputStatus.FAILURE, [])])
    ]


def test_cancelling_a_call_cancels_the_calls_below_it_recursively(running):
    marker = _marker("grandchild")
    call = app_module.holds.spawn(marker, 600.0)
    wait_until(lambda: Path(marker).exists() and Path(marker).read_text(), 120, marker)
    graph = call.get_call_graph()  # the grandchild runs: every level is pending
    assert [_shape(i) for i in graph] == [
        (
            "holds",
            InputStatus.PENDING,
            [("waits", InputStatus.PENDING, [("sleeper", InputStatus.PENDING, [])])],
        )
    ]
    child = graph[0].children[0]
    grandchild = child.children[0]
    call.cancel()
    for below in (child, grandchild):
        with pytest.raises(exc.InputCancellation):
            strato.FunctionCall.from_id(below.function_call_id).get(timeout=120)
    assert [_shape(i) for i in call.get_call_graph()] == [
        (
            "holds",
            InputStatus.TERMINATED,
            [("waits", InputStatus.TERMINATED, [("sleeper", InputStatus.TERMINATED, [])])],
        )
    ]


def test_a_container_reads_its_own_calls_graph_only(running):
    out = app_module.own_graph.remote(5)
    assert out["roots"] == [("own_graph", "PENDING")]  # it is running: it asks
    assert out["children"] == [("leaf", "SUCCESS")]
    assert out["other"] == "NotFoundError"


def test_an_unknown_calls_graph_is_not_found(running):
    with pytest.raises(exc.NotFoundError):
        strato.FunctionCall.from_id("fc-does-not-exist").get_call_graph()
