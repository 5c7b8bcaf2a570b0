"""Warm ``.remote()`` round trip of a no-op function: strato vs Ray.

strato: ``noop.remote(i)`` against a fresh embedded control plane (one warm container).
Ray: ``ray.get(noop.remote(i))`` on ``ray.init(num_cpus=2)``. Each side gets WARMUP
untimed calls, then CALLS timed ones, one at a time. Target: strato p50 <= Ray p50.

    .venv/bin/python benchmarks/bench_remote.py [--calls 2000] [--warmup 200]
"""

from __future__ import annotations

import argparse
import time

from _common import CpuMeter, emit, latency_summary, note, ray_env, server_pid, strato_env

import strato

app = strato.App("bench-remote")


@app.function()
def noop(x):
    return x


def time_calls(call, n: int) -> list[float]:
    out = []
    perf = time.perf_counter
    for i in range(n):
        t0 = perf()
        call(i)
        out.append(perf() - t0)
    return out


def bench_strato(calls: int, warmup: int, profile: str | None) -> dict:
    with strato_env():
        with app.run(quiet=True):
            t0 = time.perf_counter()
            noop.remote(0)
            cold = time.perf_counter() - t0
            for i in range(warmup):
                assert noop.remote(i) == i
            if profile:
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
            meter = CpuMeter(server_pid())
            meter.start()
            samples = time_calls(noop.remote, calls)
            cpu = meter.stop()
            if profile:
                prof.disable()
                prof.dump_stats(profile)
                note(f"client cProfile of the timed strato calls written to {profile}")
    res = latency_summary(samples)
    res["first_call_ms"] = round(cold * 1e3, 2)
    res["cpu_us_per_call"] = CpuMeter.per_item_us(cpu, calls)
    return res


def bench_ray(calls: int, warmup: int) -> dict:
    with ray_env() as ray:

        @ray.remote
        def ray_noop(x):
            return x

        for i in range(warmup):
            assert ray.get(ray_noop.remote(i)) == i
        samples = time_calls(lambda i: ray.get(ray_noop.remote(i)), calls)
    return latency_summary(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--profile", metavar="FILE", help="cProfile the client's timed calls")
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()

    note(f"strato: {args.warmup} warm-up + {args.calls} timed .remote() calls")
    s = bench_strato(args.calls, args.warmup, args.profile)
    note(f"strato: {s}")
    r = None
    if not args.skip_ray:
        note(f"ray: {args.warmup} warm-up + {args.calls} timed ray.get(f.remote()) calls")
        r = bench_ray(args.calls, args.warmup)
        note(f"ray: {r}")
    for q in ("p50", "p90", "p99"):
        ratio = None if r is None else round(s[f"{q}_ms"] / r[f"{q}_ms"], 3)
        line = {
            "benchmark": f"remote_{q}",
            "strato_ms": s[f"{q}_ms"],
            "ray_ms": None if r is None else r[f"{q}_ms"],
            "ratio": ratio,
            "calls": args.calls,
        }
        if q == "p50":
            line["target"] = "<= 1.0"
            line["pass"] = None if ratio is None else ratio <= 1.0
            line["strato_cpu_us_per_call"] = s["cpu_us_per_call"]
        emit(line)


if __name__ == "__main__":
    main()
