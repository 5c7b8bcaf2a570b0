"""Autoscaler policy: desired container count and start/stop decisions."""

from __future__ import annotations

from strato.server.autoscaler import (
    AutoscalerConfig,
    ContainerStat,
    FunctionStats,
    ScalingDecision,
    decide,
    desired_containers,
)

NOW = 1000.0


def ready(cid: str, *, idle_for: float | None = None, inflight: int = 0) -> ContainerStat:
    """A ready container; idle for ``idle_for`` seconds, or busy when ``idle_for`` is None."""
    idle_since = None if idle_for is None else NOW - idle_for
    if idle_for is None and inflight == 0:
        inflight = 1
    return ContainerStat(cid, "ready", inflight, idle_since, started_at=0.0)


def starting(cid: str) -> ContainerStat:
    return ContainerStat(cid, "starting", 0, None, started_at=NOW - 1)


def stopping(cid: str) -> ContainerStat:
    return ContainerStat(cid, "stopping", 0, NOW - 500, started_at=0.0)


def stats(queued: int = 0, inflight: int = 0, *containers: ContainerStat) -> FunctionStats:
    return FunctionStats(now=NOW, queued=queued, inflight=inflight, containers=list(containers))


# --- desired_containers ------------------------------------------------------------------


def test_no_work_no_containers() -> None:
    assert desired_containers(stats(), AutoscalerConfig()) == 0


def test_one_container_per_input_by_default() -> None:
    assert desired_containers(stats(queued=3, inflight=2), AutoscalerConfig()) == 5


def test_target_inputs_rounds_up() -> None:
    config = AutoscalerConfig(target_inputs=4)
    assert desired_containers(stats(queued=1), config) == 1
    assert desired_containers(stats(queued=4), config) == 1
    assert desired_containers(stats(queued=5), config) == 2
    assert desired_containers(stats(queued=6, inflight=3), config) == 3


def test_buffer_applies_only_with_work() -> None:
    config = AutoscalerConfig(buffer_containers=2)
    assert desired_containers(stats(), config) == 0
    assert desired_containers(stats(inflight=1), config) == 3


def test_min_containers_is_a_floor() -> None:
    config = AutoscalerConfig(min_containers=2)
    assert desired_containers(stats(), config) == 2
    assert desired_containers(stats(queued=1), config) == 2
    assert desired_containers(stats(queued=3), config) == 3


def test_max_containers_is_a_cap_including_buffer() -> None:
    config = AutoscalerConfig(max_containers=4, buffer_containers=3)
    assert desired_containers(stats(queued=100), config) == 4
    assert desired_containers(stats(queued=1), config) == 4
    assert desired_containers(stats(), config) == 0


def test_max_zero_means_none() -> None:
    assert desired_containers(stats(queued=5), AutoscalerConfig(max_containers=0)) == 0


# --- decide: starting --------------------------------------------------------------------


def test_scale_from_zero() -> None:
    assert decide(stats(queued=3), AutoscalerConfig()) == ScalingDecision(start=3, stop=[])


def test_starting_containers_count_as_live() -> None:
    decision = decide(stats(3, 0, starting("a"), starting("b")), AutoscalerConfig())
    assert decision == ScalingDecision(start=1, stop=[])


def test_stopping_containers_do_not_count() -> None:
    decision = decide(stats(2, 0, stopping("old"), stopping("older")), AutoscalerConfig())
    assert decision == ScalingDecision(start=2, stop=[])


def test_min_containers_started_without_work() -> None:
    assert decide(stats(), AutoscalerConfig(min_containers=2)) == ScalingDecision(2, [])


def test_start_is_capped_by_max() -> None:
    decision = decide(stats(50, 0, ready("a", inflight=1)), AutoscalerConfig(max_containers=3))
    assert decision == ScalingDecision(start=2, stop=[])


def test_enough_containers_starts_nothing() -> None:
    decision = decide(stats(0, 2, ready("a"), ready("b")), AutoscalerConfig())
    assert decision == ScalingDecision(start=0, stop=[])


# --- decide: stopping --------------------------------------------------------------------


def test_idle_container_stopped_after_window() -> None:
    config = AutoscalerConfig(scaledown_window=60)
    assert decide(stats(0, 0, ready("a", idle_for=60)), config) == ScalingDecision(0, ["a"])
    assert decide(stats(0, 0, ready("a", idle_for=59.9)), config) == ScalingDecision(0, [])


def test_busy_container_never_stopped() -> None:
    busy = ContainerStat("busy", "ready", inflight=1, idle_since=NOW - 10_000, started_at=0.0)
    assert decide(stats(0, 0, busy), AutoscalerConfig(scaledown_window=1)).stop == []


