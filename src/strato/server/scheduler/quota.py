"""Per-app quotas: how many containers, and how much of the cluster's CPU and memory, one
app may hold, so that one app (a ``min_containers=10**6``, a huge ``.map``) cannot take
every node from the others.

- ``STRATO_APP_MAX_CONTAINERS`` (1000): live containers of one app. A spec whose
  ``min_containers`` alone is over it is refused at deploy; past it no container starts.
- ``STRATO_APP_MAX_SHARE`` (1.0): the share of the cluster's CPU and of its memory that
  one app's containers may reserve. 1.0 lets a lone app use the whole machine.
- ``STRATO_APP_WARM_SHARE`` (0.5): the share that a function's *warm pool*
  (``min_containers`` + ``buffer_containers``, kept whether or not there is work) may
  reserve; ``min_containers`` beyond it is capped (logged once per function), so the
  remainder of the machine stays free for other apps' work.
- ``STRATO_APP_FAIR_SHARE`` (1.0: off by default; e.g. 0.5 turns it on): while another
  app's function has work and no container (it waited through a scaling pass), an app
  holding more than this share of the cluster's CPU or memory starts no new container
  and its surplus containers are asked to stop (gracefully: they finish the inputs they
  hold), so the waiting app gets room even while the big one still has a backlog.

Pure logic over node views and container sessions; the fleet calls it before a start.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from strato import settings
from strato.exceptions import InvalidError

from .placement import ContainerRequest, NodeView


@dataclass
class AppQuota:
    max_containers: int = 1000
    max_share: float = 1.0
    warm_share: float = 0.5
    fair_share: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AppQuota:
        return cls(
            max_containers=settings.APP_MAX_CONTAINERS.get(env),
            max_share=settings.APP_MAX_SHARE.get(env),
            warm_share=settings.APP_WARM_SHARE.get(env),
            fair_share=settings.APP_FAIR_SHARE.get(env),
        )

    def check_spec(self, spec) -> None:
        """Refuse (HTTP 400) a function whose warm pool alone is over the container quota."""
        floor = spec.scaling.min_containers
        if floor > self.max_containers:
            raise InvalidError(
                f"function {spec.name!r}: min_containers={floor} is over this cluster's quota "
                f"of {self.max_containers} containers per app (STRATO_APP_MAX_CONTAINERS)"
            )

    def why_not(
        self,
        request: ContainerRequest,
        app_sessions: Iterable,  # the app's live sessions: .request, .state
        nodes: Iterable[NodeView],
    ) -> str | None:
        """None when one more container of this app fits its quota, else the reason."""
        live = [s for s in app_sessions if s.state != "gone"]
        if len(live) + 1 > self.max_containers:
            return (
                f"the app has {len(live)} containers, its quota (STRATO_APP_MAX_CONTAINERS="
                f"{self.max_containers})"
            )
        if self.max_share >= 1.0:
            return None
        healthy = [n for n in nodes if n.healthy]
        cpu_total = sum(n.cpu_total for n in healthy)
        mem_total = sum(n.memory_mb for n in healthy)
        cpu = sum(s.request.cpu for s in live) + request.cpu
        mem = sum(s.request.memory_mb for s in live) + request.memory_mb
        if cpu > self.max_share * cpu_total + 1e-9 or mem > self.max_share * mem_total:
            return (
                f"the app would hold {cpu:g} CPU and {mem} MiB, over its share "
                f"(STRATO_APP_MAX_SHARE={self.max_share:g}) of {cpu_total:g} CPU and "
                f"{mem_total} MiB"
            )
        return None

    def warm_cap(self, request: ContainerRequest, nodes: Iterable[NodeView]) -> int:
        """How many containers of this size an app's warm pool may keep."""
        healthy = [n for n in nodes if n.healthy]
        if not healthy:
            return self.max_containers
        cpu_total = sum(n.cpu_total for n in healthy)
        mem_total = sum(n.memory_mb for n in healthy)
        by_cpu = math.floor(self.warm_share * cpu_total / request.cpu + 1e-9)
        by_mem = math.floor(self.warm_share * mem_total / max(1, request.memory_mb))
        return max(0, min(self.max_containers, by_cpu, by_mem))


class QuotaGate:
    """The fleet's view of :class:`AppQuota`: says once per function (log and the app's
    logs) when a container does not start because of its app's quota."""

    def __init__(self, quota: AppQuota, log, tell) -> None:
        self.quota = quota
        self._log = log
        self._tell = tell  # (app_id, text, container_id)
        self._said: dict[str, str] = {}
        self.over_fair_share: set[str] = set()  # apps that start nothing while others wait

    def blocks(self, fn, request: ContainerRequest, sessions: Iterable, nodes) -> bool:
        """``sessions``: every live container (.app_id, .function_id, .state, .request)."""
        sessions = list(sessions)
        why = self.quota.why_not(request, [s for s in sessions if s.app_id == fn.app_id], nodes)
        if (
            why is None
            and fn.app_id in self.over_fair_share
            and any(
                s.function_id == fn.function_id and s.state in ("starting", "ready")
                for s in sessions
            )
        ):  # a function of its with no container at all still gets one
            why = (
                "the app holds more than its fair share (STRATO_APP_FAIR_SHARE="
                f"{self.quota.fair_share:g}) while another app waits for a container"
            )
        if why is None:
            self._said.pop(fn.function_id, None)
            return False
        if self._said.get(fn.function_id) != why.split(",")[0]:
            self._said[fn.function_id] = why.split(",")[0]
            self._log.warning("%s gets no new container: %s", fn.name, why)
            self._tell(fn.app_id, f"{fn.name} gets no new container: {why}", "-")
        return True


def fair_share_surplus(
    sessions: Iterable,  # live container sessions: .app_id, .state, .request, .inflight
    starving_apps: set[str],
    nodes: Iterable[NodeView],
    share: float,
) -> tuple[set[str], list]:
    """(apps over ``share`` of the cluster, their containers to stop to get under it)
    while ``starving_apps`` wait; the least busy, youngest containers go first."""
    if not starving_apps:
        return set(), []
    healthy = [n for n in nodes if n.healthy]
    cpu_total = sum(n.cpu_total for n in healthy)
    mem_total = sum(n.memory_mb for n in healthy)
    by_app: dict[str, list] = {}
    for s in sessions:
        if s.state in ("starting", "ready") and s.app_id not in starving_apps:
            by_app.setdefault(s.app_id, []).append(s)
    over: set[str] = set()
    surplus: list = []
    for app_id, held in by_app.items():
        cpu = sum(s.request.cpu for s in held)
        mem = sum(s.request.memory_mb for s in held)
        if cpu <= share * cpu_total + 1e-9 and mem <= share * mem_total:
            continue
        over.add(app_id)
        for s in sorted(held, key=lambda s: (len(s.inflight), -s.started_at)):
            if cpu <= share * cpu_total + 1e-9 and mem <= share * mem_total:
                break
            surplus.append(s)
            cpu -= s.request.cpu
            mem -= s.request.memory_mb
    return over, surplus
