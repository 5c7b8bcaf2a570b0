"""The scaling state of each function and the autoscaler's tick.

Fed by events (an arrival: an input accepted, or a web request), the scaler keeps what
the keep-alive policies learn (``autoscaler.PolicyState``) and when a function must be
looked at again, and on each tick asks the policy (``autoscaler.scale``) how many
containers each function should have, then has the fleet start or stop them. It also
applies the per-app warm-pool cap and the fair share under contention
(``scheduler.quota``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .autoscaler import (
    AutoscalerConfig,
    FunctionStats,
    PolicyState,
    keepalive_for,
    observe_arrival,
    observe_drained,
    scale,
)
from .calls.manager import CallManager, FunctionQueue
from .calls.state import AppState
from .fleet import Fleet
from .scheduler import place
from .scheduler.quota import AppQuota, QuotaGate, fair_share_surplus

log = logging.getLogger("strato.control")


@dataclass
class ScaleState:
    """One function's scaling state."""

    policy: PolicyState = field(default_factory=PolicyState)
    recheck_at: float | None = None  # tick it then even with no work (a pre-warm)
    arrival_at: float | None = None  # first arrival since the last tick


class Scaler:
    def __init__(
        self,
        calls: CallManager,
        fleet: Fleet,
        quota: AppQuota,
        gate: QuotaGate,
        *,
        web_stats: Callable[[FunctionQueue, float], FunctionStats],
        tell: Callable[[str, str], None],
    ) -> None:
        self.calls = calls
        self.fleet = fleet
        self.quota = quota
        self.gate = gate
        self._web_stats = web_stats  # a web endpoint's load is its requests (the gateway)
        self._tell = tell  # (app_id, text): shown to the app's user
        self.states: dict[str, ScaleState] = {}
        self._warm_capped: set[str] = set()  # functions told their warm pool is capped
        self._failed: set[str] = set()  # functions whose scaling raised (logged once)
        # --- broker: containers each function should have and no node took this tick
        # (its queue, buffer_containers, min_containers, a web endpoint's requests)
        self.unmet: dict[str, int] = {}

    # ------------------------------------------------------------------ events

    def arrival(self, function_id: str, now: float) -> None:
        """Work arrived for the function (what the adaptive keep-alive learns from)."""
        st = self.states.get(function_id)
        if st is None:
            st = self.states[function_id] = ScaleState()
        if st.arrival_at is None:
            st.arrival_at = now

    def spec_changed(self, function_id: str) -> None:
        """Its scaling settings changed: say again if its warm pool is capped."""
        self._warm_capped.discard(function_id)

    # ------------------------------------------------------------------ the tick

    def tick(self, now: float) -> None:
        for fn in list(self.calls.functions.values()):
            if fn.app_state == AppState.STOPPED:
                continue
            st = self.states.get(fn.function_id)
            due = st is not None and st.recheck_at is not None and now >= st.recheck_at
            arrived = st is not None and st.arrival_at is not None
            idle = (
                not fn.queue
                and not self.fleet.registry.has_function(fn.function_id)
                and fn.spec.scaling.min_containers == 0
            )
            if idle and not due and not arrived:
                self.unmet.pop(fn.function_id, None)
                continue
            try:
                self._scale_function(fn, now)
            except Exception:  # one function's failure must not stop the others' scaling
                if fn.function_id not in self._failed:
                    self._failed.add(fn.function_id)
                    log.exception("scaling %s (%s) failed", fn.name, fn.function_id)
            else:
                self._failed.discard(fn.function_id)
        try:
            self._fair_share()
        except Exception:
            log.exception("the fair-share check failed")

    def _warm_pool(self, fn: FunctionQueue) -> tuple[int, int]:
        """(min_containers, buffer_containers), capped to the app's warm share."""
        sc = fn.spec.scaling
        min_c, buffer_c = sc.min_containers, sc.buffer_containers
        if min_c or buffer_c:  # the warm pool may hold only a share of the cluster
            cap = self.quota.warm_cap(self.fleet.request_for(fn.spec), self.fleet.live_views())
            if min_c + buffer_c > cap:
                min_c = min(min_c, cap)
                buffer_c = max(0, min(buffer_c, cap - min_c))
                if fn.function_id not in self._warm_capped:
                    self._warm_capped.add(fn.function_id)
                    why = (
                        f"{fn.name}: min_containers={sc.min_containers} and buffer_containers="
                        f"{sc.buffer_containers} capped to {min_c} and {buffer_c}: an app's warm "
                        f"pool may hold {self.quota.warm_share:g} of the cluster "
                        "(STRATO_APP_WARM_SHARE)"
                    )
                    log.warning("%s", why)
                    self._tell(fn.app_id, why)
        return min_c, buffer_c

    def _scale_function(self, fn: FunctionQueue, now: float) -> None:
        st = self.states.get(fn.function_id)
        if st is None:
            st = self.states[fn.function_id] = ScaleState()
        state = st.policy
        if st.arrival_at is not None:  # what the adaptive keep-alive learns from
            state = observe_arrival(state, st.arrival_at)
            st.arrival_at = None
        web = self._web_stats(fn, now) if fn.spec.web is not None else None
        if web is not None:
            queued, inflight = web.queued, web.inflight
        else:
            queued, inflight = len(fn.queue), self.calls.inflight(fn)
        if not queued and not inflight:
            state = observe_drained(state, now)
        sc = fn.spec.scaling
        min_c, buffer_c = self._warm_pool(fn)
        config = AutoscalerConfig(
            min_containers=min_c,
            max_containers=sc.max_containers,
            buffer_containers=buffer_c,
            scaledown_window=sc.scaledown_window or 60.0,
            target_inputs=self.calls.target_inputs(fn),
            keepalive=keepalive_for(sc.scaledown_window),
            memory_mb=float(fn.spec.resources.memory_mb),
        )
        stats = web or FunctionStats(
            now=now,
            queued=queued,
            inflight=inflight,
            containers=self.fleet.container_stats(fn.function_id),
        )
        result = scale(stats, config, state)
        st.policy, st.recheck_at = result.state, result.recheck_at
        started = 0
        for _ in range(result.decision.start):
            if self.fleet.start_container(fn) is None:
                break
            started += 1
        if started < result.decision.start:  # --- broker: what it may buy nodes for
            self.unmet[fn.function_id] = result.decision.start - started
        else:
            self.unmet.pop(fn.function_id, None)
        for cid in result.decision.stop:
            self.fleet.stop(cid)

    def _fair_share(self) -> None:
        """Per-app quotas under contention: a function with work and no container after a
        scaling pass starves; apps over STRATO_APP_FAIR_SHARE start nothing new and give
        back their surplus until it has a container."""
        views = self.fleet.live_views()
        empty = [v.emptied() for v in views]
        starving = set()
        for fn in self.calls.functions.values():
            if (
                not fn.queue
                or fn.app_state == AppState.STOPPED
                or fn.spec.web is not None
                or self.fleet.failing_to_start(fn.function_id)  # its own start-up fails
                or self.fleet.registry.live_of(fn.function_id)
            ):
                continue
            request = self.fleet.request_for(fn.spec)
            # it waits for capacity only: it fits an empty cluster, not this one
            if place(request, empty) is not None and place(request, views) is None:
                starving.add(fn.app_id)
        gate = self.gate
        over, surplus = fair_share_surplus(
            self.fleet.registry.values(), starving, views, self.quota.fair_share
        )
        for app_id in over - gate.over_fair_share:
            log.info("app %s is over its fair share while %s wait", app_id, sorted(starving))
        gate.over_fair_share = over
        for s in surplus:
            if s.state in ("starting", "ready"):
                log.info("stopping %s: its app is over its fair share", s.container_id)
                self.fleet.stop(s.container_id)
