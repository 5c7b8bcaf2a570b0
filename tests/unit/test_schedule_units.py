"""Schedules without a control plane: the schedule math, checks, and the scheduler's
durable next run times on the store (SQLite and PostgreSQL), with time given by the
test (no sleeping): a restart neither skips the next run nor makes one twice; runs due
while the control plane was down are skipped and said; redeploy and stop."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import msgspec
import pytest
from test_store import store  # noqa: F401 - the store fixture, on SQLite and PostgreSQL

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.sdk.schedule import Cron, Period, schedule_spec
from strato.server import schedules as sc
from strato.server.store.tables_schedules import schedules as table

T0 = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC).timestamp()  # a Monday, 12:00 UTC


# ---------------------------------------------------------------------- math


def test_period_keeps_its_phase():
    s = m.Schedule(period_s=60.0)
    assert sc.first_run(s, T0) == T0 + 60
    assert sc.following(s, T0, T0) == T0 + 60
    assert sc.following(s, T0, T0 + 59.9) == T0 + 60
    assert sc.following(s, T0, T0 + 60) == T0 + 120
    assert sc.following(s, T0, T0 + 601) == T0 + 660
    assert sc.due_between(s, T0, T0 + 180, 2) == ([T0, T0 + 60], 3)
    assert sc.due_between(s, T0, T0, 5) == ([], 0)


def test_cron_in_a_timezone():
    s = m.Schedule(cron="*/5 * * * *")
    assert sc.first_run(s, T0) == T0 + 300
    assert sc.following(s, T0, T0 + 1000) == T0 + 1200
    assert sc.due_between(s, T0, T0 + 900, 10) == ([T0, T0 + 300, T0 + 600], 3)
    berlin = m.Schedule(cron="0 9 * * *", timezone="Europe/Berlin")  # UTC+1 in January
    nxt = sc.first_run(berlin, T0)
    assert datetime.fromtimestamp(nxt, UTC) == datetime(2026, 1, 6, 8, 0, tzinfo=UTC)


def test_checks():
    sc.check(m.Schedule(period_s=1.0), "f")
    sc.check(m.Schedule(cron="0 * * * *", timezone="America/New_York"), "f")
    for bad, match in [
        (m.Schedule(), "Period or a strato.Cron"),
        (m.Schedule(period_s=5.0, cron="* * * * *"), "Period or a strato.Cron"),
        (m.Schedule(cron="61 * * * *"), "not a cron expression"),
        (m.Schedule(cron="* * * * * *"), "five fields"),
        (m.Schedule(cron="0 0 30 2 *"), "never matches"),
        (m.Schedule(cron="* * * * *", timezone="Mars/Olympus"), "unknown timezone"),
    ]:
        with pytest.raises(exc.InvalidError, match=match):
            sc.check(bad, "f")


def test_sdk_schedules():
    assert schedule_spec(Period(hours=1, minutes=30)) == m.Schedule(period_s=5400.0)
    assert schedule_spec(Period(seconds=1)) == m.Schedule(period_s=1.0)
    assert schedule_spec(Cron("*/5  * * * *", timezone="UTC")) == m.Schedule(cron="*/5 * * * *")
    assert repr(Period(days=1)) == "Period(days=1)"
    for make, match in [
        (lambda: Period(), "at least 1 second"),
        (lambda: Period(seconds=0), "at least 1 second"),
        (lambda: Period(minutes=-1), ">= 0"),
        (lambda: Period(hours=float("nan")), "use a number"),
        (lambda: Cron("* * *"), "five fields"),
        (lambda: Cron("* * * * *", timezone=""), "IANA"),
        (lambda: schedule_spec("*/5 * * * *"), "strato.Cron"),
    ]:
        with pytest.raises(exc.InvalidError, match=match):
            make()


def test_a_scheduled_function_takes_no_arguments():
    import strato

    app = strato.App("sched-args")
    with pytest.raises(exc.InvalidError, match=r"needs \['x'\]"):

        @app.function(schedule=strato.Period(hours=1), serialized=True)
        def needs(x):
            return x

    @app.function(schedule=strato.Period(hours=1), serialized=True)
    def fine(x=1, *args, **kwargs):
        return x

    assert fine._spec.schedule == m.Schedule(period_s=3600.0)


# ---------------------------------------------------------------------- the scheduler


class FakeCalls:
    """The call manager as the scheduler sees it: calls by id, once each."""

    def __init__(self, st) -> None:
        self.store = st
        self.made: list[str] = []

    async def create_call(self, req: m.CreateCall) -> None:
        assert req.kind == "spawn" and req.inputs[0].args == sc.NO_ARGS
        if req.call_id in self.made:
            return  # an id the store has: never made twice
        self.made.append(req.call_id)
        row = {
            "call_id": req.call_id,
            "function_id": req.function_id,
            "kind": req.kind,
            "method": None,
            "n_inputs": 1,
            "closed": True,
            "cancelled": False,
            "created_at": 0.0,
            "expires_at": 1e11,
        }
        self.store.create_call(row, [])


class FakeLogs:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def system(self, app_id: str, text: str, container_id: str = "-") -> None:
        self.lines.append((app_id, text))


def _deploy(st, app_id: str, fid: str, schedule: m.Schedule, name: str = "app") -> m.AppInfo:
    spec = m.FunctionSpec("tick", "mod", "tick", schedule=schedule)
    replaced = st.create_app(
        app_id, name, "deployed", [(fid, "tick", msgspec.msgpack.encode(spec))], None, True
    )
    return m.AppInfo(app_id, name, "deployed", T0, [m.FunctionRef(fid, "tick")]), spec, replaced


def _scheduler(st):
    return sc.Scheduler(st, FakeCalls(st), FakeLogs())


def _row(st, fid):
    rows = st._read(
        lambda c: [
            dict(r._mapping) for r in c.execute(table.select().where(table.c.function_id == fid))
        ]
    )
    return rows[0] if rows else None


def _with_now(monkeypatch, now: float) -> None:
    monkeypatch.setattr(sc.time, "time", lambda: now)


def test_runs_are_durable_across_restarts(store, monkeypatch):  # noqa: F811
    _with_now(monkeypatch, T0)
    s = _scheduler(store)
    info, spec, _ = _deploy(store, "ap-1", "fu-1", m.Schedule(period_s=60.0))
    s.app_created(info, [spec])
    store.flush()
    assert _row(store, "fu-1")["next_run_at"] == T0 + 60
    assert asyncio.run(s.fire_due(T0 + 30)) == 0  # not due yet
    _with_now(monkeypatch, T0 + 60.5)
    assert asyncio.run(s.fire_due(T0 + 60.5)) == 1
    assert s.calls.made == [sc.call_id_for("fu-1", T0 + 60)]
    assert _row(store, "fu-1")["next_run_at"] == T0 + 120

    # a restart before the next run: nothing skipped, nothing twice
    s2 = _scheduler(store)
    s2.calls.made = list(s.calls.made)
    s2.recover(now=T0 + 100)
    assert s2.entries["fu-1"].next_run_at == T0 + 120
    assert not [t for _, t in s2.logs.lines if "skipped" in t]
    _with_now(monkeypatch, T0 + 120)
    assert asyncio.run(s2.fire_due(T0 + 120)) == 1
    assert s2.calls.made[-1] == sc.call_id_for("fu-1", T0 + 120)
    assert len(s2.calls.made) == 2


def test_a_run_made_just_before_a_crash_is_not_made_again(store, monkeypatch):  # noqa: F811
    """The run's call exists but the next run time was not written (a crash between):
    the restarted scheduler only advances."""
    _with_now(monkeypatch, T0)
    s = _scheduler(store)
    info, spec, _ = _deploy(store, "ap-1", "fu-1", m.Schedule(period_s=60.0))
    s.app_created(info, [spec])
    asyncio.run(
        s.calls.create_call(
            m.CreateCall(
                call_id=sc.call_id_for("fu-1", T0 + 60),
                function_id="fu-1",
                inputs=[m.InputItem(0, args=sc.NO_ARGS)],
                kind="spawn",
            )
        )
    )
    store.flush()
    assert _row(store, "fu-1")["next_run_at"] == T0 + 60  # as if it died right here
    s2 = _scheduler(store)
    s2.recover(now=T0 + 61)
    assert s2.entries["fu-1"].next_run_at == T0 + 120
    assert s2.entries["fu-1"].last_call_id == sc.call_id_for("fu-1", T0 + 60)
    assert not [t for _, t in s2.logs.lines if "skipped" in t]
    assert asyncio.run(s2.fire_due(T0 + 61)) == 0
    store.flush()
    assert _row(store, "fu-1")["next_run_at"] == T0 + 120


def test_runs_due_while_down_are_skipped_and_said(store, monkeypatch):  # noqa: F811
    _with_now(monkeypatch, T0)
    s = _scheduler(store)
    info, spec, _ = _deploy(store, "ap-1", "fu-1", m.Schedule(cron="*/5 * * * *"))
    s.app_created(info, [spec])
    store.flush()
    assert _row(store, "fu-1")["next_run_at"] == T0 + 300
    s2 = _scheduler(store)
    s2.recover(now=T0 + 1000)  # 12:05, 12:10 and 12:15 passed while down
    assert s2.entries["fu-1"].next_run_at == T0 + 1200
    said = [t for _, t in s2.logs.lines if "skipped" in t]
    assert len(said) == 1 and "skipped 3 runs" in said[0]
    assert "2026-01-05 12:05:00 UTC" in said[0] and "12:15:00" in said[0]
    assert asyncio.run(s2.fire_due(T0 + 1000)) == 0  # not backfilled
    store.flush()
    assert _row(store, "fu-1")["next_run_at"] == T0 + 1200


def test_redeploy_replaces_and_stop_ends(store, monkeypatch):  # noqa: F811
    _with_now(monkeypatch, T0)
    s = _scheduler(store)
    info, spec, _ = _deploy(store, "ap-1", "fu-1", m.Schedule(period_s=60.0))
    s.app_created(info, [spec])
    info2, spec2, replaced = _deploy(store, "ap-2", "fu-2", m.Schedule(period_s=3600.0))
    assert replaced == ["ap-1"]
    for old in replaced:
        s.app_stopped(old)
    s.app_created(info2, [spec2])
    store.flush()
    assert list(s.entries) == ["fu-2"] and _row(store, "fu-1") is None
    assert _row(store, "fu-2")["next_run_at"] == T0 + 3600
    assert asyncio.run(s.fire_due(T0 + 100)) == 0  # the old schedule is gone
    s.app_stopped("ap-2")
    store.flush()
    assert s.entries == {} and _row(store, "fu-2") is None
    assert asyncio.run(s.fire_due(T0 + 99999)) == 0


def test_ephemeral_apps_do_not_run_schedules(store, monkeypatch):  # noqa: F811
    s = _scheduler(store)
    spec = m.FunctionSpec("tick", "mod", "tick", schedule=m.Schedule(period_s=1.0))
    s.app_created(m.AppInfo("ap-9", "e", "ephemeral", T0, [m.FunctionRef("fu-9", "tick")]), [spec])
    store.flush()
    assert s.entries == {} and _row(store, "fu-9") is None
    assert "only for deployed apps" in s.logs.lines[0][1]


def test_recover_mends_rows(store, monkeypatch):  # noqa: F811
    """A deployed scheduled function without a row starts now; a row of an app no longer
    deployed goes."""
    _with_now(monkeypatch, T0)
    info, spec, _ = _deploy(store, "ap-1", "fu-1", m.Schedule(period_s=60.0), name="a")
    stale = {
        "function_id": "fu-old",
        "app_id": "ap-old",
        "function_name": "old",
        "schedule": msgspec.msgpack.encode(m.Schedule(period_s=5.0)),
        "next_run_at": T0,
        "created_at": T0,
    }
    store._write("t", lambda c: c.execute(table.insert(), [stale])).wait()
    s = _scheduler(store)
    s.recover(now=T0)
    store.flush()
    assert list(s.entries) == ["fu-1"]
    assert _row(store, "fu-1")["next_run_at"] == T0 + 60
    assert _row(store, "fu-old") is None
