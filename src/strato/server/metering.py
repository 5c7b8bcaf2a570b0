"""Metering: what each container used, per second, and what it cost.

A container's row (``store/tables_usage.py``) is written when the fleet starts it and
closed when it ends. Its usage over a window is its lifetime clipped to the window, in
seconds, times what it reserved: CPU-seconds (cores x s), memory GiB-seconds, GPU-seconds
(devices x s, by type), and cost = the node's price per hour x its share x hours. Its
share of the node is its dominant share of the node's capacity: the largest of its
fraction of the node's CPUs, memory and GPUs (a node bought for one container charges it
all; containers packed on one node split its price by what they hold). Rows are
attributed to the app, function, provider and GPU type.

Durability: rows are in the database. While a container runs, ``seen_at`` is moved
forward every ``SEEN_EVERY_S``; after a crash of the control plane, rows left open are
closed at their ``seen_at`` (at most that much usage is lost, none invented).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from sqlalchemy import Connection, select, update

from strato.protocol import messages as m

from .store.tables_usage import usage

if TYPE_CHECKING:
    from .containers import Container
    from .scheduler import NodeView
    from .store import Store

log = logging.getLogger("strato.metering")

SEEN_EVERY_S = 30.0
By = Literal["app", "function", "provider", "gpu"]
BY: tuple[str, ...] = ("app", "function", "provider", "gpu")


def dominant_share(cpu: float, memory_mb: int, gpus: int, node: NodeView) -> float:
    shares = [
        cpu / node.cpu_total if node.cpu_total > 0 else 0.0,
        memory_mb / node.memory_mb if node.memory_mb > 0 else 0.0,
    ]
    total_gpus = sum(len(v) for v in node.gpus.values())
    if total_gpus:
        shares.append(gpus / total_gpus)
    return min(1.0, max(shares))


@dataclass(frozen=True)
class UsageRecord:
    """One container's row."""

    container_id: str
    app_id: str
    function_id: str
    function_name: str
    provider: str
    gpu_type: str | None
    gpu_count: int
    cpu: float
    memory_mb: int
    node_price_per_hour: float
    share: float
    started_at: float
    ended_at: float | None


def account(rows: Iterable[UsageRecord], by: str, since: float, now: float) -> m.UsageReport:
    """Usage of ``rows`` within [since, now], grouped ``by`` app, function, provider or gpu."""
    groups: dict[str, m.UsageRow] = {}
    total = m.UsageRow("total")
    for r in rows:
        start = max(r.started_at, since)
        end = min(r.ended_at if r.ended_at is not None else now, now)
        seconds = max(0.0, end - start)
        key = {
            "app": r.app_id,
            "function": f"{r.app_id}/{r.function_name}",
            "provider": r.provider,
            "gpu": r.gpu_type or "none",
        }[by]
        for row in (groups.setdefault(key, m.UsageRow(key)), total):
            row.containers += 1
            row.seconds += seconds
            row.cpu_s += r.cpu * seconds
            row.memory_gib_s += r.memory_mb / 1024.0 * seconds
            row.gpu_s += r.gpu_count * seconds
            row.cost += r.node_price_per_hour * r.share * seconds / 3600.0
    rows_out = sorted(groups.values(), key=lambda u: (-u.cost, -u.seconds, u.key))
    return m.UsageReport(by=by, since=since, rows=rows_out, total=total)


class Meter:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._last_seen = 0.0
        # databases made at schema v5 before metering existed
        store._write("usage_table", lambda c: usage.create(c, checkfirst=True)).wait()

    def recover(self, now: float | None = None) -> int:
        """Close the rows an earlier run left open (at their last ``seen_at``)."""
        t = usage

        def run(c: Connection) -> int:
            res = c.execute(update(t).where(t.c.ended_at.is_(None)).values(ended_at=t.c.seen_at))
            return res.rowcount or 0

        n = self.store._write("usage_recover", run).wait()
        if n:
            log.info("metering: closed %d usage rows of an earlier run", n)
        return n

    def started(self, s: Container, node: NodeView, function_name: str) -> None:
        now = time.time()
        gpus = len(s.placement.gpu_indices)
        values = {
            "container_id": s.container_id,
            "app_id": s.app_id,
            "function_id": s.function_id,
            "function_name": function_name[:256],
            "node_id": s.node_id,
            "provider": node.provider,
            "gpu_type": s.placement.gpu_type,
            "gpu_count": gpus,
            "cpu": float(s.request.cpu),
            "memory_mb": int(s.request.memory_mb),
            "node_price_per_hour": float(node.price_per_hour),
            "share": dominant_share(s.request.cpu, s.request.memory_mb, gpus, node),
            "started_at": now,
            "ended_at": None,
            "seen_at": now,
        }
        self.store._write("usage_start", lambda c: c.execute(usage.insert().values(**values)))

    def ended(self, container_id: str, at: float | None = None) -> None:
        end = time.time() if at is None else at
        t = usage
        self.store._write(
            "usage_end",
            lambda c: c.execute(
                update(t)
                .where(t.c.container_id == container_id, t.c.ended_at.is_(None))
                .values(ended_at=end, seen_at=end)
            ),
        )

    def tick(self, _now: float) -> None:
        """Move ``seen_at`` of running containers forward (now and then)."""
        now = time.time()
        if now - self._last_seen < SEEN_EVERY_S:
            return
        self._last_seen = now
        t = usage
        self.store._write(
            "usage_seen",
            lambda c: c.execute(update(t).where(t.c.ended_at.is_(None)).values(seen_at=now)),
        )

    def records(self, since: float, app_id: str | None = None) -> list[UsageRecord]:
        t = usage

        def run(c: Connection) -> list[UsageRecord]:
            q = select(t).where((t.c.ended_at.is_(None)) | (t.c.ended_at >= since))
            if app_id is not None:
                q = q.where(t.c.app_id == app_id)
            return [
                UsageRecord(
                    r.container_id,
                    r.app_id,
                    r.function_id,
                    r.function_name,
                    r.provider,
                    r.gpu_type,
                    r.gpu_count,
                    r.cpu,
                    r.memory_mb,
                    r.node_price_per_hour,
                    r.share,
                    r.started_at,
                    r.ended_at,
                )
                for r in c.execute(q)
            ]

        return self.store._read(run)

    def report(
        self, by: str = "app", since: float = 0.0, app_id: str | None = None
    ) -> m.UsageReport:
        now = time.time()
        return account(self.records(since, app_id), by, since, now)
