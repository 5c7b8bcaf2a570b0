"""Spot availability traces (``../shared/data/spot-availability``, the SpotHedge artifact):
preemption rates for the broker's cost model and preemptions replayed by ``sim`` providers.

Each file is one zone: ``{"metadata": {"gap_seconds": G}, "data": [n0, n1, ...]}``, the
number of spot instances obtainable at each sample (AWS3: 0/1, available or not). A drop
of the count by ``d`` preempts ``d`` held instances. A trace's rate is preemptions per
instance-hour held: the drops over the instance-hours the counts add up to.

Folders: AWS* are p3.2xlarge (1x V100) in AWS zones; GCP1 is A100 (40 GB) in GCP zones.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from strato import settings

# folder -> (provider, GPU type) as the catalog names them
_FOLDERS = {"AWS1": ("aws", "V100"), "AWS2": ("aws", "V100"), "AWS3": ("aws", "V100")}
_FOLDERS["GCP1"] = ("gcp", "A100-40GB")


@dataclass(frozen=True)
class Trace:
    provider: str
    gpu: str
    zone: str  # as the file names it (us-east-1f, europe-west4-a)
    gap_s: float
    data: tuple[int, ...]
    folder: str = ""  # AWS1, AWS2, AWS3, GCP1

    @property
    def region(self) -> str:
        """The zone's region: us-east-1f -> us-east-1, europe-west4-a -> europe-west4."""
        z = self.zone
        if self.provider == "gcp":
            return z.rsplit("-", 1)[0]
        return z[:-1] if z and z[-1].isalpha() else z

    def available(self, t_s: float) -> int:
        """Spot instances obtainable ``t_s`` seconds into the trace (it wraps around)."""
        i = int(t_s // self.gap_s) % len(self.data)
        return self.data[i]

    def preemptions_per_hour(self) -> float:
        drops = sum(max(0, a - b) for a, b in zip(self.data, self.data[1:], strict=False))
        held_h = sum(self.data) * self.gap_s / 3600.0
        return drops / held_h if held_h > 0 else 1.0


def traces_dir() -> Path:
    configured = settings.SIM_TRACES.get()
    if configured is not None:
        return configured
    for up in Path(__file__).resolve().parents:
        candidate = up.parent / "shared" / "data" / "spot-availability"
        if candidate.is_dir():
            return candidate
    return Path("../shared/data/spot-availability").resolve()


def load_traces(folder: Path | None = None) -> list[Trace]:
    """Every trace under ``folder`` (default :func:`traces_dir`); [] where it is absent."""
    root = folder or traces_dir()
    return list(_load(str(root)))


@functools.lru_cache(maxsize=4)
def _load(root: str) -> tuple[Trace, ...]:
    out = []
    base = Path(root)
    if not base.is_dir():
        return ()
    for sub in sorted(base.iterdir()):
        kind = _FOLDERS.get(sub.name)
        if kind is None or not sub.is_dir():
            continue
        for f in sorted(sub.glob("*.json")):
            doc = json.loads(f.read_text())
            zone = f.name.split("_", 1)[0]
            data = tuple(int(x) for x in doc["data"])
            if data:
                gap = float(doc["metadata"]["gap_seconds"])
                out.append(Trace(kind[0], kind[1], zone, gap, data, sub.name))
    return tuple(out)


class PreemptionModel:
    """Expected spot preemptions per instance-hour, by (provider, GPU type, region): the
    traces where they cover it (their mean), else ``default`` (the mean of all traces)."""

    def __init__(self, traces: list[Trace], default: float | None = None) -> None:
        rates: dict[tuple[str, str], list[float]] = {}
        regional: dict[tuple[str, str, str], list[float]] = {}
        for t in traces:
            r = t.preemptions_per_hour()
            rates.setdefault((t.provider, t.gpu), []).append(r)
            regional.setdefault((t.provider, t.gpu, t.region), []).append(r)
        self._by_type = {k: sum(v) / len(v) for k, v in rates.items()}
        self._by_region = {k: sum(v) / len(v) for k, v in regional.items()}
        every = [r for v in rates.values() for r in v]
        self.default = (
            default if default is not None else (sum(every) / len(every) if every else 0.1)
        )

    def rate(self, provider: str, gpu: str | None, region: str) -> float:
        g = gpu or ""
        hit = self._by_region.get((provider, g, region))
        if hit is None:
            hit = self._by_type.get((provider, g))
        return self.default if hit is None else hit
