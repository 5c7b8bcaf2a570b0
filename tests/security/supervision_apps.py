"""Functions for the supervision and logs suites (test_worker_kill, test_logs_and_files)."""

import sys
import time

import strato

app = strato.App("strato-test-supervision")


@app.function(max_containers=2)
def double(x: int) -> int:
    """Cheap and checkable: the output of input x is 2x. No retries: an input that a lost
    node's container held must go back to the queue without a failed attempt."""
    return 2 * x


@app.function()
def flood(lines: int, width: int) -> int:
    """Print ``lines`` lines of ``width`` characters (far past a small log quota)."""
    row = "x" * width
    out = sys.stdout
    for i in range(lines):
        out.write(f"{i:08d} {row}\n")
    out.flush()
    return lines


@app.function(timeout=300)
def slow(seconds: float, marker: str | None = None) -> float:
    if marker:  # says the input is running (the tests share this machine's files)
        with open(marker, "a") as f:
            f.write("started\n")
    time.sleep(seconds)
    return seconds


@app.function()
def kill_my_worker(x: int) -> int:
    """SIGKILL the worker agent that started this container (process runtime, no zygote:
    the agent is an ancestor), every time it runs."""
    import os
    import signal

    pid = os.getppid()
    while pid > 1:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"strato.worker" in f.read():
                os.kill(pid, signal.SIGKILL)
                break
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    time.sleep(60)
    return x
