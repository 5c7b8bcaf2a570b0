"""``strato.Queue``: a durable, distributed FIFO queue kept by the control plane (Modal's
``modal.Queue``).

Items are any object cloudpickle can pickle, up to 1 MiB each. A Queue has named
partitions (``partition=``, keys of 1 to 64 bytes; ``None`` is the default one), each FIFO
with up to 5,000 items, up to 100,000 per Queue; a partition is deleted
``partition_ttl`` seconds after its last put. Each item goes to exactly one ``get``. A
blocked ``get`` (or a ``put`` into a full partition) waits on the control plane, which
answers as soon as an item (or room) comes. Every method has an ``.aio`` twin.
"""

from __future__ import annotations

import itertools
import os
import queue as _stdlib_queue
import secrets
import time
from collections.abc import Iterator
from typing import Any

from strato import exceptions as exc
from strato.client import session
from strato.client.serialization import deserialize
from strato.protocol import messages as m

from .aio import with_aio
from .dict import StateObject, _Ephemeral, dumps, limits

__all__ = ["Queue"]

POLL_S = 50.0  # the longest one request waits on the control plane (it allows 55 s)


class _RequestIds:
    """Request ids unique to this process (a random prefix, a counter): no syscall each,
    as ``uuid4`` costs one; a forked child draws its own prefix."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = secrets.token_hex(10)
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):012x}"


_request_id = _RequestIds()


def _partition(partition: object) -> str:
    if partition is None:
        return ""
    if not isinstance(partition, str):
        raise exc.InvalidError(
            f"a Queue partition key must be a str, not {type(partition).__name__}"
        )
    try:
        size = len(partition.encode())
    except UnicodeEncodeError:
        raise exc.InvalidError(
            f"partition key {partition[:80]!r} is not valid Unicode text"
        ) from None
    if not 1 <= size <= m.QUEUE_PARTITION_KEY_MAX_BYTES:
        raise exc.InvalidError(
            f"partition key {partition[:80]!r} is {size} bytes: a partition key must be 1 "
            f"to {m.QUEUE_PARTITION_KEY_MAX_BYTES} bytes"
        )
    return partition


def _timeout(timeout: float | None) -> float | None:
    if timeout is not None and not timeout >= 0:
        raise exc.InvalidError(f"timeout={timeout!r}: use None (no limit) or seconds >= 0")
    return timeout


class Queue(StateObject):
    """A durable FIFO queue: ``q.put(v)``, ``q.get()``, ``q.put_many(vs)``,
    ``q.get_many(n)``, ``q.len()``, ``q.clear()``, ``q.iterate()``, with ``partition=``."""

    _kind = "Queue"
    _base = "/queues"

    @classmethod
    def ephemeral(cls) -> _Ephemeral[Queue]:
        """A Queue that lives for a ``with`` block (or ``async with``)."""
        return _Ephemeral(cls, None)

    @staticmethod
    def validate_partition_key(partition: str | None) -> bytes:
        return _partition(partition).encode()

    # ------------------------------------------------------------------ put

    @with_aio
    def put(
        self,
        v: Any,
        block: bool = True,
        timeout: float | None = None,
        *,
        partition: str | None = None,
        partition_ttl: int = 24 * 3600,
    ) -> None:
        """Add ``v`` to the end of the partition. When the partition is full (5,000
        items): wait for room (up to ``timeout``) if ``block``, then raise ``queue.Full``."""
        self.put_many([v], block, timeout, partition=partition, partition_ttl=partition_ttl)

    @with_aio
    def put_many(
        self,
        vs: list[Any],
        block: bool = True,
        timeout: float | None = None,
        *,
        partition: str | None = None,
        partition_ttl: int = 24 * 3600,
    ) -> None:
        """Add every item of ``vs``, in order, at once (all or none)."""
        part = _partition(partition)
        timeout = _timeout(timeout)
        if not 0 < partition_ttl <= m.QUEUE_MAX_TTL_S:
            raise exc.InvalidError(
                f"partition_ttl={partition_ttl!r}: use seconds from 1 to {m.QUEUE_MAX_TTL_S}"
            )
        vs = list(vs)
        if len(vs) > m.QUEUE_PARTITION_MAX_ITEMS:
            raise exc.InvalidError(
                f"put_many of {len(vs)} items: a partition holds at most "
                f"{m.QUEUE_PARTITION_MAX_ITEMS:,} items"
            )
        items = []
        for i, v in enumerate(vs):
            data = dumps(v, f"item {i} of the Queue put,", None)
            if len(data) > m.QUEUE_ITEM_MAX_BYTES:
                raise exc.RequestSizeError(
                    f"Queue item {i} pickles to {len(data)} bytes, over the limit of 1 MiB "
                    f"({m.QUEUE_ITEM_MAX_BYTES} bytes) per item: put large data in a Dict or "
                    "a Volume and queue its key"
                )
            items.append(data)
        if not items:
            return
        client = session.api()
        total = sum(map(len, items))
        limit = limits(client)["max_payload_bytes"]
        if total > limit:
            raise exc.RequestSizeError(
                f"put_many of {len(items)} items pickles to {total} bytes, over the control "
                f"plane's limit of {limit} bytes for one request (STRATO_MAX_PAYLOAD): put "
                "fewer items at once"
            )
        path = self._path("put")
        deadline = None if timeout is None else time.monotonic() + timeout
        request_id = _request_id()  # sent again after a lost answer: put only once
        while True:
            wait = 0.0 if not block else _left(deadline)
            body = m.QueuePut(items, part, float(partition_ttl), wait, request_id)
            got = client.call("POST", path, body, m.QueuePutResult, timeout=wait + 30)
            if got.ok:
                return
            if not block or (deadline is not None and time.monotonic() >= deadline):
                raise _stdlib_queue.Full(got.reason)

    # ------------------------------------------------------------------ get

    def _get(
        self, n: int, block: bool, timeout: float | None, partition: str | None
    ) -> list[bytes] | None:
        """Up to ``n`` items; [] when not blocking and there are none; None on timeout."""
        part = _partition(partition)
        timeout = _timeout(timeout)
        client = session.api()
        path = self._path("get")
        deadline = None if timeout is None else time.monotonic() + timeout
        request_id = _request_id()  # sent again after a lost answer: the same items
        while True:
            wait = 0.0 if not block else _left(deadline)
            body = m.QueueGet(n, part, wait, request_id)
            got = client.call("POST", path, body, m.QueueItems, timeout=wait + 30)
            if got.items or not block:
                return got.items
            if deadline is not None and time.monotonic() >= deadline:
                return None

    @with_aio
    def get(
        self, block: bool = True, timeout: float | None = None, *, partition: str | None = None
    ) -> Any:
        """Remove and return the first item. If the partition is empty: wait for an item
        (up to ``timeout``, then raise ``queue.Empty``) if ``block``, else return None."""
        items = self._get(1, block, timeout, partition)
        if items is None:
            raise _stdlib_queue.Empty()
        if not items:
            return None
        return deserialize(items[0], "a Queue item")

    @with_aio
    def get_many(
        self,
        n_values: int,
        block: bool = True,
        timeout: float | None = None,
        *,
        partition: str | None = None,
    ) -> list[Any]:
        """Remove and return up to ``n_values`` items (those there are, at least one if
        ``block``: waits for one up to ``timeout``, then raises ``queue.Empty``)."""
        if not isinstance(n_values, int) or n_values < 1:
            raise exc.InvalidError(f"n_values={n_values!r}: use a whole number >= 1")
        items = self._get(min(n_values, m.QUEUE_PARTITION_MAX_ITEMS), block, timeout, partition)
        if items is None:
            raise _stdlib_queue.Empty()
        return [deserialize(d, "a Queue item") for d in items]

    # ------------------------------------------------------------------ the rest

    @with_aio
    def len(self, *, partition: str | None = None, total: bool = False) -> int:
        """How many items the partition holds (``total``: the whole Queue)."""
        if partition is not None and total:
            raise exc.InvalidError("Queue.len: pass partition= or total=True, not both")
        params = {"partition": _partition(partition), "total": int(total)}
        return session.api().call("GET", self._path("len"), None, m.StateCount, params=params).n

    @with_aio
    def clear(self, *, partition: str | None = None, all: bool = False) -> None:  # noqa: A002
        """Remove the partition's items (``all``: every partition's)."""
        if partition is not None and all:
            raise exc.InvalidError("Queue.clear: pass partition= or all=True, not both")
        body = m.QueueClear(_partition(partition), all)
        session.api().call("POST", self._path("clear"), body)

    @with_aio
    def iterate(
        self, *, partition: str | None = None, item_poll_timeout: float = 0.0
    ) -> Iterator[Any]:
        """Yield the partition's items without removing them; at the end, wait up to
        ``item_poll_timeout`` for another before stopping."""
        part = _partition(partition)
        wait_s = _timeout(item_poll_timeout) or 0.0
        client = session.api()
        path = self._path("items")
        after = 0
        while True:
            deadline = time.monotonic() + wait_s
            while True:
                wait = max(0.0, min(deadline - time.monotonic(), POLL_S))
                got = client.call(
                    "GET",
                    path,
                    None,
                    m.QueueItems,
                    params={"partition": part, "after": after, "timeout": wait},
                    timeout=wait + 30,
                )
                if got.items or time.monotonic() >= deadline:
                    break
            if not got.items:
                return
            after = got.cursor
            for data in got.items:
                yield deserialize(data, "a Queue item")


def _left(deadline: float | None) -> float:
    if deadline is None:
        return POLL_S
    return max(0.0, min(deadline - time.monotonic(), POLL_S))
