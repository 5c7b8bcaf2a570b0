"""GPU work that reaches the broker without queued inputs: a buffer of containers, a web
endpoint's requests (tests/integration/test_broker_e2e.py)."""

import os
import time

import strato

app = strato.App("broker-demand")


@app.function(gpu="L4", cpu=1, memory=256, max_containers=3, scaledown_window=2)
def buffered(marker: str, seconds: float) -> str | None:
    """Writes ``marker`` when it starts, then sleeps ``seconds``."""
    with open(marker, "w") as f:
        f.write("running")
    time.sleep(seconds)
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@app.function(gpu="L4", cpu=1, memory=256, scaledown_window=2)
@strato.fastapi_endpoint()
def gpu_web() -> dict:
    return {"devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
