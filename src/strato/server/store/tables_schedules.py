"""Tables of schedules (Period, Cron) (on the shared schema metadata)."""

from __future__ import annotations

from .schema import metadata  # noqa: F401
