"""Schedules end to end, with the real control plane and containers: a Period(seconds=1)
function runs again and again (as calls, in the app's logs); a redeploy replaces its
schedule and stopping the app ends it; bad schedules and ephemeral runs; and restarts of
the control plane (SIGKILL) that neither skip the next run nor make one twice, with time
driven through the durable next run time in the store (no long sleeps)."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import pytest
from apps import scheduled, scheduled_hourly, scheduled_v2
from conftest import ServerHandle, dedicated_server, wait_until

import strato
from strato import exceptions as exc
from strato.client import session
from strato.protocol import messages as m
from strato.server.schedules import call_id_for


def _db(home: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True)


def _calls(home: Path, function_id: str) -> list[tuple[str, str]]:
    db = _db(home)
    try:
        return db.execute(
            "SELECT call_id, kind FROM calls WHERE function_id = ? ORDER BY created_at",
            (function_id,),
        ).fetchall()
    finally:
        db.close()


def _schedule_rows(home: Path) -> dict[str, float]:
    db = _db(home)
    try:
        return dict(db.execute("SELECT function_id, next_run_at FROM schedules").fetchall())
    finally:
        db.close()


def _schedules(app: str) -> list[m.ScheduleInfo]:
    return (
        session.api().call("GET", "/schedules", None, m.ScheduleList, params={"app": app}).schedules
    )


def _log_texts(app: str) -> list[str]:
    batch = session.api().call("GET", f"/apps/{app}/logs", None, m.LogBatch, params={"after": 0})
    return [line.text for line in batch.lines]


def test_period_runs_repeatedly_redeploy_replaces_stop_ends(server):
    home = server.home
    scheduled.app.deploy()
    fid = scheduled.tick.object_id
    try:
        # every second, as spawn calls of the function with no arguments
        runs = wait_until(lambda: len(_calls(home, fid)) >= 3 and _calls(home, fid), 60, "3 runs")
        assert {kind for _, kind in runs} == {"spawn"}
        assert all(call_id.startswith(f"sc-{fid}-") for call_id, _ in runs)
        wait_until(
            lambda: sum("tick ran" in t for t in _log_texts(scheduled.app.name)) >= 3,
            60,
            "3 runs' lines in the app's logs",
        )
        texts = _log_texts(scheduled.app.name)
        assert any("schedule: tick runs Period(1s)" in t for t in texts)
        assert any(f"is call sc-{fid}-" in t for t in texts)
        # their outputs arrive: each a finished call with a result
        first = strato.FunctionCall.from_id(runs[0][0])
        assert first.get(timeout=30) is None

        # a redeploy replaces the schedule
        scheduled_v2.app.deploy()
        fid2 = scheduled_v2.tick.object_id
        (info,) = _schedules(scheduled_v2.app.name)
        assert info.function_id == fid2 and info.schedule.cron == "0 * * * *"
        assert info.next_run_at > time.time()
        assert wait_until(lambda: list(_schedule_rows(home)) == [fid2], 30, "the new row only")
        n_old = len(_calls(home, fid))
        texts = _log_texts(scheduled.app.app_id)  # the replaced deployment's logs
        assert any("schedule: tick (Period(1s)) ended" in t for t in texts)
    finally:
        scheduled_v2.app.stop()  # stopping the app ends its schedule
    assert wait_until(lambda: _schedule_rows(home) == {}, 30, "no schedule rows")
    assert session.api().call("GET", "/schedules", None, m.ScheduleList).schedules == []
    # the old function was not run after it was replaced (beyond one already on its way)
    time.sleep(2.5)  # two of its periods: long enough to show a run that should not be
    assert len(_calls(home, fid)) <= n_old + 1


def test_bad_schedules_change_nothing(server):
    api = session.api()
    n_apps = len(api.call("GET", "/apps", None, m.AppList).apps)
    app = strato.App("strato-test-bad-schedule")
    for bad, why in (("61 * * * *", "not a cron expression"), ("0 0 30 2 *", "never matches")):

        @app.function(schedule=strato.Cron(bad), serialized=True)
        def f() -> None:
            pass

        with pytest.raises(exc.InvalidError, match=why):
            app.deploy()
        app._functions.clear()

    @app.function(schedule=strato.Cron("* * * * *", timezone="Nowhere/City"), serialized=True)
    def g() -> None:
        pass

    with pytest.raises(exc.InvalidError, match="unknown timezone"):
        app.deploy()
    assert len(api.call("GET", "/apps", None, m.AppList).apps) == n_apps
    assert api.call("GET", "/schedules", None, m.ScheduleList).schedules == []
    with pytest.raises(exc.InvalidError, match="at least 1 second"):
        strato.Period(seconds=0)


def test_ephemeral_runs_do_not_run_schedules(server):
    with scheduled.app.run(quiet=True):
        assert scheduled.tick.remote() is None  # callable as any function
        app_id = scheduled.app.app_id
        assert _schedules(app_id) == []
        texts = _log_texts(app_id)
        assert any("schedules run only for deployed apps" in t for t in texts)
        assert _calls(server.home, scheduled.tick.object_id)[0][1] == "remote"


# ---------------------------------------------------------------------- restarts


def _restart_with(h: ServerHandle, change) -> None:
    """SIGKILL the control plane, change its database while it is down, start it again."""
    from strato.client.config import start_server

    h.kill(signal.SIGKILL)
    db = sqlite3.connect(h.home / "state.db")
    try:
        with db:
            change(db)
    finally:
        db.close()
    start_server(h.url, h.home, None, 60.0)
    h.wait_for_worker()


def _set_next(due: float, fid: str):
    return lambda db: db.execute(
        "UPDATE schedules SET next_run_at = ? WHERE function_id = ?", (due, fid)
    )


def test_restarts_neither_skip_nor_double(server):
    with dedicated_server({}) as h:
        scheduled_hourly.app.deploy()
        fid = scheduled_hourly.hourly.object_id
        wait_until(lambda: fid in _schedule_rows(h.home), 30, "the schedule's row")

        # a restart keeps the durable next run time as it is (and says nothing skipped)
        ahead = _schedule_rows(h.home)[fid]
        began = time.monotonic()
        _restart_with(h, lambda db: None)
        took = time.monotonic() - began
        (info,) = wait_until(lambda: _schedules(scheduled_hourly.app.name), 30, "its schedule")
        assert info.next_run_at == ahead and not _calls(h.home, fid)

        # the next run falls just after the restart (how long one takes here, twice over):
        # it runs once, then the next is an hour on
        due = round(time.time() + 2 * took) + 3.0
        _restart_with(h, _set_next(due, fid))
        assert time.time() < due, "the restart took longer than the margin given"
        wait_until(lambda: _calls(h.home, fid), 60, "the run after the restart")
        assert _calls(h.home, fid) == [(call_id_for(fid, due), "spawn")]
        wait_until(
            lambda: _schedule_rows(h.home)[fid] == due + 3600, 30, "the next run time written"
        )
        assert strato.FunctionCall.from_id(call_id_for(fid, due)).get(timeout=60) is None

        # a crash after the run was made but before its next time was written: the run
        # is not made again, the schedule only advances
        _restart_with(h, _set_next(due, fid))
        (info,) = wait_until(lambda: _schedules(scheduled_hourly.app.name), 30, "its schedule")
        assert info.next_run_at == due + 3600 and info.last_call_id == call_id_for(fid, due)
        assert len(_calls(h.home, fid)) == 1
        assert not any("skipped" in t for t in _log_texts(scheduled_hourly.app.name))

        # runs due while the control plane was down are skipped, not made later, and said
        missed = round(time.time()) - 2 * 3600 + 60  # two due times passed, one ahead
        _restart_with(h, _set_next(missed, fid))
        (info,) = wait_until(lambda: _schedules(scheduled_hourly.app.name), 30, "its schedule")
        assert info.next_run_at == missed + 2 * 3600
        texts = _log_texts(scheduled_hourly.app.name)
        assert any("skipped 2 runs due while the control plane was down" in t for t in texts)
        assert len(_calls(h.home, fid)) == 1
        scheduled_hourly.app.stop()
        assert wait_until(lambda: _schedule_rows(h.home) == {}, 30, "no schedule rows")
