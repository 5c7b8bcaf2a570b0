"""``.map`` throughput over N no-op inputs: strato vs Ray.

strato: ``list(noop.map(range(N)))`` against a fresh embedded control plane, after a
warm-up map (so containers exist and the function is known to be fast).
Ray: ``ray.get([noop.remote(i) for i in range(N)])`` on ``ray.init(num_cpus=2)``, after
the same warm-up. strato runs first (its control plane is stopped before Ray starts).
Target: strato throughput >= 2x Ray's.

    .venv/bin/python benchmarks/bench_map.py [--n 20000] [--warmup 2000]
"""

from __future__ import annotations

import argparse
import time

from _common import (
    CpuMeter,
    emit,
    note,
    ray_env,
    server_pid,
    strato_env,
    wait_containers_settled,
)

import strato

app = strato.App("bench-map")


@app.function()
def noop(x):
    return x


def bench_strato(n: int, warmup: int, profile: str | None) -> dict:
    with strato_env():
        with app.run(quiet=True):
            t0 = time.perf_counter()
            assert list(noop.map(range(warmup))) == list(range(warmup))
            warm_s = time.perf_counter() - t0
            # the autoscaler may still be booting containers it asked for during the
            # warm-up: let them finish, and warm them too, so the timed map runs warm
            n_ct = wait_containers_settled(server_pid())
            list(noop.map(range(warmup)))
            stats = noop.get_current_stats()
            note(f"strato: {n_ct} container processes, {stats.num_total_runners} runners")
            if profile:
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
            meter = CpuMeter(server_pid())
            meter.start()
            t0 = time.perf_counter()
            out = list(noop.map(range(n)))
            elapsed = time.perf_counter() - t0
            cpu = meter.stop()
            if profile:
                prof.disable()
                prof.dump_stats(profile)
                note(f"client cProfile of the timed map written to {profile}")
            assert out == list(range(n)), "wrong or unordered map results"
    return {
        "seconds": round(elapsed, 3),
        "per_s": round(n / elapsed, 1),
        "warmup_s": round(warm_s, 3),
        "containers_after_warmup": stats.num_total_runners,
        "cpu_us_per_input": CpuMeter.per_item_us(cpu, n),
    }


def bench_ray(n: int, warmup: int) -> dict:
    with ray_env() as ray:

        @ray.remote
        def ray_noop(x):
            return x

        t0 = time.perf_counter()
        ray.get([ray_noop.remote(i) for i in range(warmup)])
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = ray.get([ray_noop.remote(i) for i in range(n)])
        elapsed = time.perf_counter() - t0
        assert out == list(range(n))
    return {
        "seconds": round(elapsed, 3),
        "per_s": round(n / elapsed, 1),
        "warmup_s": round(warm_s, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--profile", metavar="FILE", help="cProfile the client's timed map")
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()

    note(f"strato: warm-up map of {args.warmup}, then a timed map of {args.n}")
    s = bench_strato(args.n, args.warmup, args.profile)
    note(f"strato: {s}")
    r = None
    if not args.skip_ray:
        note(f"ray: warm-up of {args.warmup} tasks, then {args.n} timed tasks")
        r = bench_ray(args.n, args.warmup)
        note(f"ray: {r}")
    ratio = None if r is None else round(s["per_s"] / r["per_s"], 3)
    emit(
        {
            "benchmark": "map_throughput",
            "n": args.n,
            "strato_per_s": s["per_s"],
            "ray_per_s": None if r is None else r["per_s"],
            "strato_s": s["seconds"],
            "ray_s": None if r is None else r["seconds"],
            "ratio": ratio,
            "target": ">= 2.0",
            "pass": None if ratio is None else ratio >= 2.0,
            "strato_containers": s["containers_after_warmup"],
            "strato_cpu_us_per_input": s["cpu_us_per_input"],
        }
    )


if __name__ == "__main__":
    main()