def test_starting_container_not_stopped() -> None:
    decision = decide(stats(0, 0, starting("s")), AutoscalerConfig(scaledown_window=0))
    assert decision == ScalingDecision(0, [])


def test_longest_idle_stopped_first_down_to_desired() -> None:
    containers = [
        ready("recent", idle_for=100),
        ready("oldest", idle_for=900),
        ready("busy"),
        ready("middle", idle_for=500),
    ]
    # Work of 2 keeps two containers: the busy one and the most recently idle one.
    decision = decide(stats(1, 1, *containers), AutoscalerConfig(scaledown_window=60))
    assert decision == ScalingDecision(0, ["oldest", "middle"])


def test_idle_ties_broken_by_container_id() -> None:
    containers = [ready("b", idle_for=100), ready("a", idle_for=100), ready("c", idle_for=100)]
    decision = decide(stats(0, 1, *containers), AutoscalerConfig(scaledown_window=10))
    assert decision.stop == ["a", "b"]


def test_min_containers_kept_even_when_idle() -> None:
    containers = [ready("a", idle_for=1000), ready("b", idle_for=500), ready("c", idle_for=10)]
    config = AutoscalerConfig(min_containers=2, scaledown_window=60)
    assert decide(stats(0, 0, *containers), config) == ScalingDecision(0, ["a"])


def test_only_expired_containers_are_stopped() -> None:
    containers = [ready("a", idle_for=1000), ready("b", idle_for=30), ready("c", idle_for=20)]
    decision = decide(stats(0, 0, *containers), AutoscalerConfig(scaledown_window=60))
    assert decision == ScalingDecision(0, ["a"])


def test_stopping_containers_are_not_stopped_again() -> None:
    decision = decide(stats(0, 0, stopping("x")), AutoscalerConfig(scaledown_window=0))
    assert decision == ScalingDecision(0, [])


def test_starting_containers_count_towards_surplus() -> None:
    # One input, one container already starting: the idle one is surplus once expired.
    containers = [starting("s"), ready("idle", idle_for=120)]
    decision = decide(stats(1, 0, *containers), AutoscalerConfig(scaledown_window=60))
    assert decision == ScalingDecision(0, ["idle"])


def test_lowered_max_stops_idle_containers_regardless_of_window() -> None:
    containers = [
        ready("busy1"),
        ready("fresh", idle_for=1),
        ready("older", idle_for=5),
        ready("busy2"),
    ]
    config = AutoscalerConfig(max_containers=2, scaledown_window=300)
    decision = decide(stats(0, 2, *containers), config)
    assert decision == ScalingDecision(0, ["older", "fresh"])


def test_lowered_max_never_stops_busy_containers() -> None:
    containers = [ready("b1"), ready("b2"), ready("b3"), ready("idle", idle_for=1)]
    config = AutoscalerConfig(max_containers=1, scaledown_window=300)
    assert decide(stats(0, 3, *containers), config) == ScalingDecision(0, ["idle"])


def test_lowered_max_plus_expired_window_does_not_overshoot() -> None:
    containers = [ready(f"c{i}", idle_for=1000 - i) for i in range(5)]
    config = AutoscalerConfig(max_containers=3, min_containers=2, scaledown_window=60)
    decision = decide(stats(0, 0, *containers), config)
    assert decision == ScalingDecision(0, ["c0", "c1", "c2"])


def test_decision_never_starts_and_stops_together() -> None:
    for queued in range(6):
        for idle in range(4):
            containers = [ready(f"i{n}", idle_for=100 + n) for n in range(idle)]
            decision = decide(stats(queued, 0, *containers), AutoscalerConfig(scaledown_window=50))
            assert not (decision.start and decision.stop)
            live_after = idle + decision.start - len(decision.stop)
            assert live_after == queued or (live_after > queued and not decision.stop)


def test_pure_function_does_not_mutate_inputs() -> None:
    containers = [ready("a", idle_for=100), ready("b")]
    s = stats(0, 1, *containers)
    config = AutoscalerConfig(scaledown_window=10)
    before = (repr(s), repr(config))
    first = decide(s, config)
    assert (repr(s), repr(config)) == before
    assert decide(s, config) == first


def test_decide_is_the_fixed_window_whatever_the_keepalive_fields_say() -> None:
    # decide() is the "fixed" policy: the adaptive policy's fields do not change it.
    containers = [ready("a", idle_for=1000), ready("b", idle_for=30)]
    s = stats(0, 0, *containers)
    plain = decide(s, AutoscalerConfig(scaledown_window=60))
    for keepalive in ("fixed", "adaptive", "hybrid"):
        config = AutoscalerConfig(scaledown_window=60, keepalive=keepalive, memory_mb=4096.0)
        assert decide(s, config) == plain == ScalingDecision(0, ["a"])
    assert AutoscalerConfig().keepalive == "fixed"
