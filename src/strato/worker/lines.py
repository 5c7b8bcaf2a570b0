"""Splitting a container's output into the lines the worker ships.

A line ends with ``\\n``. A segment ended by ``\\r`` (a progress bar such as tqdm redrawing
its line) is a line too, shipped as soon as it ends with its ``\\r`` kept, so the client
redraws it in place instead of getting the whole bar as one line when the program ends.
A partial line that waits too long is shipped the same way (with a ``\\r``: the whole line
follows once it ends)."""

from __future__ import annotations

import codecs

REDRAW = "\r"  # the mark, at the end of a shipped line, of a line the next one redraws


class LineSplitter:
    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""
        self.partial_shown = False  # the pending text went out already (``partial()``)

    @property
    def pending(self) -> str:
        return self._pending

    def feed(self, data: bytes) -> list[str]:
        """The lines ``data`` completes (``\\r``-ended ones keep their ``\\r``)."""
        self._pending += self._decoder.decode(data)
        return self._split()

    def _split(self) -> list[str]:
        out: list[str] = []
        text = self._pending
        start = 0
        n = len(text)
        while True:
            i = _first_break(text, start)
            if i < 0:
                break
            if text[i] == "\r":
                if i + 1 == n:
                    break  # maybe the first half of "\r\n": decided by the next bytes
                if text[i + 1] == "\n":
                    out.append(text[start:i])
                    start = i + 2
                else:
                    if i > start:  # tqdm starts each redraw with "\r": nothing before it
                        out.append(text[start:i] + REDRAW)
                    start = i + 1
            else:
                out.append(text[start:i])
                start = i + 1
            self.partial_shown = False
        self._pending = text[start:]
        while len(self._pending) > self.max_line:  # a line over the limit goes in pieces
            out.append(self._pending[: self.max_line])
            self._pending = self._pending[self.max_line :]
            self.partial_shown = False
        return [line[: self.max_line] for line in out]

    def partial(self) -> str | None:
        """The pending partial line to show now (it waited long enough), or None."""
        if not self._pending or self.partial_shown:
            return None
        if self._pending.endswith("\r"):  # a redraw that no "\n" followed: complete
            line, self._pending = self._pending, ""
            return line[: self.max_line]
        self.partial_shown = True
        return self._pending[: self.max_line] + REDRAW

    def close(self) -> list[str]:
        """What is left at the end of the stream."""
        self._pending += self._decoder.decode(b"", final=True)
        out = self._split()
        rest = self._pending.rstrip("\r")
        self._pending = ""
        if rest:
            out.append(rest[: self.max_line])
        return out


def _first_break(text: str, start: int) -> int:
    r = text.find("\r", start)
    n = text.find("\n", start)
    if r < 0:
        return n
    if n < 0:
        return r
    return min(r, n)
