"""A process's output as the control plane holds it: a bounded buffer per stream, read by
offset (a reader names how far it has read; what lies before is let go)."""

from __future__ import annotations

from collections import deque


class StreamBuffer:
    """One stream (stdout or stderr) of one process. Offsets count every byte the stream
    ever carried; ``start`` is the first still held, ``end`` the next to come."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self.start = 0
        self.end = 0
        self.eof = False
        self.paused = False  # the agent was told to stop reading it

    @property
    def held(self) -> int:
        return self.end - self.start

    def append(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self.end += len(data)

    def release(self, upto: int) -> None:
        """Let go of everything before offset ``upto`` (the reader has it)."""
        upto = min(upto, self.end)
        while self._chunks and self.start < upto:
            first = self._chunks[0]
            if self.start + len(first) <= upto:
                self._chunks.popleft()
                self.start += len(first)
            else:
                cut = upto - self.start
                self._chunks[0] = first[cut:]
                self.start = upto

    def read(self, after: int, limit: int) -> tuple[int, bytes]:
        """(offset, data): up to ``limit`` bytes from ``after`` (or from the first byte
        still held, if that is later), after letting go of what lies before ``after``."""
        self.release(after)
        offset = max(after, self.start)
        out: list[bytes] = []
        n = 0
        for chunk in self._chunks:
            if n >= limit:
                break
            take = chunk[: limit - n]
            out.append(take)
            n += len(take)
        return offset, b"".join(out)

    def done(self, offset: int) -> bool:
        """True when a reader at ``offset`` has read all the stream will ever carry."""
        return self.eof and offset >= self.end
