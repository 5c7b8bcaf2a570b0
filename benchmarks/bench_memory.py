"""Control-plane resident memory once 100,000 finished inputs are stored.

Starts a fresh embedded control plane, reads its VmRSS (``/proc/<pid>/status``, the pid
from ``$STRATO_HOME/server.json``) while idle right after start (the baseline), then runs
maps of a no-op function until TOTAL inputs have finished (their outputs stay stored for
the retention period), and reads VmRSS again (plus VmHWM, the peak).
Target: RSS after < 300 MB.

    .venv/bin/python benchmarks/bench_memory.py [--total 100000] [--maps 4]
"""

from __future__ import annotations

import argparse
import time

from _common import emit, note, rss_kb, server_pid, strato_env

import strato

app = strato.App("bench-memory")


@app.function()
def noop(x):
    return x


TARGET_MB = 300.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total", type=int, default=100_000)
    ap.add_argument("--maps", type=int, default=4, help="split TOTAL over this many maps")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to wait before reading")
    args = ap.parse_args()

    with strato_env() as home:
        from strato.client import session

        session.api()  # starts the control plane, nothing else
        pid = server_pid()
        time.sleep(args.settle)
        idle = rss_kb(pid)
        note(f"control plane {pid} idle: {idle}")
        done = 0
        per_map = [args.total // args.maps] * args.maps
        per_map[-1] += args.total - sum(per_map)
        t0 = time.perf_counter()
        with app.run(quiet=True):
            for i, n in enumerate(per_map):
                got = sum(1 for _ in noop.map(range(n)))
                assert got == n
                done += got
                note(f"map {i + 1}/{args.maps}: {n} inputs; rss {rss_kb(pid)}")
            elapsed = time.perf_counter() - t0
            time.sleep(args.settle)
            after = rss_kb(pid)
        after_stop = rss_kb(pid)
        db_bytes = sum(f.stat().st_size for f in home.glob("state.db*") if f.is_file())
        note(f"after {done} inputs ({elapsed:.1f}s): {after}; after the app stopped: {after_stop}")
    before_mb = idle["VmRSS"] / 1024
    after_mb = after["VmRSS"] / 1024
    emit(
        {
            "benchmark": "control_plane_rss",
            "inputs": done,
            "rss_before_mb": round(before_mb, 1),
            "rss_after_mb": round(after_mb, 1),
            "rss_peak_mb": round(after["VmHWM"] / 1024, 1),
            "rss_after_app_stop_mb": round(after_stop["VmRSS"] / 1024, 1),
            "ratio": round(after_mb / before_mb, 3),
            "growth_kb_per_1k_inputs": round(
                (after["VmRSS"] - idle["VmRSS"]) / max(1, done) * 1000, 1
            ),
            "maps_s": round(elapsed, 2),
            "sqlite_mb": round(db_bytes / 2**20, 1),
            "target": f"rss_after_mb < {TARGET_MB:g}",
            "pass": after_mb < TARGET_MB,
        }
    )


if __name__ == "__main__":
    main()
