"""Sandboxes: time-to-interactive and exec round trip, against bare process starts.

- **time-to-interactive** (per runtime, bwrap and gVisor, cold: no warm pool):
  ``Sandbox.create(runtime=...)`` until the first line of ``sb.exec("echo", "hi")``'s
  stdout reaches the client, i.e. one create request, the placement, the worker's start
  of the container (a fork of the zygote under bwrap; runsc under gVisor), the agent's
  hello, the exec request and the first output long-poll. Targets on a 2-core machine:
  p50 < 100 ms (bwrap), < 300 ms (gVisor).
- **exec round trip** on a live sandbox (per runtime): ``sb.exec("echo", "hi")`` until
  its whole output (to EOF) is read. Target: p50 < 10 ms.
- **time-to-interactive from the warm pool** (gVisor; a second control plane with
  ``STRATO_SANDBOX_WARM_POOL=2``): ``create`` hands out a sandbox started ahead (the
  pool is given time to refill between runs, untimed). Target: p50 < 100 ms.
- ``--idle N``: memory per idle sandbox instead (N per runtime alive at once, e.g. 100:
  sandboxes without ``cpu=`` reserve 1/64 core, so 100 fit on 2 cores): the PSS and RSS
  growth of the control plane's process tree per sandbox, and how many answered an exec
  (gVisor only where the machine has 64 MiB available per sandbox).
- **baselines**, measured in the same run, interleaved with the above: a bare
  ``subprocess.run(["echo", "hi"])``, and ``bwrap ... echo hi`` (a new mount, PID, IPC,
  UTS and network namespace over a read-only host root; no cgroup, no image).

One JSON line per result, with the ratio of its p50 to the bare subprocess's (and, for
bwrap, to bare bwrap's).

    .venv/bin/python benchmarks/bench_sandbox.py [--runs 30] [--warmup 3]
        [--runtimes bwrap,gvisor]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

from _common import descendants, emit, latency_summary, note, server_pid, strato_env

import strato

TARGET_TTI_MS = {"bwrap": 100.0, "gvisor": 300.0}
TARGET_EXEC_MS = 10.0
BWRAP = [
    "bwrap",
    "--ro-bind", "/", "/",
    "--dev", "/dev",
    "--proc", "/proc",
    "--unshare-all",
    "--die-with-parent",
    "echo", "hi",
]  # fmt: skip


def bare() -> float:
    t0 = time.perf_counter()
    subprocess.run(["echo", "hi"], check=True, capture_output=True)
    return time.perf_counter() - t0


def bare_bwrap() -> float:
    t0 = time.perf_counter()
    subprocess.run(BWRAP, check=True, capture_output=True)
    return time.perf_counter() - t0


def runsc_bundle() -> list[str]:
    """``runsc run`` of ``echo hi`` over the host's root, read-only (no network, no
    cgroup, no mounts of strato's), on the gvisor runtime's platform: gVisor's own start
    and exit, the floor under a gVisor sandbox's time-to-interactive."""
    tmp = tempfile.mkdtemp(prefix="bench-runsc-")
    atexit.register(shutil.rmtree, tmp, True)  # (the bundle and runsc's state)
    spec = {
        "ociVersion": "1.0.0",
        "process": {"args": ["echo", "hi"], "env": ["PATH=/usr/bin:/bin"], "cwd": "/",
                    "user": {"uid": 0, "gid": 0}},
        "root": {"path": "/", "readonly": True},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")]},
    }  # fmt: skip
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(spec, f)
    platform = os.environ.get("STRATO_GVISOR_PLATFORM") or "ptrace"
    return ["runsc", f"--root={tmp}/state", f"--platform={platform}", "--network=none",
            "--ignore-cgroups", "run", f"--bundle={tmp}"]  # fmt: skip


