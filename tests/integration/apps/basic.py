"""Functions that work: the calling surface of ``Function``."""

from __future__ import annotations

import asyncio
import os
import time

from stratotest_helpers import shout

import strato

app = strato.App("strato-test-basic")


@app.function()
def square(x: int) -> int:
    return x * x


@app.function()
def add(a: int, b: int = 10, *, scale: int = 1) -> int:
    return (a + b) * scale


@app.function()
def maybe_fail(x: int) -> int:
    if x % 3 == 0:
        raise ValueError(f"multiple of three: {x}")
    return x


@app.function()
def slow_identity(x: int, delay: float) -> int:
    time.sleep(delay)
    return x


@app.function()
def count_up(n: int):
    yield from (i * 10 for i in range(n))


@app.function()
def fail_midway(n: int):
    yield from range(n)
    raise RuntimeError(f"stopped after {n} items")


@app.function()
async def async_double(x: int) -> int:
    await asyncio.sleep(0.01)
    return 2 * x


@app.function()
async def async_count(n: int):
    for i in range(n):
        await asyncio.sleep(0)
        yield -i


@app.function()
def nbytes(data: bytes) -> int:
    return len(data)


@app.function()
def make_bytes(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(n % 256)


@app.function()
def record(path: str, value: str) -> str:
    with open(path, "a") as f:
        f.write(value + "\n")
    return value


@app.function()
def helper_shout(text: str) -> str:
    return shout(text)


@app.function()
def where_am_i() -> dict:
    import stratotest_helpers

    return {
        "container_id": os.environ.get("STRATO_CONTAINER_ID"),
        "in_container": os.environ.get("STRATO_IN_CONTAINER"),
        "module_file": os.path.abspath(__file__),
        "helper_file": os.path.abspath(stratotest_helpers.__file__),
    }


@app.function()
def sleep_then(seconds: float, value: str) -> str:
    time.sleep(seconds)
    return value


@app.function()
def printer(marker: str) -> str:
    print(f"stdout says {marker}", flush=True)
    import sys

    print(f"stderr says {marker}", file=sys.stderr, flush=True)
    return marker
