"""Test app: the everyday surface that code ported from Modal relies on."""

from __future__ import annotations

import sys
import threading
import time

import strato

app = strato.App("strato-test-surface")
logs_app = strato.App("strato-test-surface-logs")


@app.function()
def scaled(x: int, *, factor: int = 1, offset: int = 0) -> int:
    return x * factor + offset


@app.function()
def pair(a: int, b: int, *, sep: str = "-") -> str:
    return f"{a}{sep}{b}"


@app.function()
def maybe_fail(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd: {x}")
    return x


@app.function()
def sleep_then(delay: float, value: str) -> str:
    time.sleep(delay)
    return value


@app.function()
def where() -> dict:
    return {
        "is_local": strato.is_local(),
        "input_id": strato.current_input_id(),
        "call_id": strato.current_function_call_id(),
    }


@app.function()
def nested() -> int:
    # a call from inside a container (over its channel)
    return scaled.remote(2)


@app.function()
def progress(steps: int, hold_s: float) -> str:
    # a progress bar as tqdm draws it: each redraw starts with "\r", no newline
    for i in range(1, steps + 1):
        sys.stderr.write(f"\rsurface-progress {i}/{steps}")
        sys.stderr.flush()
    time.sleep(hold_s)  # the line stays open: only the redraw itself can show it
    sys.stderr.write("\n")
    return "done"


@app.cls(max_containers=1)
class Batcher:
    @strato.batched(max_batch_size=4, wait_ms=500)
    def double(self, xs: list[int]) -> list[tuple[int, int]]:
        return [(x * 2, len(xs)) for x in xs]


@app.cls(max_containers=1)
class Together:
    @strato.enter()
    def setup(self) -> None:
        self.barrier = threading.Barrier(3, timeout=60)

    @strato.concurrent(max_inputs=3)
    def meet(self, i: int) -> dict:
        # three inputs pass the barrier only when one container runs them at once
        self.barrier.wait()
        return {"i": i, "input_id": strato.current_input_id()}


@logs_app.function()
def say(text: str) -> str:
    print(f"said {text}", flush=True)
    return text
