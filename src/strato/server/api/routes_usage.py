"""The broker's status (``GET /broker``: providers, instances, cool-downs, spend) and
metered usage (``GET /usage?by=app|function|provider|gpu&since=1d&app=NAME``)."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from strato import exceptions as exc
from strato.protocol import messages as m

from ..metering import BY
from ..store.tables_workspaces import DEFAULT_WORKSPACE
from .router import Reply, Request, reply

if TYPE_CHECKING:
    from ..control import ControlPlane
    from .router import Router

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float) -> float:
    """``"1d"``, ``"90m"``, ``"3600s"`` ago, or a unix time; ``""``: the beginning."""
    text = text.strip()
    if not text:
        return 0.0
    hit = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([smhdw])", text)
    if hit:
        return now - float(hit.group(1)) * _UNITS[hit.group(2)]
    try:
        value = float(text)
    except ValueError:
        raise exc.InvalidError(
            f"since={text!r}: use a duration such as 30m, 12h, 1d or 2w, or a unix time"
        ) from None
    if not 0 <= value <= now + 86400:
        raise exc.InvalidError(f"since={text!r}: a unix time in the past")
    return value


def register(api: Router, cp: ControlPlane) -> None:
    route = api.add

    @route(
        "GET",
        "/broker",
        "The broker: providers, instances bought, cool-downs, spend",
        response=m.BrokerStatus,
    )
    async def broker_status(_: Request) -> Reply:
        return reply(cp.broker.status())

    @route(
        "GET",
        "/usage",
        "Metered usage (CPU-, memory GiB-, GPU-seconds, cost) by app, function, provider or gpu",
        response=m.UsageReport,
        query={"by": str, "since": str, "app": str},
    )
    async def usage(req: Request) -> Reply:
        by = req.param("by") or "app"
        if by not in BY:
            raise exc.InvalidError(f"by={by!r}: use one of {', '.join(BY)}")
        since = parse_since(req.param("since") or "", time.time())
        app = req.param("app")
        ws = req.caller.workspace
        app_id = (await cp.apps.find(app, ws))["app_id"] if app else None
        records = await cp.store.aread(cp.meter.records, since, app_id)
        owner = cp.workspaces.app_ws
        records = [r for r in records if owner.get(r.app_id, DEFAULT_WORKSPACE) == ws]
        from ..metering import account

        return reply(account(records, by, since, time.time()))
