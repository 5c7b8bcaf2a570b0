"""A short function for the reliability tests: many quick inputs, retried when their
container dies."""

import time

import strato

app = strato.App("strato-test-reliability")


def expected(x: int) -> int:
    return 3 * x + 1


@app.function(
    retries=strato.Retries(max_retries=5, initial_delay=0.1, backoff_coefficient=1.0),
    max_containers=3,
)
def work(x: int, sleep_s: float, runs_log: str | None = None) -> int:
    if runs_log:  # one line per run of an input, so a test sees which ran again
        with open(runs_log, "a") as f:
            f.write(f"{x}\n")
    time.sleep(sleep_s)
    return expected(x)


@app.function(timeout=60)
def slow_value(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return expected(x)


@app.function(timeout=60)
def slow_items(n: int, pause: float):
    for i in range(n):
        time.sleep(pause)
        yield expected(i)
