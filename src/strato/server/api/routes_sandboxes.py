"""Routes of sandboxes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..control import ControlPlane
    from .router import Router


def register(api: Router, cp: ControlPlane) -> None:
    """Add this feature's routes to ``api`` (and its background loops to ``cp``)."""
