"""Tables of schedules (Period, Cron) (on the shared schema metadata).

``schedules``: one row per scheduled function of a deployed app, with the time of its
next run. The row is written when the app is deployed, advanced after each run, and
deleted when the app is stopped or replaced by a redeploy; a restarted control plane
reads the next run time from here (``server/schedules.py``).
"""

from __future__ import annotations

from sqlalchemy import Column, Float, Index, LargeBinary, String, Table

from .schema import metadata

schedules = Table(
    "schedules",
    metadata,
    Column("function_id", String(64), primary_key=True),
    Column("app_id", String(64), nullable=False),
    Column("function_name", String(255), nullable=False),
    Column("schedule", LargeBinary, nullable=False),  # msgpack protocol.messages.Schedule
    Column("next_run_at", Float, nullable=False),  # seconds since the epoch
    Column("last_run_at", Float, nullable=True),
    Column("last_call_id", String(128), nullable=True),
    Column("created_at", Float, nullable=False),
    Index("ix_schedules_app_id", "app_id"),
)
