"""Time series for the dashboard's charts, sampled from the metrics every few seconds.

Each sample of a function holds: calls/s and errors/s over the last interval, p50 and
p99 of its inputs' latency (acceptance to output) over that interval (from the
histogram's bucket deltas, as Prometheus's ``histogram_quantile`` does), queue depth,
inputs running and live containers. The last ``KEEP`` samples of each function are
kept; functions of stopped apps are dropped. Sampling runs only while someone looked at
the dashboard recently."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import metrics

if TYPE_CHECKING:
    from ..control import ControlPlane

EVERY_S = 2.0
KEEP = 300  # 10 minutes at EVERY_S
ACTIVE_S = 600.0  # sample while the dashboard was viewed this recently
FAILED = ("failure", "died", "timeout")


def quantile(q: float, bounds: list[float], counts: list[float]) -> float | None:
    """``q`` of a histogram (cumulative ``counts`` at upper ``bounds``, +Inf last)."""
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    rank = q * total
    prev_b, prev_c = 0.0, 0.0
    for b, c in zip(bounds, counts, strict=True):
        if c >= rank:
            if math.isinf(b):
                return prev_b
            if c == prev_c:
                return b
            return prev_b + (b - prev_b) * (rank - prev_c) / (c - prev_c)
        prev_b, prev_c = b, c
    return prev_b


@dataclass
class _Last:
    t: float
    done: float
    failed: float
    buckets: list[float]


@dataclass
class Series:
    t: deque[float] = field(default_factory=lambda: deque(maxlen=KEEP))
    calls: deque[float] = field(default_factory=lambda: deque(maxlen=KEEP))
    errors: deque[float] = field(default_factory=lambda: deque(maxlen=KEEP))
    p50: deque[float | None] = field(default_factory=lambda: deque(maxlen=KEEP))
    p99: deque[float | None] = field(default_factory=lambda: deque(maxlen=KEEP))
    queued: deque[int] = field(default_factory=lambda: deque(maxlen=KEEP))
    running: deque[int] = field(default_factory=lambda: deque(maxlen=KEEP))
    containers: deque[int] = field(default_factory=lambda: deque(maxlen=KEEP))

    def as_json(self) -> dict[str, list]:
        return {k: list(getattr(self, k)) for k in self.__dataclass_fields__}


def _counts() -> tuple[dict[tuple[str, str], tuple[float, float]], dict]:
    """(app, function) -> (inputs ended, inputs failed); and -> cumulative buckets."""
    ended: dict[tuple[str, str], list[float]] = {}
    for fam in metrics.INPUTS.collect():
        for s in fam.samples:
            if not s.name.endswith("_total"):
                continue
            key = (s.labels["app"], s.labels["function"])
            e = ended.setdefault(key, [0.0, 0.0])
            e[0] += s.value
            if s.labels["status"] in FAILED:
                e[1] += s.value
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for fam in metrics.LATENCY.collect():
        for s in fam.samples:
            if s.name.endswith("_bucket"):
                key = (s.labels["app"], s.labels["function"])
                buckets.setdefault(key, []).append((float(s.labels["le"]), s.value))
    return {k: (v[0], v[1]) for k, v in ended.items()}, buckets


class Sampler:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.series: dict[str, Series] = {}  # function_id -> its samples
        self._last: dict[str, _Last] = {}
        self.viewed_at = 0.0
        self.changed = asyncio.Event()  # set after each sample

    def viewed(self) -> None:
        self.viewed_at = time.monotonic()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(EVERY_S)
            if time.monotonic() - self.viewed_at < ACTIVE_S:
                self.sample(time.time())

    def sample(self, now: float) -> None:
        cp = self.cp
        ended, buckets = _counts()
        live = set()
        for fn in list(cp.calls.functions.values()):
            if fn.app_state == "stopped":
                continue
            fid = fn.function_id
            live.add(fid)
            key = metrics.LABELS.children(fid).labels
            done, failed = ended.get(key, (0.0, 0.0))
            bs = sorted(buckets.get(key, []))
            cum = [c for _, c in bs]
            last = self._last.get(fid)
            s = self.series.setdefault(fid, Series())
            if last is None or not bs or len(last.buckets) != len(cum):
                calls = errors = 0.0
                p50 = p99 = None
            else:
                dt = max(1e-3, now - last.t)
                calls = max(0.0, done - last.done) / dt
                errors = max(0.0, failed - last.failed) / dt
                delta = [max(0.0, a - b) for a, b in zip(cum, last.buckets, strict=True)]
                bounds = [b for b, _ in bs]
                p50, p99 = quantile(0.5, bounds, delta), quantile(0.99, bounds, delta)
            self._last[fid] = _Last(now, done, failed, cum)
            s.t.append(now)
            s.calls.append(round(calls, 3))
            s.errors.append(round(errors, 3))
            s.p50.append(p50)
            s.p99.append(p99)
            s.queued.append(len(fn.queue))
            s.running.append(cp.calls.inflight(fn))
            s.containers.append(len(cp.fleet.live_containers_of(fid)))
        for fid in list(self.series):
            if fid not in live:
                del self.series[fid]
                self._last.pop(fid, None)
        self.changed.set()
        self.changed = asyncio.Event()
