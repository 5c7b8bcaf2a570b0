"""Keep-alive policies with per-function state: the hybrid histogram and strato's default.

``decide()`` in :mod:`.policy` keeps an idle container for a fixed ``scaledown_window``. The
policies here learn each function's idle-time distribution (see :mod:`.hybrid`) and keep a
warm container only while the next input is worth waiting for, starting one ahead of time
(pre-warming) when the pattern says when that input will come.

Which policy a function gets is ``AutoscalerConfig.keepalive``:

- ``"fixed"``: ``decide()`` with the user's ``scaledown_window``: the choice when the user
  set ``scaledown_window`` (:func:`keepalive_for`).
- ``"adaptive"``: strato's default (:data:`ADAPTIVE`), cost-aware. Each idle time observed is
  a sample of "how long after draining does the next input come"; the policy picks the warm
  interval ``[a, b)`` (pre-warm ``a``, keep-alive until ``b``) that minimises, over the
  function's histogram, ``cold starts + idle GB-minutes / price``, where ``price``
  (``cold_start_gb_minutes``, 1.0) is the idle memory one avoided cold start is worth and
  the container's memory is ``AutoscalerConfig.memory_mb`` (:func:`cost_aware_windows`).
  Until 5 idle times are known, and for the extra containers of a burst, it keeps an idle
  container for the *break-even* time ``price / memory`` (ski rental: never more than twice
  the cost of the best choice in hindsight), 1 minute to 4 hours. Mostly out-of-range idle
  times (>= 4 h) use the paper's predictor branch.
- ``"hybrid"``: the paper's policy as published (:data:`HYBRID`): 5th/99th percentile windows
  with 10 % margins, a 4-hour keep-alive while the histogram is not representative, and
  every idle container kept until the end of the keep-alive window (as the paper's
  OpenWhisk implementation does per container). The yardstick.

min_containers, max_containers, buffer_containers and target_inputs mean what they mean in
``decide()`` whatever the policy: the work-driven ``desired_containers()`` is a floor,
pre-warming never exceeds max_containers, busy and starting containers are never stopped.

How the control loop drives it
------------------------------

Keep one :class:`PolicyState` per function, starting from ``PolicyState()``: immutable, a
240-int histogram and a few numbers. Every call below returns the new state: store it in
place of the old one. All are pure; pass the loop's monotonic clock as ``now``.

1. ``state = observe_arrival(state, now)`` for **every input** the control plane accepts for
   the function (before it is queued or handed to a container). If the function was idle
   (it drained and nothing arrived since), this records the idle time ``now - idle_since``;
   otherwise it returns the state unchanged (after the first input).
2. ``state = observe_drained(state, now)`` when the function's last running input finishes
   and nothing is queued (running + queued inputs drops to 0): the idle period starts.
   Calling it again while idle changes nothing.
3. ``result = scale(stats, config, state)`` on every autoscaler tick, with the same
   ``FunctionStats`` (``now``, queued, inflight, containers with ``idle_since``) and
   ``AutoscalerConfig`` as ``decide()`` takes today, plus ``config.keepalive =
   keepalive_for(user_scaledown_window)`` and ``config.memory_mb = resources.memory_mb``.
   Then ``state = result.state``, and apply ``result.decision`` exactly like ``decide()``'s:
   start ``start`` containers, stop those in ``stop``.
   ``result.recheck_at`` is the earliest time at which the decision changes if nothing
   else happens (no arrival, no input finishing). **A function with no container and no
   work must still be ticked once ``now >= recheck_at``**: that is how a pre-warm starts
   (today's ``scale_once`` skips such functions; skip them only while ``recheck_at`` is
   None or in the future).

If the loop misses an ``observe_drained``, ``scale`` sees from ``stats`` that the function
has no work and starts the idle period at the latest container ``idle_since`` (or ``now``);
a missed ``observe_arrival`` loses one sample. Under ``"fixed"`` the hooks still learn, so a
function whose ``scaledown_window`` is removed starts from a known pattern.

What a tick decides
-------------------

With the windows ``(prewarm, keepalive)`` and ``t = now - idle_since`` while the function is
idle (no input running or queued):

- ``t < prewarm``: no warm container wanted; idle containers beyond ``desired_containers()``
  are stopped now (the next input is not expected before the pre-warm window ends);
- ``prewarm <= t < prewarm + keepalive``: one warm container wanted: kept if there is one,
  started if not (a pre-warm);
- later: none wanted, idle containers beyond ``desired_containers()`` are stopped.

While the function has work, and for containers beyond the one kept while it is idle, an
idle container is stopped once idle for the surplus window (adaptive: the break-even time;
hybrid: the end of the keep-alive window), longest idle first, down to
``desired_containers()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

from strato.server.autoscaler.hybrid import (
    BIN_S,
    PAPER,
    RANGE_BINS,
    HistogramState,
    HybridParams,
    Windows,
    classify,
    observe_idle,
    windows,
)
from strato.server.autoscaler.policy import (
    STOPPING,
    AutoscalerConfig,
    FunctionStats,
    Keepalive,
    ScalingDecision,
    decide,
    desired_containers,
)

KEEPALIVE_POLICIES: tuple[str, ...] = ("fixed", "hybrid", "adaptive")


@dataclass(frozen=True, slots=True)
class PolicyParams:
    """How a histogram-driven policy picks its windows and turns them into decisions."""

    histogram: HybridParams = PAPER
    # Cost-aware windows (strato's default): the idle memory, in GB-minutes, that avoiding
    # one cold start is worth. None: the paper's percentile windows.
    cold_start_gb_minutes: float | None = None
    # An idle container beyond the one kept for the idle function (the extra containers of
    # a burst) is stopped after this long idle. None: the end of the keep-alive window
    # (paper), or the break-even time (cost-aware).
    surplus_window_s: float | None = None
    # Bounds of the break-even window (cost-aware only).
    min_window_s: float = BIN_S
    max_window_s: float = RANGE_BINS * BIN_S
    # Cost-aware windows are recomputed when the histogram has grown by this fraction since
    # they were last computed (and on every new idle time while it holds < 64); 0: always.
    refresh_fraction: float = 0.0
    # Cost-aware: at most this many pre-warm candidates besides 0 (the histogram's first
    # rising edges) are tried.
    prewarm_candidates: int = 8
    # Start pre-warmed containers this much earlier than the window says, so that they are
    # ready (booted, imported, @enter run) when the input is expected. The replay models an
    # instant start and uses 0; a deployment should set its typical container start time.
    prewarm_lead_s: float = 0.0


HYBRID = PolicyParams()
"""The paper's hybrid histogram policy, as published (4-hour fallback keep-alive)."""

