"""Tables of sandboxes (on the shared schema metadata)."""

from __future__ import annotations

from .schema import metadata  # noqa: F401
