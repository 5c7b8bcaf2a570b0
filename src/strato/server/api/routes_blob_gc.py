"""The blob collector's route and loop (``server/blob_gc.py``).

``POST /blobs/gc`` is the installation's operator's (its own token): it deletes, or on a dry
run counts, the blobs no row names that are older than ``STRATO_BLOB_GC_GRACE_S``. The same
collection runs every ``STRATO_BLOB_GC_INTERVAL_S`` (0: never).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from strato import settings
from strato.protocol import messages as m

from ..blob_gc import Collector
from .router import Reply, Request, reply

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ..control import ControlPlane
    from .router import Router


def register(api: Router, cp: ControlPlane) -> None:
    """Add this feature's route to ``api`` and its loop to ``cp``."""

    def sandbox_specs() -> Iterator[m.FunctionSpec]:
        # a sandbox's spec (its code mount, its image) is in memory only
        if cp.sandboxes is not None:
            yield from (sb.spec for sb in (*cp.sandboxes.live.values(), *cp.sandboxes.pool))

    gc = Collector(cp.store, cp.blobs, settings.BLOB_GC_GRACE_S.get(), sandbox_specs)

    @api.add(
        "POST",
        "/blobs/gc",
        "Delete the blobs no row names (older than STRATO_BLOB_GC_GRACE_S)",
        body=m.BlobGc,
        response=m.BlobGcReport,
        access="operator",
    )
    async def gc_blobs(req: Request) -> Reply:
        return reply((await gc.collect(req.decode(m.BlobGc).dry_run)).message())

    interval = settings.BLOB_GC_INTERVAL_S.get()
    if interval > 0:
        cp.spawn_loop(gc.run(interval), "blob-gc")
