"""Container logs: stored per app with a sequence number, and long-polled by clients.

Appending queues the rows for the store's writer and returns; a long-poll reads through
`Store.aread`, which runs after the writes queued before it (so it sees every line
appended before it asked) without blocking the event loop."""

from __future__ import annotations

import asyncio
import time

from strato.protocol import messages as m

from .store import Store


class LogHub:
    def __init__(self, store: Store) -> None:
        self.store = store
        _, _, max_seq = store.max_ids()
        self._seq = max_seq
        self._events: dict[str, asyncio.Event] = {}

    def append(self, app_id: str, lines: list[m.LogLine]) -> None:
        rows = []
        for line in lines:
            self._seq += 1
            rows.append(
                {
                    "seq": self._seq,
                    "app_id": app_id,
                    "ts": line.ts,
                    "container_id": line.container_id,
                    "stream": line.stream,
                    "text": line.text,
                }
            )
        self.store.add_logs(rows)
        ev = self._events.pop(app_id, None)
        if ev is not None:
            ev.set()

    def system(self, app_id: str, text: str, container_id: str = "-") -> None:
        self.append(app_id, [m.LogLine(time.time(), container_id, "system", text)])

    async def wait(self, app_id: str, after: int, timeout: float) -> m.LogBatch:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            ev = self._events.get(app_id)
            if ev is None:
                ev = self._events[app_id] = asyncio.Event()
            rows = await self.store.aread(self.store.logs_after, app_id, after)
            remaining = deadline - time.monotonic()
            if rows or remaining <= 0:
                lines = [
                    m.LogLine(r["ts"], r["container_id"], r["stream"], r["text"], r["seq"])
                    for r in rows
                ]
                return m.LogBatch(lines, lines[-1].seq if lines else after)
            try:
                await asyncio.wait_for(ev.wait(), remaining)
            except TimeoutError:
                pass
