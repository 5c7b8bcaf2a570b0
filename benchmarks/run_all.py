"""Run every strato benchmark, each against a fresh control plane, and print their JSON.

Each benchmark runs as its own process with a fresh ``STRATO_HOME`` (a temporary
directory, removed afterwards) and a free port in ``STRATO_SERVER_URL``; its JSON result
lines go to stdout, progress to stderr. Exits 1 when a target is missed or a benchmark
fails.

    .venv/bin/python benchmarks/run_all.py                 # all of them
    .venv/bin/python benchmarks/run_all.py remote memory   # some of them
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import free_port

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "remote": "bench_remote.py",
    "map": "bench_map.py",
    "memory": "bench_memory.py",
    "container_start": "bench_container_start.py",
    "autoscaler_replay": "bench_autoscaler_replay.py",
    "web": "bench_web.py",
    "cold_start": "bench_cold_start.py",
    "image_build": "bench_image_build.py",
    "store_latency": "bench_store_latency.py",
    "nested": "bench_nested.py",
}
TIMEOUT_S = 300


def run_one(name: str, extra: list[str], quiet: bool) -> tuple[list[dict], bool]:
    home = tempfile.mkdtemp(prefix=f"strato-bench-{name}-")
    env = dict(
        os.environ,
        STRATO_HOME=home,
        STRATO_SERVER_URL=f"http://127.0.0.1:{free_port()}",
        STRATO_LOG_LEVEL=os.environ.get("STRATO_LOG_LEVEL", "WARNING"),
    )
    env.pop("STRATO_TOKEN", None)
    cmd = [sys.executable, str(HERE / BENCHMARKS[name]), *extra]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            env=env,
            cwd=HERE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if quiet else None,
            text=True,
            timeout=TIMEOUT_S,
        )
        ok = proc.returncode == 0
        out = proc.stdout
    except subprocess.TimeoutExpired as e:
        ok = False
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(f"[run_all] {name} ran past {TIMEOUT_S}s", file=sys.stderr)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    results = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                results.append(json.loads(line))
            except ValueError:
                pass
    print(
        f"[run_all] {name}: exit {'ok' if ok else 'FAILED'} in {time.monotonic() - t0:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    return results, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("only", nargs="*", help=f"some of {', '.join(BENCHMARKS)} (default: all)")
    ap.add_argument("--quiet", action="store_true", help="hide the benchmarks' progress")
    args = ap.parse_args()
    names = args.only or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    all_ok = True
    for name in names:
        results, ok = run_one(name, [], args.quiet)
        all_ok &= ok and bool(results)
        for r in results:
            print(json.dumps(r), flush=True)
            if r.get("pass") is False:
                all_ok = False
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