def bare_runsc(argv: list[str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([*argv, f"bench-{uuid.uuid4().hex[:12]}"], check=True, capture_output=True)
    elapsed = time.perf_counter() - t0
    assert out.stdout == b"hi\n", out
    return elapsed


def time_to_interactive(app: strato.App, runtime: str) -> float:
    t0 = time.perf_counter()
    sb = strato.Sandbox.create(app=app, runtime=runtime, timeout=60)
    p = sb.exec("echo", "hi")
    first = next(iter(p.stdout))
    elapsed = time.perf_counter() - t0
    assert first == "hi\n", first
    sb.terminate()
    return elapsed


POOL_REFILL_S = 2.5  # (untimed) between hand-outs: the pool starts the next one


def exec_round_trip(sb: strato.Sandbox) -> float:
    t0 = time.perf_counter()
    out = sb.exec("echo", "hi").stdout.read()
    elapsed = time.perf_counter() - t0
    assert out == "hi\n", out
    return elapsed


def pss_kb(pids: list[int], field: str = "Pss:") -> int:
    """The proportional set size of these processes together (shared pages split);
    ``field="Rss:"``: their resident sets added up (shared pages counted in each)."""
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith(field):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


IDLE_GVISOR_MIB = 64  # (generous) what one idle gVisor sandbox may need: run only where
# the machine has that much available per sandbox


def mem_available_mib() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) >> 10
    return 0


def idle_memory(names: list[str], n: int) -> None:
    """Memory per idle sandbox: ``n`` sandboxes per runtime alive at once (each has run
    one exec), as the growth of the PSS of the control plane's process tree (worker,
    zygotes, runsc, agents), against an idle bare ``python3`` process (the agent is one)."""
    bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    time.sleep(0.5)
    bare_kb = pss_kb([bare.pid])
    bare.kill()
    with strato_env():
        app = strato.App.lookup(f"bench-idle-{uuid.uuid4().hex[:6]}", create_if_missing=True)
        strato.Sandbox.create(app=app, runtime="bwrap").terminate()  # (the server is up)
        pid = server_pid()
        for name in names:
            if name == "gvisor" and mem_available_mib() < n * IDLE_GVISOR_MIB:
                note(f"gvisor: skipped, under {n * IDLE_GVISOR_MIB} MiB available for {n}")
                continue
            time.sleep(2.0)
            tree = descendants(pid)
            before, before_rss = pss_kb(tree), pss_kb(tree, "Rss:")
            made = [strato.Sandbox.create(app=app, runtime=name, timeout=600) for _ in range(n)]
            answered = sum(
                sb.exec("echo", f"sb {i}").stdout.read() == f"sb {i}\n" for i, sb in enumerate(made)
            )
            time.sleep(2.0)
            tree = descendants(pid)
            per = (pss_kb(tree) - before) / n
            emit(
                {
                    "bench": "sandbox",
                    "what": f"memory per idle sandbox, {name} ({n} alive at once)",
                    "answered_exec": answered,
                    "all_alive": all(sb.poll() is None for sb in made),
                    "pss_kib_per_sandbox": round(per),
                    "rss_kib_per_sandbox": round((pss_kb(tree, "Rss:") - before_rss) / n),
                    "bare_python_pss_kib": bare_kb,
                    "ratio_to_bare_python": round(per / bare_kb, 2),
                }
            )
            for sb in made:
                sb.terminate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runtimes", default="bwrap,gvisor")
    ap.add_argument("--no-pool", dest="pool", action="store_false", help="skip the warm pool")
    ap.add_argument("--idle", type=int, default=0, help="only: memory of N idle sandboxes")
    args = ap.parse_args()
    names = [n for n in args.runtimes.split(",") if n]
    missing = [n for n in names if not shutil.which("runsc" if n == "gvisor" else n)]
    if missing:
        raise SystemExit(f"not installed: {', '.join(missing)}")
    if args.idle:
        idle_memory(names, args.idle)
        return
    samples: dict[str, list[float]] = {"bare": [], "bare_bwrap": []}
    samples.update({f"tti_{n}": [] for n in names})
    samples.update({f"exec_{n}": [] for n in names})
    runsc = runsc_bundle() if "gvisor" in names else None
    if runsc is not None:
        samples["bare_runsc"] = []
    with strato_env():
        app = strato.App.lookup(f"bench-sandbox-{uuid.uuid4().hex[:6]}", create_if_missing=True)
        live = {n: strato.Sandbox.create(app=app, runtime=n, timeout=3600) for n in names}
        try:
            for i in range(args.warmup + args.runs):
                row = {"bare": bare(), "bare_bwrap": bare_bwrap()}
                if runsc is not None:
                    row["bare_runsc"] = bare_runsc(runsc)
                for n in names:
                    row[f"tti_{n}"] = time_to_interactive(app, n)
                    row[f"exec_{n}"] = exec_round_trip(live[n])
                if i >= args.warmup:
                    for k, v in row.items():
                        samples[k].append(v)
        finally:
            for sb in live.values():
                sb.terminate()
    if args.pool and "gvisor" in names:
        # a second control plane with a warm pool for its default runtime (gVisor)
        samples["tti_gvisor_pool"] = []
        os.environ["STRATO_SANDBOX_WARM_POOL"] = "2"
        os.environ["STRATO_SANDBOX_RUNTIME"] = "gvisor"
        with strato_env():
            app = strato.App.lookup(f"bench-pool-{uuid.uuid4().hex[:6]}", create_if_missing=True)
            for i in range(args.warmup + args.runs):
                time.sleep(POOL_REFILL_S)
                row = {"bare": bare(), "tti_gvisor_pool": time_to_interactive(app, "gvisor")}
                if i >= args.warmup:
                    for k, v in row.items():
                        samples[k].append(v)
    base = latency_summary(samples["bare"])
    base_bwrap = latency_summary(samples["bare_bwrap"])
    emit({"bench": "sandbox", "what": "bare subprocess.run(['echo'])", **base})
    emit({"bench": "sandbox", "what": "bare bwrap ... echo", **base_bwrap,
          "ratio_to_bare": round(base_bwrap["p50_ms"] / base["p50_ms"], 2)})  # fmt: skip
    if runsc is not None:
        base_runsc = latency_summary(samples["bare_runsc"])
        emit({"bench": "sandbox", "what": "bare runsc run ... echo", **base_runsc,
              "ratio_to_bare": round(base_runsc["p50_ms"] / base["p50_ms"], 2)})  # fmt: skip
    for n in names:
        tti = latency_summary(samples[f"tti_{n}"])
        result = {
            "bench": "sandbox",
            "what": f"time-to-interactive, {n}, cold",
            **tti,
            "ratio_to_bare": round(tti["p50_ms"] / base["p50_ms"], 1),
            "target_p50_ms": TARGET_TTI_MS[n],
            "meets_target": tti["p50_ms"] < TARGET_TTI_MS[n],
        }
        if n == "bwrap":
            result["ratio_to_bare_bwrap"] = round(tti["p50_ms"] / base_bwrap["p50_ms"], 1)
        if n == "gvisor":
            result["ratio_to_bare_runsc"] = round(tti["p50_ms"] / base_runsc["p50_ms"], 2)
        emit(result)
        ex = latency_summary(samples[f"exec_{n}"])
        emit(
            {
                "bench": "sandbox",
                "what": f"exec round trip on a live sandbox, {n}",
                **ex,
                "ratio_to_bare": round(ex["p50_ms"] / base["p50_ms"], 1),
                "target_p50_ms": TARGET_EXEC_MS,
                "meets_target": ex["p50_ms"] < TARGET_EXEC_MS,
            }
        )
    if samples.get("tti_gvisor_pool"):
        tti = latency_summary(samples["tti_gvisor_pool"])
        emit(
            {
                "bench": "sandbox",
                "what": "time-to-interactive, gvisor, from the warm pool",
                **tti,
                "ratio_to_bare": round(tti["p50_ms"] / base["p50_ms"], 1),
                "target_p50_ms": 100.0,
                "meets_target": tti["p50_ms"] < 100.0,
            }
        )
    note(f"{args.runs} runs each after {args.warmup} warm-up runs, interleaved")


if __name__ == "__main__":
    main()
