"""Test app: functions that call functions from inside their containers."""

from __future__ import annotations

import asyncio
import os
import time

import strato
from strato import exceptions as exc
from strato.client import session

app = strato.App("test-nested")
other = strato.App("test-nested-other")  # another app: out of the containers' reach


@app.function()
def square(x: int) -> int:
    return x * x


@app.function()
def add(a: int, b: int) -> int:
    return a + b


@app.function()
def count(n: int):
    yield from range(n)


@app.function()
def fails(x: int) -> int:
    raise ValueError(f"child failed on {x}")


@app.function()
def slow(marker: str, seconds: float) -> int:
    # tells the test it runs (its pid, so the test can kill it), then takes a while
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


@app.cls()
class Scaler:
    factor: int = strato.parameter(default=2)

    @strato.enter()
    def setup(self) -> None:
        # a nested call from @enter works too
        self.base = add.remote(100, 0)

    @strato.method()
    def scale(self, x: int) -> int:
        return self.base + self.factor * x


@app.function()
def every_form(n: int) -> dict:
    """Each call form of the SDK, from inside a container."""
    out: dict = {}
    out["remote"] = square.remote(3)
    out["map"] = list(square.map(range(n)))
    out["starmap"] = list(add.starmap([(1, 2), (3, 4)]))
    call = square.spawn(5)
    out["spawn"] = call.get(timeout=60)
    out["from_id"] = strato.FunctionCall.from_id(call.object_id).get(timeout=60)
    out["spawn_map"] = square.spawn_map(range(3)).object_id.startswith("fc-")
    out["gen"] = list(count.remote_gen(3))
    out["from_name"] = strato.Function.from_name(app.name, "square").remote(6)
    out["cls"] = Scaler(factor=3).scale.remote(1)
    out["cls_from_name"] = strato.Cls.from_name(app.name, "Scaler")().scale.remote(2)
    out["lookup"] = strato.App.lookup(app.name).app_id is not None
    out["aio"] = asyncio.run(square.remote.aio(7))
    out["input_id"] = strato.current_input_id()
    out["call_id"] = strato.current_function_call_id()
    return out


@app.function()
def reverse(data: bytes) -> bytes:
    return data[::-1]


@app.function()
def large_values(n: int) -> bool:
    # an argument and a result over the blob threshold: chunked over the channel
    data = os.urandom(n)
    return reverse.remote(data) == data[::-1]


@app.function()
def parent_of_failure(x: int) -> int:
    return fails.remote(x)


@app.function()
def catches_child_failure(x: int) -> str:
    try:
        fails.remote(x)
    except ValueError as e:  # the child's own exception type
        return f"caught {type(e).__name__}: {e}"
    return "no error"


@app.function()
def waits_on(marker: str, seconds: float) -> int:
    return slow.remote(marker, seconds)


@app.function()
def spawns_children(marker: str, n: int) -> list[str]:
    calls = [slow.spawn(f"{marker}-{i}", 600.0) for i in range(n)]
    ids = [c.object_id for c in calls]
    with open(marker, "w") as f:
        f.write(",".join(ids))
    for c in calls:
        c.get()
    return ids


@app.function()
def probe(other_app_id: str, other_call_id: str, other_function_id: str) -> dict:
    """What this container's credential reaches: each attempt's error type, or 'ok'."""
    api = session.api()
    attempts = {
        "stop own app": ("POST", f"/apps/{os.environ['STRATO_APP_ID']}/stop"),
        "list apps": ("GET", "/apps"),
        "own logs": ("GET", f"/apps/{os.environ['STRATO_APP_ID']}/logs"),
        "nodes": ("GET", "/nodes"),
        "containers": ("GET", "/containers"),
        "create app": ("POST", "/apps"),
        "autoscaler": ("POST", f"/functions/{other_function_id}/autoscaler"),
        "other app": ("GET", f"/apps/{other_app_id}"),
        "other app's function": ("GET", f"/apps/{other_app_id}/functions/echo"),
        "other app's call": ("GET", f"/calls/{other_call_id}/outputs"),
        "other app's call status": ("GET", f"/calls/{other_call_id}"),
        "cancel other app's call": ("POST", f"/calls/{other_call_id}/cancel"),
        "other app's stats": ("GET", f"/functions/{other_function_id}/stats"),
        "own app": ("GET", f"/apps/{os.environ['STRATO_APP_ID']}"),
    }
    out = {}
    for name, (method, path) in attempts.items():
        try:
            api.request_raw(method, path, b"\x80" if method == "POST" else None)
            out[name] = "ok"
        except exc.Error as e:
            out[name] = type(e).__name__
    try:
        strato.Function.from_name("test-nested-other", "echo").remote("x")
        out["call other app"] = "ok"
    except exc.Error as e:
        out["call other app"] = type(e).__name__
    out["token"] = any("TOKEN" in k and "CONTAINER" not in k for k in os.environ)
    return out


@app.function()
@strato.fastapi_endpoint()
def web_square(x: int = 2) -> dict:
    # a sync endpoint (FastAPI runs it on a thread) calls a function
    return {"square": square.remote(x), "url": web_square.get_web_url()}


@app.function()
@strato.fastapi_endpoint()
async def web_square_async(x: int = 2) -> dict:
    # an async endpoint awaits the call's .aio twin
    return {"square": await square.remote.aio(x), "calls": list(await _gather(x))}


async def _gather(x: int):
    return await asyncio.gather(add.remote.aio(x, 1), add.remote.aio(x, 2))


@other.function()
def echo(x: str) -> str:
    return x


@other.function()
def hold(seconds: float) -> str:
    time.sleep(seconds)
    return "held"
