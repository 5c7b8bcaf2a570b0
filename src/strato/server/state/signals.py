"""Wake-ups for blocked Queue calls, in the control plane's event loop.

A blocked ``get`` waits on its partition's signal; a ``put`` of k items pulses it as
soon as its write is queued (the writer runs writes in order, so a ``get`` queued after
that sees the items), waking k waiters, oldest first, not all of them: a hundred idle
consumers do not all query the store for one item. A waiter that takes items and leaves
some behind wakes the next (``Queues.get``); one woken and then cancelled passes its wake
on. A waiter reads the signal's ``version`` before it looks at the store and waits only
if nothing was pulsed since, so no wake-up is lost between the look and the wait.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

Key = tuple[str, str, str]  # (what is awaited: items, room or peek; queue id; partition)


class Signal:
    __slots__ = ("_waiters", "users", "version")

    def __init__(self) -> None:
        self.version = 0
        self.users = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def pulse(self, n: int | None = None) -> None:
        """Wake ``n`` waiters, oldest first (None: all of them)."""
        self.version += 1
        woken = 0
        while self._waiters and (n is None or woken < n):
            f = self._waiters.popleft()
            if not f.done():
                f.set_result(None)
                woken += 1

    async def wait(self, version: int, timeout: float) -> None:
        """Return when woken after ``version`` was read, or after ``timeout`` seconds."""
        if self.version != version or timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        f: asyncio.Future[None] = loop.create_future()
        self._waiters.append(f)
        timer = loop.call_later(timeout, _expire, f)
        try:
            await f
        except asyncio.CancelledError:
            if f.done() and not f.cancelled():
                self.pulse(1)  # woken, but gone: the wake goes to the next waiter
            raise
        finally:
            timer.cancel()


def _expire(f: asyncio.Future[None]) -> None:
    if not f.done():
        f.set_result(None)


class Signals:
    """Signals by key, kept only while someone waits on them."""

    def __init__(self) -> None:
        self._by_key: dict[Key, Signal] = {}

    def acquire(self, key: Key) -> Signal:
        sig = self._by_key.get(key)
        if sig is None:
            sig = self._by_key[key] = Signal()
        sig.users += 1
        return sig

    def release(self, key: Key, sig: Signal) -> None:
        sig.users -= 1
        if sig.users <= 0 and self._by_key.get(key) is sig:
            del self._by_key[key]

    def pulse(self, key: Key, n: int | None = None) -> None:
        sig = self._by_key.get(key)
        if sig is not None:
            sig.pulse(n)

    def pulse_where(self, match: Callable[[Key], bool]) -> None:
        """Wake every waiter of every signal whose key ``match(key)`` accepts."""
        for key, sig in list(self._by_key.items()):
            if match(key):
                sig.pulse()

    def __len__(self) -> int:
        return len(self._by_key)
