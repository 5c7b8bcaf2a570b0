"""Container start overhead: ``python -c "import json"`` from start to exit, per runtime.

Baseline: the same command as a bare subprocess (``asyncio.create_subprocess_exec`` with
piped stdout/stderr, read to EOF, waited for). Each runtime runs the same command without
an image (the host's root, read-only, so the same interpreter), through ``Runtime.start``
-> stdout/stderr read to EOF -> ``wait()``, i.e. including its cgroup (created, joined,
removed) and, for gVisor, the sandbox and its root filesystem view. The runs are
interleaved (bare, bwrap, gvisor, bare, ...) so that drift on a shared machine hits all
alike; the median of RUNS each (after WARMUP) is compared. Target: bwrap adds <= 20 ms to
the median (gVisor and the process runtime are reported, with no target).

Needs root (cgroups; gVisor). One JSON line per runtime on stdout:

    .venv/bin/python benchmarks/bench_container_start.py [--runs 30] [--warmup 3]
        [--runtimes bwrap,gvisor,process]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import time
import uuid

from _common import emit, latency_summary, note

from strato.runtime import ContainerLaunch, get_runtime
from strato.runtime.base import Runtime

COMMAND = [sys.executable, "-c", "import json"]
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
TARGET_ADDED_MS = {"bwrap": 20.0}
BINARIES = {"bwrap": "bwrap", "gvisor": "runsc"}


async def bare() -> float:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *COMMAND,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=ENV,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    await asyncio.gather(proc.stdout.read(), proc.stderr.read())
    assert await proc.wait() == 0
    return time.perf_counter() - t0


async def contained(runtime: Runtime) -> float:
    spec = ContainerLaunch(f"bench-{uuid.uuid4().hex[:12]}", COMMAND, dict(ENV), cwd="/")
    t0 = time.perf_counter()
    c = await runtime.start(spec)
    _, err = await asyncio.gather(c.stdout.read(), c.stderr.read())
    status = await c.wait()
    elapsed = time.perf_counter() - t0
    if status.exit_code != 0:
        raise RuntimeError(f"{runtime.name}: {status.description}: {err.decode()}")
    return elapsed


async def measure(names: list[str], runs: int, warmup: int) -> dict[str, list[float]]:
    runtimes = {name: get_runtime(name) for name in names}
    for rt in runtimes.values():
        note(rt.describe())
    samples: dict[str, list[float]] = {"bare": [], **{n: [] for n in names}}
    for i in range(warmup + runs):
        rows = [("bare", await bare())]
        for name, rt in runtimes.items():
            rows.append((name, await contained(rt)))
        if i >= warmup:
            for name, seconds in rows:
                samples[name].append(seconds)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runtimes", default="bwrap,gvisor,process")
    args = ap.parse_args()
    names = []
    for name in args.runtimes.split(","):
        binary = BINARIES.get(name)
        if binary is not None and shutil.which(binary) is None:
            note(f"skipping {name}: {binary} is not installed")
            continue
        names.append(name)
    samples = asyncio.run(measure(names, args.runs, args.warmup))
    base_ms = statistics.median(samples["bare"]) * 1e3
    ok = True
    for name in names:
        p50_ms = statistics.median(samples[name]) * 1e3
        added = p50_ms - base_ms
        target = TARGET_ADDED_MS.get(name)
        passed = None if target is None else added <= target
        ok = ok and passed is not False
        emit(
            {
                "benchmark": f"container_start_{name}",
                "command": "python -c 'import json'",
                "runs": args.runs,
                "bare_p50_ms": round(base_ms, 2),
                "p50_ms": round(p50_ms, 2),
                "added_ms": round(added, 2),
                "ratio": round(p50_ms / base_ms, 3),
                "target": None if target is None else f"added_ms <= {target:g}",
                "pass": passed,
                "runtime": latency_summary(samples[name]),
                "bare": latency_summary(samples["bare"]),
            }
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
