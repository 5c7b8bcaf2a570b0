"""Access logs: one line per request in the app's logs (``strato app logs``).

Lines are batched (flushed every 100 ms or 500 lines) so that a busy endpoint costs the
store one insert per batch, not per request. Each carries the request id that the
response's ``x-strato-request-id`` header (and a gateway error's body) shows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from strato.protocol import messages as m

FLUSH_S = 0.1
FLUSH_LINES = 500
STREAM: m.LogStream = "access"


class AccessLog:
    def __init__(self, append: Callable[[str, list[m.LogLine]], None]) -> None:
        self._append = append
        self._buf: dict[str, list[m.LogLine]] = {}
        self._n = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, app_id: str, container_id: str, text: str) -> None:
        line = m.LogLine(time.time(), container_id, STREAM, text)
        lines = self._buf.get(app_id)
        if lines is None:
            lines = self._buf[app_id] = []
        lines.append(line)
        self._n += 1
        if self._n >= FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        buf, self._buf, self._n = self._buf, {}, 0
        for app_id, lines in buf.items():
            self._append(app_id, lines)
