"""Schedules: deployed functions that run by themselves, every ``Period`` or at the
times of a ``Cron`` expression.

- **Durable next run.** Each scheduled function of a deployed app has a row in the
  ``schedules`` table with the time of its next run. Deploying writes it, each run
  advances it, stopping the app (or replacing it with a redeploy) deletes it.
- **Exactly once per due time.** A run is a ``spawn`` call of the function with no
  arguments whose id is made of the function and the due time (``sc-<fn>-<ms>``). The call
  is made first (durable in the store's journal when made), then the next run time is
  written; a control plane that dies between the two finds the call of that due time on
  its next start and only advances, and a call id the store already has is never made
  twice. So a restart neither skips the next run nor runs one twice.
- **No backfill.** Due times that passed while the control plane was down are skipped,
  and the app's logs say which.
- **The loop** (``Scheduler.run``) sleeps until the nearest due time (at most
  ``MAX_SLEEP_S``, so a change of the wall clock is noticed), woken at once by a deploy.
- Ephemeral apps (``strato run``, ``app.run()``) do not run their schedules, as in Modal;
  their logs say so.
"""

from __future__ import annotations

import asyncio
import logging
import math
import pickle
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from sqlalchemy import delete, select, update

from strato import exceptions as exc
from strato.protocol import messages as m

from .store.tables_schedules import schedules as schedules_table

if TYPE_CHECKING:
    from .calls.manager import CallManager
    from .logs import LogHub
    from .store import Store

log = logging.getLogger("strato.schedules")

MAX_SLEEP_S = 30.0  # the loop looks again at least this often
MAX_LISTED = 5  # skipped runs named in one log line (then a count)
NO_ARGS = pickle.dumps(((), {}), protocol=pickle.HIGHEST_PROTOCOL)  # f() with no arguments


# ---------------------------------------------------------------------- schedule math


def _cron(s: m.Schedule, start: float):
    from croniter import croniter  # the control plane's only; imported when first used

    tz = ZoneInfo(s.timezone)
    return croniter(s.cron, datetime.fromtimestamp(start, tz))


