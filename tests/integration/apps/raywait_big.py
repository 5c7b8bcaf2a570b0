"""A function bigger than any Ray test node's strato share (0.5 CPU of a 1-CPU raylet): it
waits for Ray's autoscaler to add a node that fits (STRATO_RAY_AUTOSCALER_WAIT_S)."""

import strato

app = strato.App("strato-test-ray-wait")

CPU, MEMORY_MB = 1.0, 200


@app.function(cpu=CPU, memory=MEMORY_MB)
def double(x: int) -> int:
    return 2 * x
