"""Test app: autoscaling limits."""

from __future__ import annotations

import time

import strato

app = strato.App("test-scaling")


@app.function(max_containers=8, scaledown_window=2)
def half_second(i: int) -> int:
    time.sleep(0.5)
    return i


@app.function(scaledown_window=2)
def quick(i: int) -> int:
    return i
