"""Autoscaler replay: the Azure Functions 2019 sample under three keep-alive policies.

Drives a discrete-event simulation of the 500 functions of
``../shared/data/azure-functions-2019-sample`` (8 hours of per-minute invocation counts,
execution-time percentiles, allocated memory) under

- ``fixed_10min``: ``decide()`` with ``scaledown_window=600`` (what a user who sets
  ``scaledown_window=600`` gets; AWS Lambda's keep-alive);
- ``hybrid_histogram``: the hybrid histogram policy of Shahrad et al. (ATC 2020) as
  published (``keepalive="hybrid"``);
- ``strato_default``: the policy a function gets when the user sets no
  ``scaledown_window`` (``keepalive_for(None)``, i.e. ``"adaptive"``),

and prints one JSON object per policy, then one summary object with the ratios to the fixed
policy and whether strato's default beats it on both figures at once.

The model (the same code path for all three; only ``AutoscalerConfig`` differs):

- Each function is simulated on its own (no shared capacity). The invocations of minute
  ``m`` arrive at uniformly random times within that minute; each runs for a duration drawn
  from the function's execution-time percentiles (``durations.csv``, piecewise-linear
  between percentiles 0, 1, 25, 50, 75, 99, 100). Arrival times and durations come from a
  seeded generator and are identical for every policy.
- A container runs one input at a time (``target_inputs=1``, strato's default). An arriving
  input takes the most recently idle warm container; if the function has **no warm idle
  container at that instant**, the input is a **cold start** and a new container is started
  for it. Start-up takes no time in the model (a cold start is counted, not delayed), so
  the three policies see the same execution timeline.
- The simulator plays the control loop of ``autoscaler.adaptive``: ``observe_arrival`` for
  every input, ``observe_drained`` when the last running input finishes, and
  ``scale(stats, config, state)`` (the real policy functions from ``src/``) every
  ``--tick`` seconds while the function has containers, when it drains, and at the
  ``recheck_at`` time the policy asked for. Containers in ``decision.stop`` are stopped at
  once; ``decision.start`` containers start warm and idle (pre-warming).
- **Idle memory** is the function's memory (``AverageAllocatedMb`` of ``memory.csv``) times
  the time each of its containers spends warm but not running an input, up to the end of
  the 8 hours, in GB-minutes (1 GB = 1024 MB).

Besides the two figures each line carries the cold starts split into those that found the
function with no container at all (``cold_starts_from_zero``) and those of a burst that
outgrew its warm containers (``cold_starts_scale_up``), the container starts (cold plus
pre-warm: pre-warms cost start-up CPU, which neither figure counts), and the per-function
view of the paper (75th percentile of the functions' cold-start percentages).

Usage (about a minute on two cores; the functions are split over ``--jobs`` processes, the
result does not depend on it)::

    .venv/bin/python benchmarks/bench_autoscaler_replay.py [--data DIR] [--tick 10] [--seed 1]
        [--jobs N] [--sweep]

``--sweep`` adds fixed windows of 2, 5, 20 and 30 minutes and the adaptive policy at other
cold-start prices (0.25 to 4 GB-minutes), to compare the two trade-off curves (~3 minutes).
Exit status 1 when strato's default does not beat the fixed 10 minutes on both figures.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import math
import os
import random
import sys
import time
from bisect import bisect_right
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from strato.server.autoscaler.adaptive import (  # noqa: E402
    ADAPTIVE,
    PolicyState,
    Scaled,
    decide_adaptive,
    keepalive_for,
    observe_arrival,
    observe_drained,
    scale,
)
from strato.server.autoscaler.policy import (  # noqa: E402
    AutoscalerConfig,
    ContainerStat,
    FunctionStats,
)

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "azure-functions-2019-sample"
DURATION_PCTS = (0.0, 1.0, 25.0, 50.0, 75.0, 99.0, 100.0)
INF = math.inf

Policy = Callable[[FunctionStats, AutoscalerConfig, PolicyState], Scaled]

# name -> (config, the tick function): the three policies of the report all go through
# ``scale()``, the control loop's entry point; only the config differs.
POLICIES: dict[str, tuple[AutoscalerConfig, Policy]] = {
    "fixed_10min": (AutoscalerConfig(scaledown_window=600.0, keepalive="fixed"), scale),
    "hybrid_histogram": (AutoscalerConfig(keepalive="hybrid"), scale),
    "strato_default": (AutoscalerConfig(keepalive=keepalive_for(None)), scale),
}


def sweep_policies() -> dict[str, tuple[AutoscalerConfig, Policy]]:
    """--sweep: more fixed windows and more cold-start prices, to draw both trade-off curves."""
    extra: dict[str, tuple[AutoscalerConfig, Policy]] = {}
    for minutes in (2, 5, 20, 30):
        config = AutoscalerConfig(scaledown_window=60.0 * minutes, keepalive="fixed")
        extra[f"fixed_{minutes}min"] = (config, scale)
    for price in (0.25, 0.5, 2.0, 4.0):
        params = replace(ADAPTIVE, cold_start_gb_minutes=price)
        extra[f"adaptive_price_{price:g}"] = (
            AutoscalerConfig(keepalive="adaptive"),
            partial(decide_adaptive, params=params),
        )
    return extra


@dataclass
class Function:
    name: str
    trigger: str
    counts: list[int]  # invocations per minute
    duration_pcts_ms: list[float]  # at DURATION_PCTS
    memory_mb: float


@dataclass
class Outcome:
    invocations: int = 0
    cold: int = 0
    cold_from_zero: int = 0  # cold starts when the function had no container at all
    idle_mb_s: float = 0.0
    starts: int = 0
    prewarm_starts: int = 0
    policy_calls: int = 0
    wall_s: float = 0.0
    per_function_cold_pct: list[float] = field(default_factory=list)

    def add(self, other: Outcome) -> None:
        self.invocations += other.invocations
        self.cold += other.cold
        self.cold_from_zero += other.cold_from_zero
        self.idle_mb_s += other.idle_mb_s
        self.starts += other.starts
        self.prewarm_starts += other.prewarm_starts
        self.policy_calls += other.policy_calls
        self.wall_s += other.wall_s
        self.per_function_cold_pct += other.per_function_cold_pct


def load(data: Path) -> list[Function]:
    durations: dict[str, list[float]] = {}
    with open(data / "durations.csv", newline="") as f:
        for row in csv.DictReader(f):
            durations[row["HashFunction"]] = [
                float(row[f"percentile_Average_{int(p)}"]) for p in DURATION_PCTS
            ]
    memory: dict[str, float] = {}
    with open(data / "memory.csv", newline="") as f:
        for row in csv.DictReader(f):
            memory[row["HashFunction"]] = float(row["AverageAllocatedMb"])
    functions = []
    with open(data / "invocations.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        first_minute = header.index("Trigger") + 1
        for row in reader:
            name = row[2]
            functions.append(
                Function(
                    name=name,
                    trigger=row[3],
                    counts=[int(x) for x in row[first_minute:]],
                    duration_pcts_ms=durations[name],
                    memory_mb=memory[name],
                )
            )
    return functions


def workload(fn: Function, rng: random.Random) -> tuple[list[float], list[float]]:
    """Arrival times (s, sorted) and durations (s) of every invocation of ``fn``."""
    arrivals: list[float] = []
    durations: list[float] = []
    qs = [p / 100.0 for p in DURATION_PCTS]
    vs = [v / 1000.0 for v in fn.duration_pcts_ms]
    for minute, n in enumerate(fn.counts):
        if not n:
            continue
        base = minute * 60.0
        arrivals.extend(sorted(base + 60.0 * rng.random() for _ in range(n)))
        for _ in range(n):
            u = rng.random()
            i = min(len(qs) - 2, bisect_right(qs, u) - 1)
            span = qs[i + 1] - qs[i]
            durations.append(vs[i] + (vs[i + 1] - vs[i]) * (u - qs[i]) / span)
    return arrivals, durations


def simulate(
    arrivals: list[float],
    durations: list[float],
    memory_mb: float,
    config: AutoscalerConfig,
    horizon_s: float,
    tick_s: float,
    policy: Policy = scale,
) -> Outcome:
    """Replay one function's invocations under one policy (see the module docstring)."""
    out = Outcome(invocations=len(arrivals))
    idle_since: dict[str, float | None] = {}  # live containers: cid -> idle since, or busy
    started_at: dict[str, float] = {}
    idle_stack: list[str] = []  # idle containers, least recently idle first
    busy: list[tuple[float, int, str]] = []  # (finishes at, seq, cid)
    state = PolicyState()
    recheck: float | None = None
    clock = 0.0
    seq = 0

    def new_container(t: float, idle: bool) -> str:
        nonlocal seq
        seq += 1
        cid = f"c{seq}"
        started_at[cid] = t
        idle_since[cid] = t if idle else None
        if idle:
            idle_stack.append(cid)
        out.starts += 1
        return cid

    def tick(now: float) -> None:
        nonlocal state, recheck
        out.policy_calls += 1
        stats = FunctionStats(
            now=now,
            queued=0,
            inflight=len(busy),
            containers=[
                ContainerStat(cid, "ready", 0 if since is not None else 1, since, started_at[cid])
                for cid, since in idle_since.items()
            ],
        )
        result = policy(stats, config, state)
        state = result.state
        recheck = result.recheck_at
        for cid in result.decision.stop:
            since = idle_since.pop(cid)
            if since is None:
                raise AssertionError(f"the policy stopped busy container {cid}")
            out.idle_mb_s += (now - since) * memory_mb
            idle_stack.remove(cid)
            del started_at[cid]
        for _ in range(result.decision.start):
            new_container(now, idle=True)
            out.prewarm_starts += 1

    def advance(until: float) -> None:
        """Process completions, ticks and rechecks up to and including ``until``."""
        nonlocal state, clock
        while True:
            t_done = busy[0][0] if busy else INF
            t_tick = (math.floor(clock / tick_s) + 1) * tick_s if idle_since else INF
            t_check = recheck if recheck is not None else INF
            t = min(t_done, t_tick, t_check)
            if t > until:
                return
            clock = max(clock, t)
            if t == t_done:
                while busy and busy[0][0] == t:
                    _, _, cid = heapq.heappop(busy)
                    idle_since[cid] = t
                    idle_stack.append(cid)
                if not busy:
                    state = observe_drained(state, t)
                    tick(t)
            else:
                tick(t)

    for arrival, duration in zip(arrivals, durations, strict=True):
        # Fast path: nothing due before this arrival (the common case at high rates).
        if (
            (busy and busy[0][0] <= arrival)
            or (recheck is not None and recheck <= arrival)
            or (idle_since and (math.floor(clock / tick_s) + 1) * tick_s <= arrival)
        ):
            advance(arrival)
        clock = arrival
        state = observe_arrival(state, arrival)
        if idle_stack:
            cid = idle_stack.pop()
            since = idle_since[cid]
            assert since is not None
            out.idle_mb_s += (arrival - since) * memory_mb
        else:
            out.cold += 1
            if not idle_since:
                out.cold_from_zero += 1
            cid = new_container(arrival, idle=False)
        idle_since[cid] = None
        heapq.heappush(busy, (arrival + duration, seq, cid))
        seq += 1
    advance(horizon_s)
    for since in idle_since.values():
        if since is not None and since < horizon_s:
            out.idle_mb_s += (horizon_s - since) * memory_mb
    return out


