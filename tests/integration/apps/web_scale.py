"""A web endpoint for scale-from-zero and autoscaling tests: one request per container
(no @concurrent), a short scale-down window, at most four containers."""

from __future__ import annotations

import os
import time

import strato

app = strato.App("web-scale")


@app.function(scaledown_window=2, max_containers=4)
@strato.fastapi_endpoint()
def work(seconds: float = 0.0) -> dict:
    time.sleep(seconds)
    return {"container": os.environ.get("STRATO_CONTAINER_ID")}
