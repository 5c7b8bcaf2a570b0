"""While a run follows its logs, container lines (printed by the follower thread) and the
local entrypoint's prints never share a line: ``print`` writes text and newline in two
calls, so another thread's line could land between them."""

from __future__ import annotations

import io
import sys
import threading

from strato.client import console


def _in_thread(fn) -> None:
    t = threading.Thread(target=fn)
    t.start()
    t.join()


def test_a_line_from_another_thread_waits_for_the_newline(monkeypatch):
    raw = io.StringIO()
    monkeypatch.setattr(sys, "stdout", raw)
    with console.whole_lines():
        sys.stdout.write("RESULT 49")  # print's first write; its "\n" comes next
        _in_thread(lambda: print("[ct-1] line 000007", flush=True))
        sys.stdout.write("\n")
    assert raw.getvalue().splitlines() == ["[ct-1] line 000007", "RESULT 49"]
    assert sys.stdout is raw


def test_partial_lines_are_written_on_flush_and_at_the_end(monkeypatch):
    raw = io.StringIO()
    monkeypatch.setattr(sys, "stdout", raw)
    with console.whole_lines():
        print("50%", end="\r", flush=True)  # a progress bar shows when flushed
        assert raw.getvalue() == "50%\r"
        _in_thread(lambda: sys.stdout.write("left without a newline"))
        assert raw.getvalue() == "50%\r"
    assert raw.getvalue() == "50%\rleft without a newline"  # nothing lost


def test_a_stream_replaced_inside_the_block_is_left_alone(monkeypatch):
    raw, other = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", raw)
    with console.whole_lines():
        sys.stdout = other
    assert sys.stdout is other
