"""Wake-ups for blocked Queue calls, in the control plane's event loop.

A blocked ``get`` waits on its partition's signal and a ``put`` pulses it as soon as its
write is queued (the writer runs writes in order, so a ``get`` queued after that sees the
item). A waiter reads the signal's ``version`` before it looks at the store and waits only
if nothing was pulsed since: no wake-up is lost between the look and the wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable


class Signal:
    __slots__ = ("event", "users", "version")

    def __init__(self) -> None:
        self.version = 0
        self.users = 0
        self.event = asyncio.Event()

    def pulse(self) -> None:
        self.version += 1
        event, self.event = self.event, asyncio.Event()
        event.set()

    async def wait(self, version: int, timeout: float) -> None:
        """Return when pulsed after ``version`` was read, or after ``timeout`` seconds."""
        if self.version != version or timeout <= 0:
            return
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            pass


class Signals:
    """Signals by key, kept only while someone waits on them."""

    def __init__(self) -> None:
        self._by_key: dict[Hashable, Signal] = {}

    def acquire(self, key: Hashable) -> Signal:
        sig = self._by_key.get(key)
        if sig is None:
            sig = self._by_key[key] = Signal()
        sig.users += 1
        return sig

    def release(self, key: Hashable, sig: Signal) -> None:
        sig.users -= 1
        if sig.users <= 0 and self._by_key.get(key) is sig:
            del self._by_key[key]

    def pulse(self, key: Hashable) -> None:
        sig = self._by_key.get(key)
        if sig is not None:
            sig.pulse()

    def pulse_where(self, match) -> None:
        """Pulse every signal whose key ``match(key)`` accepts (a deleted queue's)."""
        for key, sig in list(self._by_key.items()):
            if match(key):
                sig.pulse()

    def __len__(self) -> int:
        return len(self._by_key)