ADAPTIVE = PolicyParams(
    histogram=HybridParams(
        margin=0.10,
        cv_threshold=0.0,  # the cost minimisation already copes with flat histograms
        min_samples=5,
        oob_threshold=0.5,
        predict_margin=0.15,
    ),
    cold_start_gb_minutes=1.0,
    surplus_window_s=None,
    refresh_fraction=1 / 32,
)
"""strato's default (``keepalive="adaptive"``): a cold start is worth 1 GB-minute of idle
memory (a 128 MB container may idle 8 minutes to avoid one). On the Azure replay
(``benchmarks/bench_autoscaler_replay.py --sweep``) prices 1 and 2 beat a fixed 10-minute
keep-alive on cold starts and idle memory at once, and every price from 0.25 to 4 gives
fewer cold starts for less idle memory than the fixed window of comparable cost."""


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What the policy remembers about one function between ticks.

    ``idle_since``: when the function last drained (nothing running or queued), None while it
    has work or before its first input; ``seen_input``: whether any input has arrived yet;
    ``cached``: the last cost-aware windows, computed when the histogram held
    ``cached_total`` idle times and the container ``cached_memory_mb``.
    """

    histogram: HistogramState = field(default_factory=HistogramState)
    idle_since: float | None = None
    seen_input: bool = False
    cached: Windows | None = None
    cached_total: int = 0
    cached_memory_mb: float = 0.0


class Scaled(NamedTuple):
    """The result of one tick: what to do, the state to keep, when to look again."""

    decision: ScalingDecision
    state: PolicyState
    recheck_at: float | None


def keepalive_for(scaledown_window: float | None) -> Keepalive:
    """The policy a function gets: fixed when the user set ``scaledown_window``."""
    return "fixed" if scaledown_window is not None else "adaptive"


def params_for(keepalive: str) -> PolicyParams:
    """The parameters of a histogram-driven policy by name."""
    if keepalive == "adaptive":
        return ADAPTIVE
    if keepalive == "hybrid":
        return HYBRID
    raise ValueError(f"keepalive={keepalive!r}: use one of {', '.join(KEEPALIVE_POLICIES)}")


def observe_arrival(state: PolicyState, now: float) -> PolicyState:
    """An input arrived for the function: record the idle time if it was idle."""
    if state.idle_since is None:
        return state if state.seen_input else replace(state, seen_input=True)
    histogram = observe_idle(state.histogram, (now - state.idle_since) / 60.0)
    return replace(state, histogram=histogram, idle_since=None, seen_input=True)


def observe_drained(state: PolicyState, now: float) -> PolicyState:
    """The function's last running input finished and none is queued: it is idle from now."""
    if state.idle_since is not None:
        return state
    return replace(state, idle_since=now)


