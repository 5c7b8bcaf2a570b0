"""Functions that need GPUs no local node has: the broker buys nodes for them."""

import os
import time

import strato

app = strato.App("broker-gpu")


def _where() -> dict:
    return {
        "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
    }


@app.function(gpu="H100", cpu=1, memory=256, max_containers=2, scaledown_window=2)
def on_h100() -> dict:
    return _where()


@app.function(gpu="V100", cpu=1, memory=256, cloud="aws", max_containers=1, scaledown_window=2)
def on_aws_v100(marker: str, seconds: float) -> dict:
    """Sleeps ``seconds`` the first time (a preemption lands then: ``marker.cue`` tells the
    sim provider it runs), returns at once after."""
    first = not os.path.exists(marker)
    if first:
        with open(marker, "w") as f:
            f.write("1")
        open(marker + ".cue", "w").close()
        time.sleep(seconds)
    return {**_where(), "first": first}


@app.function(
    gpu="A100-80GB", cpu=1, memory=256, nonpreemptible=True, max_containers=1, scaledown_window=2
)
def on_a100_on_demand() -> dict:
    return _where()


@app.function(
    gpu=["B200", "L4"], cpu=1, memory=256, region="us", max_containers=1, scaledown_window=2
)
def fallback_l4() -> dict:
    return _where()


@app.function(gpu="V100", cpu=1, memory=256, cloud="aws", max_containers=1, scaledown_window=2)
def preempted_often(counter: str, runs_to_survive: int) -> int:
    """Sleeps (a preemption lands then) until it has started ``runs_to_survive`` times."""
    runs = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
    with open(counter, "w") as f:
        f.write(str(runs))
    if runs < runs_to_survive:
        open(counter + ".cue", "w").close()  # the sim provider's cue to preempt this node
        time.sleep(300)
    return runs


@app.function(gpu="V100", cpu=1, memory=256, cloud="aws", nonpreemptible=True, scaledown_window=2)
def on_aws_v100_on_demand() -> dict:
    return _where()
