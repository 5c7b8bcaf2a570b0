"""Placement: filter nodes, rank them (price, best fit), assign GPUs."""

from strato.server.scheduler.placement import (
    ContainerRequest,
    NodeView,
    Placement,
    explain_unplaceable,
    place,
    release,
    reserve,
)

__all__ = [
    "ContainerRequest",
    "NodeView",
    "Placement",
    "explain_unplaceable",
    "place",
    "release",
    "reserve",
]