def break_even_s(memory_mb: float, params: PolicyParams) -> float:
    """How long an idle container may wait before its memory has cost one cold start.

    The ski-rental rule: keeping a container warm for the break-even time and then stopping
    it never costs more than twice what the best choice in hindsight would have cost.
    """
    price = params.cold_start_gb_minutes
    if price is None:
        raise ValueError("break-even needs cold_start_gb_minutes")
    gb = max(memory_mb, 1.0) / 1024.0
    return min(params.max_window_s, max(params.min_window_s, price / gb * 60.0))


def cost_aware_windows(
    histogram: HistogramState, memory_mb: float, params: PolicyParams
) -> Windows:
    """The windows that minimise ``cold starts + idle GB-minutes / price`` on the histogram.

    For a warm interval ``[a, b)`` minutes after the function drains, an idle time ``x``
    (taken at the middle of its bin) is a cold start when ``x < a`` or ``x >= b`` (or out of
    bounds) and keeps a container idle for ``clamp(min(x, b) - a, 0)`` minutes. ``b`` runs
    over every bin edge up to the last non-empty bin, ``a`` over 0 and the histogram's first
    rising edges (the starts of its clusters); "never warm" is a candidate too. The paper's
    margins are applied to the winner. While too few idle times are known, the break-even
    keep-alive (:func:`break_even_s`); mostly out of bounds: the predictor, as the paper.
    """
    hp = params.histogram
    pattern = classify(histogram, hp)
    if pattern == "oob":
        return windows(histogram, hp)
    if pattern != "histogram":
        return Windows(0.0, break_even_s(memory_mb, params))
    price = params.cold_start_gb_minutes
    assert price is not None
    k = (max(memory_mb, 1.0) / 1024.0) / price  # cost of one idle container-minute
    bins = histogram.bins
    last = max(i for i, c in enumerate(bins) if c)  # count > 0 for the "histogram" branch
    span = last + 1
    prefix = [0] * (span + 1)  # idle times in bins < j
    weighted = [0.0] * (span + 1)  # sum of (bin middle) over those
    for i in range(span):
        prefix[i + 1] = prefix[i] + bins[i]
        weighted[i + 1] = weighted[i] + bins[i] * (i + 0.5)
    total = histogram.total
    candidates = [0]
    for i in range(1, span):
        if bins[i] and not bins[i - 1]:
            candidates.append(i)
            if len(candidates) > params.prewarm_candidates:
                break
    best_cost, best_a, best_b = float(total), 0, 0  # never warm: every input cold
    for a in candidates:
        pa, wa = prefix[a], weighted[a]
        for b in range(a + 1, span + 1):
            beyond = total - prefix[b]  # idle times >= b, out of bounds included
            idle = (weighted[b] - wa) - a * (prefix[b] - pa) + (b - a) * beyond
            cost = pa + beyond + k * idle
            if cost < best_cost:
                best_cost, best_a, best_b = cost, a, b
    if best_b == 0:
        return Windows(0.0, 0.0)
    prewarm = best_a * BIN_S * (1.0 - hp.margin)
    return Windows(prewarm, best_b * BIN_S * (1.0 + hp.margin) - prewarm)


