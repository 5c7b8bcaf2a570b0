"""Routes of schedules (Period, Cron): the schedules of deployed apps, with their next
run times. The scheduler itself is wired here: it checks schedules when an app is
created, starts and ends them with deployed apps, and runs its loop on the control
plane (``server/schedules.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from strato.protocol import messages as m

from ..schedules import Scheduler
from .router import Reply, Request, reply

if TYPE_CHECKING:
    from ..control import ControlPlane
    from .router import Router


def register(api: Router, cp: ControlPlane) -> None:
    """Add this feature's routes to ``api`` (and its background loops to ``cp``)."""
    scheduler = Scheduler(cp.store, cp.calls, cp.logs)
    scheduler.recover()  # before the API serves: the durable next run times
    cp.apps.spec_hooks.append(scheduler.check_spec)
    cp.apps.on_created.append(scheduler.app_created)
    cp.apps.on_stopped.append(scheduler.app_stopped)
    cp.spawn_loop(scheduler.run(), "schedules")

    @api.add(
        "GET",
        "/schedules",
        "Schedules of deployed apps and their next run times (all, or one app's)",
        response=m.ScheduleList,
        query={"app": str},
    )
    async def list_schedules(req: Request) -> Reply:
        ref = req.param("app")
        ws = req.caller.workspace
        app_id = (await cp.apps.find(ref, ws))["app_id"] if ref else None
        mine = cp.workspaces.app_ws  # --- workspaces: only the caller's workspace's
        listing = scheduler.listing(app_id)
        return reply(m.ScheduleList([s for s in listing if mine.get(s.app_id, "main") == ws]))
