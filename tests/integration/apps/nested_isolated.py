"""Test app: nested calls from isolated containers in a Debian image (bwrap and gVisor),
with no network at all: the calls go over each container's channel."""

from __future__ import annotations

import importlib.util
import socket

import strato

app = strato.App("test-nested-isolated", image=strato.Image.debian_slim())
RUNTIMES = ("bwrap", "gvisor")


@app.function(runtime="bwrap", block_network=True)
def square(x: int) -> int:
    return x * x


def _caller(x: int) -> dict:
    try:  # no network: not even the host's loopback
        socket.create_connection(("127.0.0.1", 22), timeout=1).close()
        network = "reachable"
    except OSError as e:
        network = type(e).__name__
    return {
        "remote": square.remote(x),
        "map": list(square.map(range(3))),
        "server_deps": [
            m for m in ("sqlalchemy", "uvicorn", "fastapi") if importlib.util.find_spec(m)
        ],
        "network": network,
    }


callers = {
    rt: app.function(runtime=rt, block_network=True, name=f"caller_{rt}")(_caller)
    for rt in RUNTIMES
}
