"""A deployed function that runs every second by itself (tests/integration/
test_schedules.py); it prints a line per run."""

import strato

app = strato.App("strato-test-scheduled")


@app.function(schedule=strato.Period(seconds=1))
def tick() -> None:
    print("tick ran", flush=True)
