"""Test app: functions that use Dicts and Queues from inside their containers."""

from __future__ import annotations

import strato
from strato import exceptions as exc

app = strato.App("test-state-worker")


@app.function()
def consume(queue_name: str, dict_name: str, n: int) -> int:
    """Take ``n`` items with get_many (waiting for them) and record each in the Dict."""
    q = strato.Queue.from_name(queue_name)
    d = strato.Dict.from_name(dict_name)
    got: list[int] = []
    while len(got) < n:
        batch = q.get_many(50, timeout=60)
        d.update({x: x * x for x in batch})
        got += batch
    d["consumed"] = len(got)
    return len(got)


@app.function()
def ephemeral_round_trip() -> list:
    """Ephemeral objects made (and deleted) from inside a container."""
    with strato.Dict.ephemeral({"a": 1}) as d, strato.Queue.ephemeral() as q:
        q.put_many([1, 2, 3])
        return [d["a"], q.get_many(3), d.len()]


@app.function()
def try_admin(dict_name: str) -> list[str]:
    """What a container may not do with a Dict: delete a named one, list them all."""
    refused = []
    try:
        strato.Dict.delete(dict_name)
    except exc.AuthError as e:
        refused.append(f"delete: {e}")
    try:
        d = strato.Dict.from_name(dict_name)
        from strato.client import session

        session.api().call("DELETE", f"/dicts/{d.object_id}")
    except exc.AuthError as e:
        refused.append(f"delete by id: {e}")
    return refused


@app.function()
def drain(q: strato.Queue, d: strato.Dict) -> int:
    """Objects passed as arguments: the caller's Queue and Dict."""
    items = q.get_many(100, timeout=30)
    d["drained"] = items
    return len(items)


@app.function()
def large_value(d: strato.Dict) -> int:
    """A value over the blob threshold, written and read back from a container."""
    d["big"] = b"\x03" * (3 << 20)
    return len(d["big"])
