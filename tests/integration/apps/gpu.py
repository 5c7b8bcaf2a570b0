"""GPU functions, run on a control plane whose node declares one H100 (device 0) and one
T4 (device 1): ``STRATO_NODE_GPUS=H100:1,T4:1``."""

import os

import strato

app = strato.App("strato-test-gpu")


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
