"""The broker's status (``GET /broker``: providers, instances, cool-downs, spend) and
metered usage (``GET /usage``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from strato.protocol import messages as m

from .router import Reply, Request, reply

if TYPE_CHECKING:
    from ..control import ControlPlane
    from .router import Router


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
