"""Warm ``.remote()`` from inside a container (over its channel) vs from a client (HTTP).

One embedded control plane, one app: ``noop`` (the callee, kept warm) and ``caller``,
a function whose container makes ``--calls`` timed ``noop.remote(i)`` calls one at a time
after ``--warmup`` untimed ones and returns the samples. The client then makes the same
number of ``noop.remote(i)`` calls itself. Both run on this machine in one run, one after
the other (``--rounds`` times, alternating; each side keeps its best round).
Target: nested p50 <= 1.2x the client's p50.

    .venv/bin/python benchmarks/bench_nested.py [--calls 1000] [--warmup 100] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

from _common import emit, latency_summary, note, strato_env

import strato

app = strato.App("bench-nested")


@app.function()
def noop(x):
    return x


@app.function()
def caller(calls: int, warmup: int) -> list[float]:
    for i in range(warmup):
        assert noop.remote(i) == i
    return _time_calls(noop.remote, calls)


def _time_calls(call, n: int) -> list[float]:
    out = []
    perf = time.perf_counter
    for i in range(n):
        t0 = perf()
        call(i)
        out.append(perf() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    best: dict[str, dict] = {}
    with strato_env(), app.run(quiet=True):
        for i in range(args.warmup):
            noop.remote(i)
        for r in range(args.rounds):
            nested = latency_summary(caller.remote(args.calls, args.warmup))
            client = latency_summary(_time_calls(noop.remote, args.calls))
            note(f"round {r}: nested {nested}, client {client}")
            for side, res in (("nested", nested), ("client", client)):
                if side not in best or res["p50_ms"] < best[side]["p50_ms"]:
                    best[side] = res
    for q in ("p50", "p90", "p99"):
        ratio = round(best["nested"][f"{q}_ms"] / best["client"][f"{q}_ms"], 3)
        line = {
            "benchmark": f"nested_remote_{q}",
            "nested_ms": best["nested"][f"{q}_ms"],
            "client_ms": best["client"][f"{q}_ms"],
            "ratio": ratio,
            "calls": args.calls,
        }
        if q == "p50":
            line["target"] = "<= 1.2"
            line["pass"] = ratio <= 1.2
        emit(line)


if __name__ == "__main__":
    main()
