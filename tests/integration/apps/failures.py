"""Functions that fail in every way a user can meet."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

import strato

app = strato.App("strato-test-failures")


class CustomError(Exception):
    """An exception class of the app's own module: the caller can import it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


def _attempt(path: str) -> int:
    """Record one attempt in ``path`` (a line with the time); returns the attempt number."""
    with open(path, "a") as f:
        f.write(f"{time.time()}\n")
    with open(path) as f:
        return len(f.read().splitlines())


@app.function()
def raise_value_error(x: int) -> int:
    raise ValueError(f"bad value {x}")


@app.function()
def raise_custom(code: int) -> None:
    raise CustomError("custom failure", code)


@app.function()
def raise_container_only() -> None:
    """Raises an exception whose class exists only in the container."""
    d = os.path.join(os.getcwd(), "only_here")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "container_only_mod.py"), "w") as f:
        f.write("class OnlyInContainerError(Exception):\n    pass\n")
    sys.path.insert(0, d)
    import container_only_mod

    raise container_only_mod.OnlyInContainerError("you cannot import me")


@app.function()
def return_lock() -> object:
    return threading.Lock()


@app.function()
def identity(x):
    return x


@app.function(retries=0)
def sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@app.function(retries=1)
def sigkill_first_attempt(path: str) -> int:
    n = _attempt(path)
    if n == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return n


@app.function(retries=0)
def segfault() -> None:
    ctypes.string_at(0)


@app.function(memory=(128, 200), retries=0)
def allocate(mb: int) -> int:
    chunks = [bytearray(1 << 20) for _ in range(mb)]
    for c in chunks:  # touch every page
        c[::4096] = b"x" * len(c[::4096])
    return len(chunks)


@app.function(timeout=2, retries=0)
def too_slow(seconds: float) -> str:
    time.sleep(seconds)
    return "finished"


@app.function(retries=strato.Retries(max_retries=2, backoff_coefficient=2.0, initial_delay=0.5))
def always_fails(path: str) -> None:
    n = _attempt(path)
    raise RuntimeError(f"attempt {n} failed")


@app.function(retries=strato.Retries(max_retries=3, backoff_coefficient=1.0, initial_delay=0.2))
def fails_twice(path: str) -> int:
    n = _attempt(path)
    if n <= 2:
        raise RuntimeError(f"attempt {n} failed")
    return n


@app.function(timeout=120)
def sleep_long(seconds: float, path: str) -> str:
    with open(path, "a") as f:
        f.write("started\n")
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write("finished\n")
    return "finished"


@app.function(retries=0, timeout=3)
def poison(x: int, bad: int, how: str) -> int:
    """Fast (so that a container gets many inputs at once), except input ``bad``."""
    if x == bad:
        if how == "segfault":
            ctypes.string_at(0)
        elif how == "sleep":
            time.sleep(60)
    return x
