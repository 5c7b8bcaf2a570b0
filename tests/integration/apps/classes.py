"""Test app: classes, lifecycle hooks, input concurrency and dynamic batching."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import strato

app = strato.App("test-classes")
MARKS = os.environ.get("TEST_MARKS", "/tmp")  # where @exit leaves its marks


@app.cls(scaledown_window=2, env={"TEST_MARKS": MARKS})
class Model:
    variant: str = strato.parameter(default="small")
    scale: int = strato.parameter(default=1)

    @strato.enter()
    def load(self):
        self.loaded_at = time.time()
        self.weights = {"small": 1, "big": 10}[self.variant] * self.scale
        self.enters = getattr(self, "enters", 0) + 1

    @strato.method()
    def predict(self, x):
        return {
            "value": x * self.weights,
            "container": os.environ.get("STRATO_CONTAINER_ID", "local"),
            "enters": self.enters,
            "variant": self.variant,
        }

    @strato.method()
    def countdown(self, n):
        yield from range(n, 0, -1)

    @strato.exit()
    def close(self):
        with open(os.path.join(MARKS, f"exit-{os.environ['STRATO_CONTAINER_ID']}"), "w") as f:
            f.write(self.variant)


@app.cls()
class Broken:
    @strato.enter()
    def load(self):
        raise RuntimeError("weights are missing")

    @strato.method()
    def predict(self, x):
        return x


@app.function()
@strato.concurrent(max_inputs=8)
def overlapping(i: int) -> tuple[float, float, int]:
    start = time.time()
    time.sleep(0.3)
    return start, time.time(), threading.get_ident()


@app.function()
@strato.concurrent(max_inputs=8)
async def overlapping_async(i: int) -> tuple[float, float]:
    start = time.time()
    await asyncio.sleep(0.3)
    return start, time.time()


@app.function()
@strato.batched(max_batch_size=5, wait_ms=300)
def double_batch(xs: list[int]) -> list:
    return [ValueError(f"odd batch item {x}") if x == 13 else (x * 2, len(xs)) for x in xs]
