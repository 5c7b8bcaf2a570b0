"""Functions for the metrics and dashboard tests (tests/integration/test_metrics.py,
test_dashboard.py)."""

from __future__ import annotations

import os
import time

import strato

app = strato.App("strato-test-ops")


@app.function()
def double(x: int) -> int:
    print(f"doubling {x}", flush=True)
    return 2 * x


@app.function()
def explode(x: int) -> int:
    raise ValueError(f"exploded on {x}")


@app.function()
def chatter(marker: str, timeout: float = 60.0) -> str:
    """Prints a line, waits for ``marker`` to exist (the test's cue), prints another."""
    print("chatter: first line", flush=True)
    deadline = time.monotonic() + timeout
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"chatter: saw {os.path.basename(marker)}", flush=True)
    return "done"


@app.function()
@strato.fastapi_endpoint()
def hello(name: str = "world") -> dict:
    return {"hello": name}


# a second app, stopped from the dashboard by its test
stoppable = strato.App("strato-test-ops-stop")


@stoppable.function()
def ping() -> str:
    return "pong"
