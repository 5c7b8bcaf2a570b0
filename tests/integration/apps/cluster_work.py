"""Functions for the many-machines tests: quick inputs retried when their node dies, a
nested map, and a value large enough to travel in chunks through a relay."""

import time

import strato

app = strato.App("strato-test-cluster")


def expected(x: int) -> int:
    return 3 * x + 1


@app.function(
    retries=strato.Retries(max_retries=5, initial_delay=0.1, backoff_coefficient=1.0),
    max_containers=4,
    cpu=0.25,  # the tests' nodes offer 0.5 CPU: two containers each, so they spread
)
def work(x: int, sleep_s: float = 0.0) -> int:
    time.sleep(sleep_s)
    return expected(x)


@app.function()
def square(x: int) -> int:
    return x * x


@app.function()
def nested_sum(n: int) -> int:
    """Calls from inside a container (over its channel: relayed on a joined node)."""
    return sum(square.map(range(n))) + square.remote(n)


@app.function()
def big(n: int) -> bytes:
    return bytes(range(256)) * (n // 256)


@app.function()
def channel() -> str:
    import os

    return os.environ["STRATO_CHANNEL"]


@app.function(runtime="bwrap", block_network=True)
def sealed(x: int) -> dict:
    """No network at all, yet its channel (relayed on a joined node) works: a nested call."""
    import socket

    try:
        socket.create_connection(("10.211.1.1", 80), timeout=2).close()
        reached = True
    except OSError:
        reached = False
    return {"double": 2 * x, "nested": square.remote(x), "network": reached}
