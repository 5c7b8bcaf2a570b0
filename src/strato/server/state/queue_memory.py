"""The items of recently used Queues, in the control plane's memory (event loop only).

With the store's journal, a Queue is loaded whole (its partitions, their items in order,
its recent request ids) by a read on the writer thread, which sees every write queued
before it; from then on every put and get of that Queue is decided here and journaled
(``Store.accept_queue_put``/``accept_queue_take``): durable when it returns, so it is
answered at once, the writer applying it behind in the same order. Anything else that
changes a Queue in the store (``clear``, a deletion, the expiry loop) first unloads it,
so the next put or get loads it again after the change.

Memory is bounded: the loaded Queues' items hold at most ``MEMORY_BYTES``; a Queue that
would pass it is not loaded (or unloaded) and served by the store for ``COLD_S``. Request
ids are remembered ``RECEIPT_MEMORY_S`` (far longer than a client resends; the store keeps
them longer still), at most ``RECEIPTS_MAX``: past that everything is served by the store
until the oldest one forgotten is that old."""

from __future__ import annotations

import time
from collections import deque

MEMORY_BYTES = 128 << 20  # the loaded Queues' items, in all
PART_BYTES = 256  # what an empty partition costs, counted as bytes
COLD_S = 10.0  # a Queue too big to load is served by the store this long
RECEIPT_MEMORY_S = 120.0  # how long a request id is remembered here
RECEIPTS_MAX = 500_000


class Part:
    __slots__ = ("expires_at", "items")

    def __init__(self, expires_at: float) -> None:
        self.items: deque[bytes] = deque()
        self.expires_at = expires_at


class Loaded:
    """One Queue's partitions (non-empty ones, expired ones until the expiry loop runs,
    as in the store)."""

    __slots__ = ("nbytes", "parts")

    def __init__(self) -> None:
        self.parts: dict[str, Part] = {}
        self.nbytes = 0


class QueueMemory:
    def __init__(self) -> None:
        self.budget = MEMORY_BYTES
        self.queues: dict[str, Loaded] = {}
        self.nbytes = 0
        self.changes = 0  # unloads so far: a load that saw one happen is not kept
        self._cold: dict[str, float] = {}  # queue id -> when it may be loaded again
        self._all_cold_until = 0.0
        # request id -> (queue id, when): a put or get carried out with it
        self._receipts: dict[str, tuple[str, float]] = {}

    # ------------------------------------------------------------------ loading

    def may_load(self, qid: str) -> bool:
        now = time.monotonic()
        if now < self._all_cold_until:
            return False
        until = self._cold.get(qid)
        if until is not None:
            if now < until:
                return False
            del self._cold[qid]
        return True

    def fits(self, nbytes: int) -> bool:
        return self.nbytes + nbytes <= self.budget

    def load(
        self,
        qid: str,
        parts: list[tuple[str, float]],
        items: list[tuple[str, bytes]],
        receipts: list[tuple[str, float]],
    ) -> Loaded | None:
        """Keep a Queue read from the store (``parts``: partition, expiry; ``items``:
        partition, data, in order; ``receipts``: request id, created at); None when it
        does not fit."""
        q = Loaded()
        for name, expires_at in parts:
            q.parts[name] = Part(expires_at)
        q.nbytes = PART_BYTES * len(parts)
        for name, data in items:
            part = q.parts.get(name)
            if part is not None:
                part.items.append(data)
                q.nbytes += len(data)
        if not self.fits(q.nbytes):
            self.cold(qid)
            return None
        self.queues[qid] = q
        self.nbytes += q.nbytes
        for rid, at in receipts:
            self._receipts.setdefault(rid, (qid, at))
        return q

    def cold(self, qid: str) -> None:
        """Unload a Queue and serve it from the store for a while."""
        self.unload(qid)
        self._cold[qid] = time.monotonic() + COLD_S

    def unload(self, qid: str) -> None:
        self.changes += 1
        q = self.queues.pop(qid, None)
        if q is not None:
            self.nbytes -= q.nbytes

    def unload_all(self) -> None:
        self.changes += 1
        self.queues.clear()
        self.nbytes = 0

    # ------------------------------------------------------------------ changes

    def added(self, q: Loaded, part: Part, items: list[bytes]) -> None:
        n = sum(map(len, items))
        if not part.items:
            n += PART_BYTES
        part.items.extend(items)
        q.nbytes += n
        self.nbytes += n

    def taken(self, q: Loaded, name: str, part: Part, k: int) -> list[bytes]:
        got = [part.items.popleft() for _ in range(k)]
        n = sum(map(len, got))
        if not part.items:
            del q.parts[name]
            n += PART_BYTES
        q.nbytes -= n
        self.nbytes -= n
        return got

    # ------------------------------------------------------------------ request ids

    def receipt(self, rid: str) -> str | None:
        """The Queue a request with this id was carried out on, if it was."""
        got = self._receipts.get(rid)
        return got[0] if got is not None else None

    def keep_receipt(self, rid: str, qid: str) -> None:
        if not rid:
            return
        now = time.time()
        self._receipts[rid] = (qid, now)
        while True:  # the oldest first (about: those loaded with a Queue come later)
            old = next(iter(self._receipts))
            at = self._receipts[old][1]
            if at >= now - RECEIPT_MEMORY_S and len(self._receipts) <= RECEIPTS_MAX:
                break
            del self._receipts[old]
            if at >= now - RECEIPT_MEMORY_S:  # forgotten too soon: the store answers for a while
                self.unload_all()
                self._all_cold_until = time.monotonic() + RECEIPT_MEMORY_S - (now - at)