def check(s: m.Schedule, owner: str) -> None:
    """``InvalidError`` naming ``owner`` unless ``s`` is exactly one valid schedule."""
    if (s.period_s is None) == (s.cron is None):
        raise exc.InvalidError(f"{owner}: a schedule is a strato.Period or a strato.Cron")
    if s.cron is None:
        return
    from croniter import croniter

    if len(s.cron.split()) != 5 or not croniter.is_valid(s.cron):
        raise exc.InvalidError(
            f"{owner}: {s.cron!r} is not a cron expression of five fields (minute hour "
            "day-of-month month day-of-week), such as '*/5 * * * *'"
        )
    try:
        ZoneInfo(s.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise exc.InvalidError(
            f"{owner}: unknown timezone {s.timezone!r}: use an IANA name such as 'UTC' or "
            "'Europe/Berlin'"
        ) from None
    try:
        first_run(s, time.time())
    except ValueError:  # croniter's: no time matches (the 30th of February)
        raise exc.InvalidError(f"{owner}: {s.cron!r} never matches a time") from None


def describe(s: m.Schedule) -> str:
    if s.period_s is not None:
        return f"Period({s.period_s:g}s)"
    return f"Cron({s.cron!r}, timezone={s.timezone!r})"


def first_run(s: m.Schedule, now: float) -> float:
    """The first due time of a schedule made at ``now``: a period after it, or the cron
    expression's next time."""
    if s.period_s is not None:
        return now + s.period_s
    return float(_cron(s, now).get_next(float))


def following(s: m.Schedule, due: float, now: float) -> float:
    """The first due time after ``due`` that is later than ``now`` (a period keeps its
    phase: due + k * period)."""
    if s.period_s is not None:
        k = max(1, math.floor((now - due) / s.period_s) + 1)
        return due + k * s.period_s
    return float(_cron(s, max(due, now)).get_next(float))


def due_between(s: m.Schedule, first: float, until: float, limit: int) -> tuple[list[float], int]:
    """The due times from ``first`` (itself a due time) up to ``until`` (excluded): the
    first ``limit`` of them, and how many there are in all."""
    if first >= until:
        return [], 0
    if s.period_s is not None:
        n = math.ceil((until - first) / s.period_s)
        return [first + i * s.period_s for i in range(min(n, limit))], n
    it = _cron(s, first)
    times: list[float] = []
    n, t = 0, first
    while t < until and n < 100_000:
        if len(times) < limit:
            times.append(t)
        n += 1
        t = float(it.get_next(float))
    return times, n


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def call_id_for(function_id: str, due: float) -> str:
    """The id of the run of ``function_id`` due at ``due``: one call per due time."""
    return f"sc-{function_id}-{round(due * 1000)}"


# ---------------------------------------------------------------------- the scheduler


@dataclass
class Entry:
    function_id: str
    app_id: str
    name: str
    schedule: m.Schedule
    next_run_at: float
    last_run_at: float | None = None
    last_call_id: str | None = None

    def info(self) -> m.ScheduleInfo:
        return m.ScheduleInfo(
            self.app_id,
            self.function_id,
            self.name,
            self.schedule,
            self.next_run_at,
            self.last_run_at,
            self.last_call_id,
        )


class Scheduler:
    def __init__(self, store: Store, calls: CallManager, logs: LogHub) -> None:
        self.store = store
        self.calls = calls
        self.logs = logs
        self.entries: dict[str, Entry] = {}  # function_id -> its schedule
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------ apps (hooks)

    def check_spec(self, spec: m.FunctionSpec, deployed: bool) -> m.FunctionSpec:
        """A bad schedule refuses the app, deployed or not."""
        if spec.schedule is not None:
            if spec.is_class:
                raise exc.InvalidError(f"{spec.name}: schedules are for functions, not classes")
            check(spec.schedule, spec.name)
        return spec

    def app_created(self, info: m.AppInfo, specs: list[m.FunctionSpec]) -> None:
        scheduled = [
            (ref, spec)
            for ref, spec in zip(info.functions, specs, strict=True)
            if spec.schedule is not None
        ]
        if not scheduled:
            return
        if info.state != "deployed":
            names = ", ".join(
                f"{s.name} ({describe(s.schedule)})" for _, s in scheduled if s.schedule
            )
            self.logs.system(
                info.app_id,
                f"schedules run only for deployed apps: {names} will not run by itself in "
                "this run; deploy the app (`strato deploy FILE`) to start its schedules",
            )
            return
        now = time.time()
        rows = []
        for ref, spec in scheduled:
            assert spec.schedule is not None
            e = Entry(ref.function_id, info.app_id, spec.name, spec.schedule, 0.0)
            e.next_run_at = first_run(e.schedule, now)
            self.entries[e.function_id] = e
            rows.append(self._row(e, now))
            self.logs.system(
                info.app_id,
                f"schedule: {e.name} runs {describe(e.schedule)}; next run {iso(e.next_run_at)}",
            )
        # behind the app's own rows; a start that finds the app but not these makes them
        self.store._write("schedules_create", lambda c: c.execute(schedules_table.insert(), rows))
        self._wake.set()

    def app_stopped(self, app_id: str) -> None:
        ended = [e for e in self.entries.values() if e.app_id == app_id]
        for e in ended:
            del self.entries[e.function_id]
            self.logs.system(app_id, f"schedule: {e.name} ({describe(e.schedule)}) ended")
        t = schedules_table
        self.store._write(
            "schedules_delete", lambda c: c.execute(delete(t).where(t.c.app_id == app_id))
        )
        self._wake.set()

    def listing(self, app_id: str | None = None) -> list[m.ScheduleInfo]:
        return [
            e.info()
            for e in sorted(self.entries.values(), key=lambda e: (e.app_id, e.name))
            if app_id is None or e.app_id == app_id
        ]

    @staticmethod
    def _row(e: Entry, now: float) -> dict:
        return {
            "function_id": e.function_id,
            "app_id": e.app_id,
            "function_name": e.name,
            "schedule": msgspec.msgpack.encode(e.schedule),
            "next_run_at": e.next_run_at,
            "last_run_at": e.last_run_at,
            "last_call_id": e.last_call_id,
            "created_at": now,
        }

    # ------------------------------------------------------------------ start

    def recover(self, now: float | None = None) -> None:
        """At the control plane's start (blocking reads, before the API serves): the
        schedules of the deployed apps, from their durable next run times. A due time
        that passed while the control plane was down is skipped (said in the app's logs)
        unless its run was made before the stop (its call exists): then it only
        advances. Rows of apps no longer deployed are deleted; a deployed scheduled
        function without a row (a deploy whose rows were not yet written) starts now."""
        now = time.time() if now is None else now
        store = self.store
        t = schedules_table
        rows = [dict(r._mapping) for r in store._read(lambda c: c.execute(select(t)).all())]
        deployed = {a["app_id"] for a in store.apps() if a["state"] == "deployed"}
        gone = [r["function_id"] for r in rows if r["app_id"] not in deployed]
        if gone:
            store._write(
                "schedules_gone", lambda c: c.execute(delete(t).where(t.c.function_id.in_(gone)))
            )
        have = {r["function_id"] for r in rows}
        fresh = []
        for app_id in sorted(deployed):
            for f in store.functions_of(app_id):
                spec = msgspec.msgpack.decode(f["spec"], type=m.FunctionSpec)
                if spec.schedule is None or f["function_id"] in have:
                    continue
                e = Entry(f["function_id"], app_id, f["name"], spec.schedule, 0.0)
                e.next_run_at = first_run(spec.schedule, now)
                self.entries[e.function_id] = e
                fresh.append(self._row(e, now))
                self.logs.system(
                    app_id,
                    f"schedule: {e.name} runs {describe(e.schedule)}; next run "
                    f"{iso(e.next_run_at)}",
                )
        if fresh:
            store._write("schedules_fresh", lambda c: c.execute(t.insert(), fresh))
        for r in rows:
            if r["app_id"] not in deployed:
                continue
            e = Entry(
                r["function_id"],
                r["app_id"],
                r["function_name"],
                msgspec.msgpack.decode(r["schedule"], type=m.Schedule),
                r["next_run_at"],
                r["last_run_at"],
                r["last_call_id"],
            )
            self.entries[e.function_id] = e
            if e.next_run_at > now:
                continue  # the next run is still ahead: it runs at its time
            due = e.next_run_at
            if store.call(call_id_for(e.function_id, due)) is not None:
                # its run was made before the stop: only the next time was not written
                e.last_run_at, e.last_call_id = due, call_id_for(e.function_id, due)
                first_skipped = following(e.schedule, due, due)
            else:
                first_skipped = due
            e.next_run_at = following(e.schedule, due, now)
            self._say_skipped(e, first_skipped, now, "while the control plane was down")
            self._advance(e)
        self._wake.set()

    def _say_skipped(self, e: Entry, first: float, until: float, why: str) -> None:
        times, n = due_between(e.schedule, first, until, MAX_LISTED)
        if not n:
            return
        listed = ", ".join(iso(x) for x in times) + (
            f" and {n - len(times)} more" if n > len(times) else ""
        )
        self.logs.system(
            e.app_id,
            f"schedule: {e.name} skipped {n} run{'s' if n > 1 else ''} due {why} "
            f"(not run later): {listed}; next run {iso(e.next_run_at)}",
        )
        log.info("schedule of %s skipped %d runs %s", e.name, n, why)

    def _advance(self, e: Entry):
        t = schedules_table
        values = {
            "next_run_at": e.next_run_at,
            "last_run_at": e.last_run_at,
            "last_call_id": e.last_call_id,
        }
        return self.store._write(
            "schedule_advance",
            lambda c: c.execute(update(t).where(t.c.function_id == e.function_id).values(**values)),
        )

    # ------------------------------------------------------------------ the loop

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Fire the runs that are due, then sleep until the nearest next one (at most
        ``MAX_SLEEP_S``) or until woken by a deploy or a stop."""
        while True:
            self._wake.clear()
            try:
                await self.fire_due(time.time())
            except Exception:  # a bug here must not end every schedule
                log.exception("schedule loop failed")
                await asyncio.sleep(1.0)
            nearest = min((e.next_run_at for e in self.entries.values()), default=None)
            wait = MAX_SLEEP_S if nearest is None else nearest - time.time()
            try:
                await asyncio.wait_for(self._wake.wait(), min(MAX_SLEEP_S, max(0.0, wait)))
            except TimeoutError:
                pass

    async def fire_due(self, now: float) -> int:
        """Make the run of every schedule due at ``now``; returns how many were made."""
        due = sorted(
            (e for e in self.entries.values() if e.next_run_at <= now),
            key=lambda e: e.next_run_at,
        )
        fired = 0
        for e in due:
            if self.entries.get(e.function_id) is not e:  # stopped or replaced meanwhile
                continue
            await self._fire(e)
            fired += 1
        return fired

    async def _fire(self, e: Entry) -> None:
        due = e.next_run_at
        call_id = call_id_for(e.function_id, due)
        req = m.CreateCall(
            call_id=call_id,
            function_id=e.function_id,
            inputs=[m.InputItem(0, args=NO_ARGS)],
            kind="spawn",
            closed=True,
        )
        try:
            await self.calls.create_call(req)  # durable (journaled) when it returns
            self.logs.system(e.app_id, f"schedule: {e.name} run due {iso(due)} is call {call_id}")
            e.last_run_at, e.last_call_id = due, call_id
        except exc.Error as err:
            self.logs.system(e.app_id, f"schedule: {e.name} run due {iso(due)} not made: {err}")
        now = time.time()
        e.next_run_at = following(e.schedule, due, now)
        late = following(e.schedule, due, due)
        if late < now:  # the loop itself was late by more than a period
            self._say_skipped(e, late, now, "while the schedule loop was late")
        await self._advance(e)
