"""The next version of ``scheduled.py``: the same app with an hourly Cron schedule (a
redeploy replaces the every-second one), and a function with no schedule."""

import strato

app = strato.App("strato-test-scheduled")


@app.function(schedule=strato.Cron("0 * * * *", timezone="UTC"))
def tick() -> None:
    print("tick v2 ran", flush=True)


@app.function()
def plain() -> int:
    return 2
