"""Test app: functions whose calls make calls, for ``FunctionCall.get_call_graph()``."""

from __future__ import annotations

import os
import time

import strato
from strato import exceptions as exc

app = strato.App("test-call-graph")


@app.function()
def leaf(x: int) -> int:
    return 2 * x


@app.function()
def fails(x: int) -> int:
    raise ValueError(f"leaf failed on {x}")


@app.function()
def middle(x: int) -> int:
    """A .remote() and a .spawn() of ``leaf``: two calls, in that order."""
    a = leaf.remote(x)
    b = leaf.spawn(x + 1)
    return a + b.get(timeout=120)


@app.function()
def top(x: int) -> int:
    return middle.remote(x) + 1


@app.function()
def top_of_failure(x: int) -> int:
    return fails.remote(x)


@app.function()
def sleeper(marker: str, seconds: float) -> int:
    with open(marker, "w") as f:  # tells the test it runs
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return 0


@app.function()
def waits(marker: str, seconds: float) -> int:
    """A child that waits on a grandchild that sleeps."""
    return sleeper.remote(marker, seconds)


@app.function()
def holds(marker: str, seconds: float) -> int:
    """A parent whose child (``waits``) waits on its own child (``sleeper``)."""
    return waits.remote(marker, seconds)


@app.function()
def own_graph(x: int) -> dict:
    """Reads its own call's graph from inside its container, and tries another's."""
    leaf.remote(x)
    me = strato.FunctionCall.from_id(strato.current_function_call_id() or "")
    graph = me.get_call_graph()
    out: dict = {
        "roots": [(i.function_name, i.status.name) for i in graph],
        "children": [(c.function_name, c.status.name) for c in graph[0].children],
    }
    try:
        strato.FunctionCall.from_id("fc-not-this-apps").get_call_graph()
        out["other"] = "ok"
    except exc.Error as e:
        out["other"] = type(e).__name__
    return out
