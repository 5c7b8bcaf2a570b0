"""``strato.Period`` and ``strato.Cron``: ``@app.function(schedule=...)`` runs a deployed
function by itself (with no arguments), as Modal's ``modal.Period`` / ``modal.Cron``.

Schedules run only for deployed apps (``strato deploy``); ``strato run`` leaves them
alone and says so. The control plane checks the cron expression and the timezone when the
app is created (this module is imported in containers too, so it parses nothing heavy).
"""

from __future__ import annotations

import math

from strato import exceptions as exc
from strato.protocol import messages as m

MAX_PERIOD_S = 100 * 366 * 86400.0


class Schedule:
    """A schedule of a deployed function."""

    def _spec(self) -> m.Schedule:
        raise NotImplementedError


class Period(Schedule):
    """Every so long: ``Period(days=1)``, ``Period(hours=2, minutes=30)``; the first run
    is one period after the deploy, and redeploying starts it again."""

    def __init__(
        self,
        *,
        weeks: float = 0,
        days: float = 0,
        hours: float = 0,
        minutes: float = 0,
        seconds: float = 0,
    ) -> None:
        parts = {
            "weeks": weeks,
            "days": days,
            "hours": hours,
            "minutes": minutes,
            "seconds": seconds,
        }
        for k, v in parts.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise exc.InvalidError(f"Period({k}={v!r}): use a number")
            if v < 0:
                raise exc.InvalidError(f"Period({k}={v!r}): use a number >= 0")
        total = weeks * 604800 + days * 86400 + hours * 3600 + minutes * 60 + seconds
        if total < 1:
            raise exc.InvalidError(
                f"{self._text(parts)}: a period must be at least 1 second (give days=, "
                "hours=, minutes= or seconds=)"
            )
        if total > MAX_PERIOD_S:
            raise exc.InvalidError(f"{self._text(parts)}: a period of at most 100 years")
        self.seconds = float(total)
        self._parts = {k: v for k, v in parts.items() if v}

    @staticmethod
    def _text(parts: dict) -> str:
        return "Period(" + ", ".join(f"{k}={v!r}" for k, v in parts.items() if v) + ")"

    def __repr__(self) -> str:
        return self._text(self._parts)

    def _spec(self) -> m.Schedule:
        return m.Schedule(period_s=self.seconds)


class Cron(Schedule):
    """At the times of a cron expression (minute hour day-of-month month day-of-week),
    in ``timezone`` (an IANA name; default UTC): ``Cron("*/5 * * * *")``,
    ``Cron("0 9 * * 1-5", timezone="Europe/Berlin")``."""

    def __init__(self, cron_string: str, timezone: str = "UTC") -> None:
        if not isinstance(cron_string, str) or len(cron_string.split()) != 5:
            raise exc.InvalidError(
                f"Cron({cron_string!r}): give five fields (minute hour day-of-month month "
                "day-of-week), such as '*/5 * * * *'"
            )
        if len(cron_string) > 256:
            raise exc.InvalidError("Cron(...): at most 256 characters")
        if not isinstance(timezone, str) or not timezone or len(timezone) > 64:
            raise exc.InvalidError(f"Cron(timezone={timezone!r}): use an IANA name such as 'UTC'")
        self.cron_string = " ".join(cron_string.split())
        self.timezone = timezone

    def __repr__(self) -> str:
        return f"Cron({self.cron_string!r}, timezone={self.timezone!r})"

    def _spec(self) -> m.Schedule:
        return m.Schedule(cron=self.cron_string, timezone=self.timezone)


def schedule_spec(schedule: object) -> m.Schedule | None:
    if schedule is None:
        return None
    if not isinstance(schedule, Schedule):
        raise exc.InvalidError(f"schedule={schedule!r}: use strato.Period(...) or strato.Cron(...)")
    return schedule._spec()
