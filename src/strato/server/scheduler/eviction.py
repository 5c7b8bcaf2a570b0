"""Which idle containers to stop so that a container that fits nowhere can start.

Pure logic over node views and what runs on them; the fleet stops the victims. Only a
ready container holding no work, of another function, can be a victim, and a function
keeps its warm pool (``min_containers``) and anything with queued work. Nodes are tried
in order; on a node, the longest-idle containers go first, and of those chosen, any whose
share turns out not to be needed is kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .placement import ContainerRequest, NodeView, Placement, place, release, reserve


@dataclass(frozen=True)
class Resident:
    """One container on a node, as eviction sees it."""

    container_id: str
    function_id: str
    request: ContainerRequest
    placement: Placement
    leaving: bool  # stopping or being killed: its share is free soon
    idle: bool  # ready and holding no work
    idle_since: float | None


def eviction_victims(
    request: ContainerRequest,
    function_id: str,
    nodes: Iterable[tuple[NodeView, list[Resident]]],
    spare: Mapping[str, int],
) -> list[str] | None:
    """The containers to stop to make room for ``request`` (of ``function_id``): ``[]``
    when room is on its way already (containers leaving a node free enough), ``None``
    when stopping idle containers would not make room on any node.

    ``spare``: for each function, how many of its containers may be stopped (its live
    ones beyond ``min_containers``; none while it has queued work). A function missing
    from it may lose any number."""
    for node, residents in nodes:
        view = node.copy()
        for r in residents:
            if r.leaving:
                release(view, r.request, r.placement)
        if place(request, [view]) is not None:
            return []
        chosen: list[Resident] = []
        for r in sorted(residents, key=lambda r: (r.idle_since or 0.0, r.container_id)):
            taken = sum(1 for c in chosen if c.function_id == r.function_id)
            if not _reclaimable(r, function_id, taken, spare):
                continue
            release(view, r.request, r.placement)
            chosen.append(r)
            if place(request, [view]) is not None:
                for kept in list(chosen):  # keep those whose share is not needed
                    reserve(view, kept.request, kept.placement)
                    if place(request, [view]) is not None:
                        chosen.remove(kept)
                    else:
                        release(view, kept.request, kept.placement)
                return [r.container_id for r in chosen]
    return None


def _reclaimable(r: Resident, function_id: str, taken: int, spare: Mapping[str, int]) -> bool:
    if r.function_id == function_id or not r.idle or r.idle_since is None:
        return False
    limit = spare.get(r.function_id)
    return limit is None or taken < limit
