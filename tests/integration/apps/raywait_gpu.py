"""A GPU function for a Ray cluster whose nodes have no GPU: it waits for Ray's autoscaler
(STRATO_RAY_AUTOSCALER_WAIT_S), then fails with ResourceUnavailableError."""

import strato

app = strato.App("strato-test-ray-wait-gpu")


@app.function(gpu="H100", cpu=0.25, memory=100)
def on_gpu() -> str:
    return "ran"