def _windows(state: PolicyState, memory_mb: float, params: PolicyParams) -> PolicyState:
    """The state with up-to-date windows in ``cached``."""
    if params.cold_start_gb_minutes is None:
        current = windows(state.histogram, params.histogram)
        if current == state.cached:
            return state
        return replace(state, cached=current, cached_total=state.histogram.total)
    total = state.histogram.total
    fresh = (
        state.cached is not None
        and state.cached_memory_mb == memory_mb
        and (
            total == state.cached_total
            or (total >= 64 and total - state.cached_total < total * params.refresh_fraction)
        )
    )
    if fresh:
        return state
    return replace(
        state,
        cached=cost_aware_windows(state.histogram, memory_mb, params),
        cached_total=total,
        cached_memory_mb=memory_mb,
    )


def policy_windows(
    state: PolicyState, memory_mb: float = 128.0, params: PolicyParams = ADAPTIVE
) -> Windows:
    """The (pre-warm, keep-alive) windows the policy applies to the function now."""
    cached = _windows(state, memory_mb, params).cached
    assert cached is not None
    return cached


def _settle(state: PolicyState, stats: FunctionStats, idle_sinces: list[float]) -> PolicyState:
    """Heal a missed hook: the stats say whether the function has work right now."""
    has_work = stats.queued + stats.inflight > 0
    if has_work and state.idle_since is not None:
        return replace(state, idle_since=None)
    if not has_work and state.idle_since is None and state.seen_input:
        since = min(max(idle_sinces), stats.now) if idle_sinces else stats.now
        return replace(state, idle_since=since)
    return state


def decide_adaptive(
    stats: FunctionStats,
    config: AutoscalerConfig,
    state: PolicyState,
    params: PolicyParams = ADAPTIVE,
) -> Scaled:
    """One tick of a histogram-driven policy: the decision, the new state, the next check."""
    now = stats.now
    live = [c for c in stats.containers if c.state != STOPPING]
    # Longest idle first; container_id breaks ties so the decision is deterministic.
    idle = sorted(
        (c.idle_since, c.container_id) for c in live if c.inflight == 0 and c.idle_since is not None
    )
    state = _windows(_settle(state, stats, [since for since, _ in idle]), config.memory_mb, params)
    assert state.cached is not None
    prewarm, keepalive = state.cached
    end = prewarm + keepalive
    prewarm = max(0.0, prewarm - params.prewarm_lead_s)
    desired = desired_containers(stats, config)
    cap = config.max_containers
    recheck: list[float] = []
    stop_all_idle = False
    if state.idle_since is not None and stats.queued + stats.inflight == 0:
        t = now - state.idle_since
        if t < prewarm:
            stop_all_idle = True  # the next input is not expected before the pre-warm
            recheck.append(state.idle_since + prewarm)
        elif t < end:
            desired = max(desired, 1 if cap is None else min(1, cap))
            recheck.append(state.idle_since + end)
        else:
            stop_all_idle = True
    if params.surplus_window_s is not None:
        window = params.surplus_window_s
    elif params.cold_start_gb_minutes is not None:
        window = break_even_s(config.memory_mb, params)
    else:
        window = end

    over_max = 0 if cap is None else len(live) - cap
    stop = [cid for _, cid in idle[: max(0, over_max)]]
    surplus = max(0, len(live) - len(stop) - desired)
    for since, cid in idle[len(stop) :]:
        if surplus > 0 and (stop_all_idle or now - since >= window):
            stop.append(cid)
            surplus -= 1
        else:
            recheck.append(since + window)
    later = [t for t in recheck if t > now]
    return Scaled(
        ScalingDecision(start=max(0, desired - len(live)), stop=stop),
        state,
        min(later) if later else None,
    )


def _fixed_recheck(stats: FunctionStats, config: AutoscalerConfig, stop: list[str]) -> float | None:
    stopped = set(stop)
    times = [
        c.idle_since + config.scaledown_window
        for c in stats.containers
        if c.state != STOPPING
        and c.inflight == 0
        and c.idle_since is not None
        and c.container_id not in stopped
    ]
    later = [t for t in times if t > stats.now]
    return min(later) if later else None


def scale(stats: FunctionStats, config: AutoscalerConfig, state: PolicyState) -> Scaled:
    """One autoscaler tick for one function under the policy its config selects."""
    if config.keepalive == "fixed":
        decision = decide(stats, config)
        return Scaled(decision, state, _fixed_recheck(stats, config, decision.stop))
    return decide_adaptive(stats, config, state, params_for(config.keepalive))
