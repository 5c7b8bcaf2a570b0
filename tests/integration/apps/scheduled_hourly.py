"""An hourly scheduled function, for restart tests that move its durable next run time."""

import strato

app = strato.App("strato-test-hourly")


@app.function(schedule=strato.Period(hours=1))
def hourly() -> None:
    print("hourly ran", flush=True)
