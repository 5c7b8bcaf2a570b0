"""The terminal of a run: container lines printed by the log follower and the local
entrypoint's own prints share stdout, from different threads. ``print`` writes its text and
its newline in two calls, so without care a container line can land in the middle of a
local one (``RESULT 49[ct-1f] line 7``). While a run follows its logs, stdout and stderr
hold each thread's text until a newline and write whole lines under one lock."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO

_lock = threading.Lock()  # one lock for both streams: they often share a terminal
# the tag of the container line being redrawn in place on the terminal (a progress bar),
# None when the cursor is at the start of a line
_redrawing: str | None = None


def _end_redraw(raw: TextIO) -> None:
    """Keep the progress bar drawn as it is: what comes next starts on a new line."""
    global _redrawing
    if _redrawing is not None:
        raw.write("\n")
        _redrawing = None


def container_line(out: TextIO, tag: str, text: str) -> None:
    """Print a container's line, ``tag`` before it. A line ending in ``\r`` (a progress
    bar redrawing itself) is drawn in place on a terminal, and its container's next line
    (the bar's last state) over it; any other line starts below it. Elsewhere (a file, a
    pipe) each redraw is a line of its own."""
    global _redrawing
    redraw = text.endswith("\r")
    text = text.rstrip("\r")
    if not out.isatty():
        print(f"{tag}{text}", file=out, flush=True)
        return
    raw = out.raw if isinstance(out, WholeLines) else out
    with _lock:
        if _redrawing == tag:
            raw.write("\r\x1b[K")
            _redrawing = None
        else:
            _end_redraw(raw)
        raw.write(f"{tag}{text}" if redraw else f"{tag}{text}\n")
        if redraw:
            _redrawing = tag
        raw.flush()


class WholeLines:
    """A text stream that writes each thread's output to ``raw`` one whole line at a time.

    A partial line waits for its newline, or for an explicit ``flush()`` (a progress bar
    drawn with ``end="\\r"``/``flush=True`` still shows)."""

    def __init__(self, raw: TextIO) -> None:
        self.raw = raw
        self._pending: dict[int, str] = {}  # thread id -> its partial line

    def write(self, text: str) -> int:
        me = threading.get_ident()
        with _lock:
            held = self._pending.pop(me, "") + text
            whole, newline, rest = held.rpartition("\n")
            if newline:
                _end_redraw(self.raw)
                self.raw.write(whole + newline)
            if rest:
                self._pending[me] = rest
        return len(text)

    def flush(self) -> None:
        with _lock:
            rest = self._pending.pop(threading.get_ident(), "")
            if rest:
                _end_redraw(self.raw)
                self.raw.write(rest)
            self.raw.flush()

    def close_lines(self) -> None:
        """Write every thread's partial line (the run is over)."""
        with _lock:
            _end_redraw(self.raw)
            for rest in self._pending.values():
                self.raw.write(rest)
            self._pending.clear()
            self.raw.flush()

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, buffer ...
        return getattr(self.raw, name)


@contextlib.contextmanager
def whole_lines() -> Iterator[None]:
    """Make ``sys.stdout`` and ``sys.stderr`` write whole lines for the block; a stream
    that someone else replaced meanwhile is left as they set it."""
    saved = sys.stdout, sys.stderr
    wrapped = WholeLines(sys.stdout), WholeLines(sys.stderr)
    sys.stdout, sys.stderr = wrapped
    try:
        yield
    finally:
        for stream in wrapped:
            stream.close_lines()
        if sys.stdout is wrapped[0]:
            sys.stdout = saved[0]
        if sys.stderr is wrapped[1]:
            sys.stderr = saved[1]
