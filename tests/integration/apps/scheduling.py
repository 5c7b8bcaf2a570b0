"""Functions for scheduling tests, run on a control plane whose node declares 2 CPUs, one
H100 (device 0) and one T4 (device 1): ``STRATO_NODE_CPU=2``,
``STRATO_NODE_GPUS=H100:1,T4:1``."""

import os
import time

import strato

app = strato.App("strato-test-scheduling")


@app.function(gpu="H100")
def on_h100() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@app.function(gpu="A100-80GB")
def on_a100() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@app.function(gpu=["A100-80GB", "H100"])
def on_a100_or_h100() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@app.function(gpu="T4")
def on_t4() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@app.function(gpu="H100:2")
def on_two_h100() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@app.function()
def on_cpu() -> str:
    return "cpu"


@app.function(cpu=1.0)
def whole_cpu_a(seconds: float) -> str:
    time.sleep(seconds)
    return "a"


@app.function(cpu=1.0)
def whole_cpu_b() -> str:
    return "b"
