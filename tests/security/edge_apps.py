"""Functions for the hostile-input suites (test_hostile_frames, test_hostile_specs): two
apps, so that a suite can show one app's trouble leaves the other's work alone."""

import os
import sys
import time

import strato

victim = strato.App("strato-test-edge-victim")
bystander = strato.App("strato-test-edge-bystander")


@victim.function(scaledown_window=60)
def whoami() -> tuple[str, str]:
    """Its container's id and channel secret: what hostile code in a container can read."""
    return os.environ["STRATO_CONTAINER_ID"], os.environ["STRATO_CONTAINER_TOKEN"]


@victim.function(scaledown_window=60)
def echo(x):
    return x


@victim.function(scaledown_window=60)
def pieces(n: int, size: int):
    """Generator items over the channel's chunk size (they travel as BlobChunk frames)."""
    for i in range(n):
        yield bytes([i]) * size


@victim.function(scaledown_window=60)
def raise_big(size: int):
    """A failure whose pickled exception is over the chunk size."""
    raise ValueError("x" * size)


@victim.function(scaledown_window=60)
def slow(path: str, seconds: float):
    """Write this input's lease (input id, dispatch token: the runner's frame above holds
    them) to ``path``, then hold the input long enough for a forged output to race it."""
    item = sys._getframe(1).f_locals["item"]
    with open(path, "w") as f:
        f.write(f"{item.input_id} {item.attempt}\n")
    time.sleep(seconds)
    return ("real", path)


@bystander.function(scaledown_window=2)
def square(x: int) -> int:
    return x * x


hog = strato.App("strato-test-edge-hog-map")


@hog.function(scaledown_window=2)
def busy(x: int) -> int:
    """A backlog that would keep every container of the machine busy for a while."""
    time.sleep(0.3)
    return x
