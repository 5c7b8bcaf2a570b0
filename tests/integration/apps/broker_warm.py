"""A GPU function with a warm pool: the broker buys a node for it with no call made."""

import os

import strato

app = strato.App("broker-warm")


@app.function(gpu="L4", cpu=1, memory=256, min_containers=1, scaledown_window=2)
def warm() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")
