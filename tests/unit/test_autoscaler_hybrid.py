"""Hybrid histogram keep-alive (Shahrad et al.) and strato's adaptive default policy."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import pytest

from strato.server.autoscaler import AutoscalerConfig, ContainerStat, FunctionStats, decide
from strato.server.autoscaler.adaptive import (
    ADAPTIVE,
    HYBRID,
    PolicyState,
    break_even_s,
    cost_aware_windows,
    decide_adaptive,
    keepalive_for,
    observe_arrival,
    observe_drained,
    policy_windows,
    scale,
)
from strato.server.autoscaler.hybrid import (
    PAPER,
    RANGE_BINS,
    HistogramState,
    Windows,
    classify,
    coefficient_of_variation,
    empty_histogram,
    observe_idle,
    percentile_bin,
    predict_idle_minutes,
    windows,
)


def hist(*idle_minutes: float) -> HistogramState:
    state = HistogramState()
    for x in idle_minutes:
        state = observe_idle(state, x)
    return state


def learned(*idle_minutes: float) -> PolicyState:
    """A policy state whose histogram holds these idle times, the function busy now."""
    return PolicyState(histogram=hist(*idle_minutes), seen_input=True)


def idle_container(cid: str, since: float) -> ContainerStat:
    return ContainerStat(cid, "ready", 0, since, started_at=0.0)


def busy_container(cid: str) -> ContainerStat:
    return ContainerStat(cid, "ready", 1, None, started_at=0.0)


def stats(now: float, *containers: ContainerStat, queued: int = 0, inflight: int = 0):
    return FunctionStats(now=now, queued=queued, inflight=inflight, containers=list(containers))


# --- the histogram -----------------------------------------------------------------------


def test_empty_histogram_has_240_one_minute_bins() -> None:
    state = HistogramState()
    assert len(state.bins) == RANGE_BINS == 240
    assert (state.count, state.oob, state.total) == (0, 0, 0)
    assert empty_histogram(10).bins == (0,) * 10
    with pytest.raises(ValueError):
        empty_histogram(1)


def test_observe_bins_by_whole_minutes_and_counts_out_of_bounds() -> None:
    state = hist(0.0, 0.99, 1.0, 59.5, 239.99, 240.0, 1e9, math.inf, -3.0)
    assert state.bins[0] == 3  # 0, 0.99 and the clamped negative
    assert state.bins[1] == 1
    assert state.bins[59] == 1
    assert state.bins[239] == 1
    assert state.oob == 3  # 240, 1e9, inf
    assert state.count == 6 and state.total == 9


def test_observe_returns_a_new_state_and_leaves_the_old_one() -> None:
    before = hist(3.0)
    after = observe_idle(before, 3.0)
    assert before.bins[3] == 1 and before.count == 1
    assert after.bins[3] == 2 and after.count == 2


def test_observe_rejects_nan() -> None:
    with pytest.raises(ValueError):
        observe_idle(HistogramState(), float("nan"))


def test_running_sums_match_the_bins() -> None:
    xs = [0.2, 0.4, 5.1, 5.9, 7.0, 7.5, 7.9, 100.0, 300.0, 12.0, 0.0]
    state = hist(*xs)
    assert state.count == sum(state.bins)
    assert state.sum_sq == sum(b * b for b in state.bins)
    expected = statistics.stdev(state.bins) / statistics.mean(state.bins)
    assert coefficient_of_variation(state) == pytest.approx(expected)
    assert coefficient_of_variation(HistogramState()) == 0.0


def test_recent_keeps_the_last_five_idle_times() -> None:
    state = hist(1, 2, 3, 4, 5, 6, 300)
    assert state.recent == (3, 4, 5, 6, 300)


def test_percentiles() -> None:
    # 95 idle times under a minute, 4 at 30 minutes, 1 at 90 minutes.
    state = hist(*([0.5] * 95 + [30.2] * 4 + [90.0]))
    assert percentile_bin(state, 5) == 0
    assert percentile_bin(state, 95) == 0
    assert percentile_bin(state, 96) == 30
    assert percentile_bin(state, 99) == 30
    assert percentile_bin(state, 100) == 90
    with pytest.raises(ValueError):
        percentile_bin(HistogramState(), 50)


def test_predictor_is_the_median_of_recent_idle_times() -> None:
    assert predict_idle_minutes(hist(300, 310, 1000)) == 310
    assert predict_idle_minutes(hist(300, 310)) == 305
    with pytest.raises(ValueError):
        predict_idle_minutes(HistogramState())


# --- the paper's windows ------------------------------------------------------------------


def test_periodic_function_gets_a_prewarm_and_a_short_keepalive() -> None:
    state = hist(*([10.3] * 20))  # a timer: idle ~10 minutes between runs
    assert classify(state) == "histogram"
    prewarm, keepalive = windows(state)
    assert prewarm == pytest.approx(10 * 60 * 0.9)  # head bin 10, minus 10 %
    assert prewarm + keepalive == pytest.approx(11 * 60 * 1.1)  # tail bin end, plus 10 %


def test_frequent_function_gets_no_prewarm_and_the_tail_as_keepalive() -> None:
    state = hist(*([0.5] * 95 + [30.2] * 4 + [90.0]))
    prewarm, keepalive = windows(state)
    assert prewarm == 0.0
    assert keepalive == pytest.approx(31 * 60 * 1.1)


def test_too_few_samples_fall_back_to_the_standard_keepalive() -> None:
    state = hist(10, 10, 10, 10)
    assert classify(state) == "warmup"
    assert windows(state) == Windows(0.0, 4 * 3600.0)
    assert classify(observe_idle(state, 10)) == "histogram"


def test_flat_histogram_falls_back_to_the_standard_keepalive() -> None:
    state = hist(*[i + 0.5 for i in range(240)] * 2)  # every bin twice: CV 0
    assert coefficient_of_variation(state) == pytest.approx(0.0)
    assert classify(state) == "flat"
    assert windows(state) == Windows(0.0, PAPER.fallback_keepalive_s)


def test_mostly_out_of_bounds_uses_the_predictor() -> None:
    state = hist(1, 2, 300, 300, 300, 300, 300)  # 5 of 7 beyond four hours
    assert classify(state) == "oob"
    prewarm, keepalive = windows(state)
    assert prewarm == pytest.approx(300 * 60 * 0.85)
    assert keepalive == pytest.approx(300 * 60 * 0.30)


def test_keepalive_floor() -> None:
    params = replace(PAPER, min_keepalive_s=120.0)
    assert windows(hist(*([0.1] * 10)), params).keepalive_s == 120.0
    assert windows(hist(*([0.1] * 10))).keepalive_s == pytest.approx(66.0)


# --- the loop hooks ----------------------------------------------------------------------


def test_first_arrival_records_nothing() -> None:
    state = observe_arrival(PolicyState(), 100.0)
    assert state.seen_input and state.histogram.total == 0 and state.idle_since is None


def test_arrival_after_drain_records_the_idle_time() -> None:
    state = observe_arrival(PolicyState(), 0.0)
    state = observe_drained(state, 10.0)
    assert state.idle_since == 10.0
    state = observe_arrival(state, 10.0 + 7.5 * 60)
    assert state.histogram.bins[7] == 1 and state.histogram.total == 1
    assert state.idle_since is None


def test_arrival_while_busy_records_nothing() -> None:
    state = observe_arrival(PolicyState(), 0.0)
    again = observe_arrival(state, 5.0)
    assert again is state


def test_drained_twice_keeps_the_first_time() -> None:
    state = observe_drained(observe_arrival(PolicyState(), 0.0), 10.0)
    assert observe_drained(state, 50.0).idle_since == 10.0


def test_keepalive_for_user_window() -> None:
    assert keepalive_for(None) == "adaptive"
    assert keepalive_for(60.0) == "fixed"


# --- strato's adaptive policy ------------------------------------------------------------


def test_break_even_is_price_over_memory_within_bounds() -> None:
    assert break_even_s(128.0, ADAPTIVE) == pytest.approx(8 * 60)  # 1 GB-min / 0.125 GB
    assert break_even_s(1024.0, ADAPTIVE) == pytest.approx(60)
    assert break_even_s(16384.0, ADAPTIVE) == ADAPTIVE.min_window_s
    assert break_even_s(0.5, ADAPTIVE) == ADAPTIVE.max_window_s


def test_adaptive_uses_break_even_until_the_pattern_is_known() -> None:
    state = learned(10, 10)
    assert policy_windows(state, 128.0, ADAPTIVE) == Windows(0.0, 480.0)
    assert policy_windows(state, 128.0, HYBRID) == Windows(0.0, 4 * 3600.0)


def test_cost_aware_keeps_a_frequent_function_one_bin() -> None:
    w = cost_aware_windows(hist(*([0.3] * 50)), 128.0, ADAPTIVE)
    assert w == Windows(0.0, pytest.approx(66.0))


def test_cost_aware_prewarms_a_timer() -> None:
    prewarm, keepalive = cost_aware_windows(hist(*([10.3] * 20)), 128.0, ADAPTIVE)
    assert prewarm == pytest.approx(10 * 60 * 0.9)
    assert prewarm + keepalive == pytest.approx(11 * 60 * 1.1)


def test_cost_aware_gives_up_on_long_irregular_gaps_of_a_big_container() -> None:
    gaps = [30.5, 47.5, 61.5, 95.5, 120.5, 150.5, 200.5]
    assert cost_aware_windows(hist(*gaps), 4096.0, ADAPTIVE) == Windows(0.0, 0.0)
    # A tiny container is cheap to keep: it waits through them.
    prewarm, keepalive = cost_aware_windows(hist(*gaps), 2.0, ADAPTIVE)
    assert prewarm + keepalive >= 200 * 60


def test_cost_aware_windows_follow_the_price_of_a_cold_start() -> None:
    gaps = [0.5] * 80 + [20.5] * 20  # a fifth of the gaps are 20 minutes
    state = hist(*gaps)

    def end(price: float) -> float:
        return sum(cost_aware_windows(state, 512.0, replace(ADAPTIVE, cold_start_gb_minutes=price)))

    assert end(0.1) == 0.0  # cheap cold starts: never keep a 512 MB container
    assert end(1.0) == pytest.approx(66.0)  # ride out the short gaps only
    assert end(20.0) == pytest.approx(21 * 66.0)  # dear: wait through the 20-minute gaps


def test_windows_are_cached_and_refreshed_when_the_histogram_grows() -> None:
    state = learned(*([10.3] * 100))
    first = decide_adaptive(stats(0.0), AutoscalerConfig(keepalive="adaptive"), state).state
    assert first.cached is not None and first.cached_total == 100
    # 2 more samples out of 102 (< 1/32): the cached windows stand.
    grown = replace(first, histogram=observe_idle(observe_idle(first.histogram, 0.1), 0.1))
    again = decide_adaptive(stats(0.0), AutoscalerConfig(keepalive="adaptive"), grown).state
    assert again.cached_total == 100
    # A different memory size recomputes at once.
    bigger = AutoscalerConfig(keepalive="adaptive", memory_mb=2048.0)
    assert decide_adaptive(stats(0.0), bigger, grown).state.cached_total == 102


def timer_state(drained_at: float) -> PolicyState:
    """A function that has run every ~10 minutes, drained at ``drained_at``."""
    return replace(learned(*([10.3] * 20)), idle_since=drained_at)


CONFIG = AutoscalerConfig(keepalive="adaptive")


def test_idle_container_is_stopped_before_the_prewarm_window() -> None:
    result = decide_adaptive(stats(1000.0, idle_container("a", 1000.0)), CONFIG, timer_state(1000))
    assert result.decision.stop == ["a"] and result.decision.start == 0
    assert result.recheck_at == pytest.approx(1000.0 + 540.0)


def test_prewarm_starts_one_container_in_the_window() -> None:
    state = timer_state(1000.0)
    before = decide_adaptive(stats(1539.0), CONFIG, state)
    assert before.decision.start == 0 and before.recheck_at == pytest.approx(1540.0)
    inside = decide_adaptive(stats(1540.0), CONFIG, state)
    assert inside.decision.start == 1
    assert inside.recheck_at == pytest.approx(1000.0 + 726.0)


def test_prewarmed_container_is_kept_in_the_window_and_stopped_after() -> None:
    state = timer_state(1000.0)
    kept = decide_adaptive(stats(1600.0, idle_container("p", 1540.0)), CONFIG, state)
    assert kept.decision.stop == [] and kept.decision.start == 0
    late = decide_adaptive(stats(1727.0, idle_container("p", 1540.0)), CONFIG, state)
    assert late.decision.stop == ["p"] and late.recheck_at is None


def test_min_containers_and_max_containers_are_respected() -> None:
    state = timer_state(1000.0)
    floor = replace(CONFIG, min_containers=1)
    result = decide_adaptive(stats(1000.0, idle_container("a", 1000.0)), floor, state)
    assert result.decision.stop == []
    capped = replace(CONFIG, max_containers=0)
    assert decide_adaptive(stats(1600.0), capped, state).decision.start == 0


def test_busy_containers_are_never_stopped() -> None:
    state = timer_state(1000.0)
    result = decide_adaptive(
        stats(5000.0, busy_container("b"), idle_container("i", 0.0), inflight=1), CONFIG, state
    )
    assert result.decision.stop == ["i"]


def test_surplus_containers_of_a_busy_function_wait_the_break_even_time() -> None:
    state = learned(*([0.2] * 50))
    config = replace(CONFIG, memory_mb=128.0)  # break-even: 8 minutes
    containers = [busy_container("b"), idle_container("old", 0.0), idle_container("new", 100.0)]
    result = decide_adaptive(stats(480.0, *containers, inflight=1), config, state)
    assert result.decision.stop == ["old"]
    assert result.recheck_at == pytest.approx(100.0 + 480.0)


def test_missed_drain_is_healed_from_the_stats() -> None:
    state = learned(*([10.3] * 20))  # busy according to the state
    result = decide_adaptive(stats(1100.0, idle_container("a", 1000.0)), CONFIG, state)
    assert result.state.idle_since == 1000.0
    assert result.decision.stop == ["a"]  # still before the pre-warm window


def test_no_spurious_idle_period_before_the_first_input() -> None:
    result = decide_adaptive(stats(50.0), CONFIG, PolicyState())
    assert result.state.idle_since is None and result.decision.start == 0


def test_scale_with_a_user_window_is_decide() -> None:
    containers = [idle_container("a", 0.0), idle_container("b", 950.0), busy_container("c")]
    s = stats(1000.0, *containers, inflight=1)
    config = AutoscalerConfig(scaledown_window=100.0, keepalive=keepalive_for(100.0))
    result = scale(s, config, PolicyState())
    assert result.decision == decide(s, config)
    assert result.decision.stop == ["a"]
    assert result.recheck_at == pytest.approx(1050.0)
    assert result.state == PolicyState()


def test_scale_rejects_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="keepalive"):
        scale(stats(0.0), AutoscalerConfig(keepalive="sometimes"), PolicyState())


def test_decide_adaptive_is_pure() -> None:
    s = stats(1600.0, idle_container("p", 1540.0), idle_container("q", 10.0))
    state = timer_state(1000.0)
    before = (repr(s), repr(CONFIG), repr(state))
    first = decide_adaptive(s, CONFIG, state)
    assert (repr(s), repr(CONFIG), repr(state)) == before
    assert decide_adaptive(s, CONFIG, state) == first


def drive_timer(config: AutoscalerConfig, periods: int) -> tuple[list[bool], float]:
    """Play the control loop for a job that runs 30 s every 12 minutes.

    Returns whether each arrival found a warm container, and the idle container-seconds.
    The loop follows the module's contract: observe_arrival, observe_drained, and scale()
    on a 5-second tick plus at recheck_at.
    """
    state = PolicyState()
    containers: dict[str, float | None] = {}  # cid -> idle since (None: busy)
    warm: list[bool] = []
    idle_s = 0.0
    recheck: float | None = None
    seq = 0

    def tick(now: float) -> None:
        nonlocal state, recheck, idle_s, seq
        busy = sum(1 for v in containers.values() if v is None)
        s = FunctionStats(
            now,
            0,
            busy,
            [
                ContainerStat(c, "ready", 0 if v is not None else 1, v, 0.0)
                for c, v in containers.items()
            ],
        )
        result = scale(s, config, state)
        state, recheck = result.state, result.recheck_at
        for cid in result.decision.stop:
            since = containers.pop(cid)
            assert since is not None
            idle_s += now - since
        for _ in range(result.decision.start):
            seq += 1
            containers[f"c{seq}"] = now

    now = 0.0
    for k in range(periods):
        arrival = k * 720.0 + (7.0 if k % 2 else 0.0)  # a little jitter
        while True:  # ticks and rechecks before the arrival
            nxt = min((now // 5 + 1) * 5, recheck if recheck is not None else math.inf)
            if nxt >= arrival:
                break
            now = nxt
            tick(now)
        now = arrival
        state = observe_arrival(state, now)
        idle = [c for c, v in containers.items() if v is not None]
        warm.append(bool(idle))
        if idle:
            cid = max(idle, key=lambda c: containers[c] or 0.0)
            idle_s += now - (containers[cid] or 0.0)
        else:
            seq += 1
            cid = f"c{seq}"
        containers[cid] = None
        finish = now + 30.0
        while (now // 5 + 1) * 5 < finish:
            now = (now // 5 + 1) * 5
            tick(now)
        now = finish
        containers[cid] = now
        state = observe_drained(state, now)
        tick(now)
    return warm, idle_s


def test_timer_is_prewarmed_after_learning_and_idles_less_than_fixed() -> None:
    adaptive_warm, adaptive_idle = drive_timer(CONFIG, 30)
    fixed_warm, fixed_idle = drive_timer(AutoscalerConfig(scaledown_window=600.0), 30)
    # Fixed 10 minutes: the container times out 1.5 minutes before every next run.
    assert not any(fixed_warm[1:])
    # Adaptive: once 5 idle times are known (6th run on), every run finds a warm container.
    assert all(adaptive_warm[6:])
    assert adaptive_idle < fixed_idle / 3
