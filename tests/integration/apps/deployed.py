"""An app that the tests deploy, then call by name from other processes."""

import time

import strato

app = strato.App("strato-test-deployed")


@app.function()
def triple(x: int) -> int:
    return 3 * x


@app.function(timeout=60)
def slow_triple(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return 3 * x


@app.function(timeout=60)
def logged_triple(x: int, seconds: float, path: str) -> int:
    with open(path, "a") as f:
        f.write("started\n")
    time.sleep(seconds)
    return 3 * x