def p75(values: list[float]) -> float:
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * 0.75
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_chunk(
    data: Path, seed: int, tick_s: float, names: list[str], start: int, step: int
) -> dict[str, Outcome]:
    """Simulate functions ``start, start + step, ...`` under the named policies."""
    policies = {**POLICIES, **sweep_policies()}
    functions = load(data)
    horizon_s = 60.0 * max(len(fn.counts) for fn in functions)
    totals = {name: Outcome() for name in names}
    for index in range(start, len(functions), step):
        fn = functions[index]
        arrivals, durations = workload(fn, random.Random(seed * 1_000_003 + index))
        if not arrivals:
            continue
        for name in names:
            config, policy = policies[name]
            config = replace(config, memory_mb=fn.memory_mb)
            t = time.perf_counter()
            o = simulate(arrivals, durations, fn.memory_mb, config, horizon_s, tick_s, policy)
            o.wall_s = time.perf_counter() - t
            o.per_function_cold_pct.append(100.0 * o.cold / o.invocations)
            totals[name].add(o)
    return totals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--tick", type=float, default=10.0, help="autoscaler tick, seconds")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=0, help="worker processes (0: one per CPU)")
    ap.add_argument(
        "--sweep", action="store_true", help="also other fixed windows and cold-start prices"
    )
    args = ap.parse_args()

    t0 = time.perf_counter()
    names = list(POLICIES) + (list(sweep_policies()) if args.sweep else [])
    jobs = args.jobs or min(4, os.cpu_count() or 1)
    totals = {name: Outcome() for name in names}
    if jobs == 1:
        chunks = [run_chunk(args.data, args.seed, args.tick, names, 0, 1)]
    else:
        with ProcessPoolExecutor(jobs) as pool:
            futures = [
                pool.submit(run_chunk, args.data, args.seed, args.tick, names, k, jobs)
                for k in range(jobs)
            ]
            chunks = [f.result() for f in futures]
    for chunk in chunks:
        for name in names:
            totals[name].add(chunk[name])

    results = {}
    all_policies = {**POLICIES, **sweep_policies()}
    for name in names:
        acc = totals[name]
        per_fn_cold = acc.per_function_cold_pct
        result = {
            "benchmark": "autoscaler_replay",
            "policy": name,
            "keepalive": all_policies[name][0].keepalive,
            "functions": len(per_fn_cold),
            "invocations": acc.invocations,
            "cold_starts": acc.cold,
            "cold_start_share": acc.cold / acc.invocations,
            "cold_starts_from_zero": acc.cold_from_zero,
            "cold_starts_scale_up": acc.cold - acc.cold_from_zero,
            "idle_gb_minutes": acc.idle_mb_s / 1024.0 / 60.0,
            "container_starts": acc.starts,
            "prewarm_starts": acc.prewarm_starts,
            "p75_function_cold_pct": p75(per_fn_cold),
            "functions_always_cold": sum(1 for c in per_fn_cold if c >= 100.0),
            "policy_calls": acc.policy_calls,
            "sim_cpu_s": round(acc.wall_s, 2),
        }
        if name not in POLICIES:
            result["sweep"] = True
        results[name] = result
        print(json.dumps(result), flush=True)

    base = results["fixed_10min"]
    summary: dict[str, object] = {
        "benchmark": "autoscaler_replay_summary",
        "baseline": "fixed_10min",
    }
    for name in ("hybrid_histogram", "strato_default"):
        r = results[name]
        summary[f"{name}_cold_share_ratio"] = r["cold_start_share"] / base["cold_start_share"]
        summary[f"{name}_idle_memory_ratio"] = r["idle_gb_minutes"] / base["idle_gb_minutes"]
    s = results["strato_default"]
    summary["strato_default_beats_fixed_on_both"] = (
        s["cold_start_share"] < base["cold_start_share"]
        and s["idle_gb_minutes"] < base["idle_gb_minutes"]
    )
    summary["tick_s"] = args.tick
    summary["seed"] = args.seed
    summary["jobs"] = jobs
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary), flush=True)
    return 0 if summary["strato_default_beats_fixed_on_both"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
