"""A function whose containers fill a Ray test node's strato share (0.5 CPU) one each, so
that a map of it leaves work no node can place: the demand the ``ray`` provider reports
to Ray's autoscaler."""

import time

import strato

app = strato.App("strato-test-ray-demand")

CPU, MEMORY_MB, MAX_CONTAINERS = 0.5, 200, 5


@app.function(cpu=CPU, memory=MEMORY_MB, max_containers=MAX_CONTAINERS)
def hold(x: int, sleep_s: float) -> int:
    time.sleep(sleep_s)
    return x
