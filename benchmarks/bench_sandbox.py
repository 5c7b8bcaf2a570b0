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
  UTS and network namespace over a read-only host root; no cgroup, no image). With
  gVisor, the floors under its figures:

  - ``runsc run ... echo hi`` over the host's root (gVisor's own start and exit), and the
    same run to its first output (its start only: what a time-to-interactive waits for);
  - ``runsc run`` of a bundle the gvisor runtime writes (its minimal root, binds, user,
    limits and tmpfs folders, without network) running ``echo hi``, to its first output:
    what strato's bundle adds to gVisor's start;
  - inside one live gVisor sandbox (``runsc run`` of a small Python loop over the host's
    root), ``posix_spawn`` + read to EOF + ``waitpid`` of ``/bin/echo hi``, with the locale
    every sandbox process has (``LANG=C.UTF-8``: echo reads the locale's files, a few ms
    under gVisor): what an exec costs gVisor itself, the floor under an exec round trip
    (its ratio is ``ratio_to_bare_spawn_in_gvisor``); and of ``python3 -S -c "print('hi')"``, the
    interpreter's start inside gVisor (what a Python sandbox agent pays at start).

One JSON line per result, with the ratio of its p50 to the bare subprocess's (and, for
bwrap, to bare bwrap's; for gVisor, to the floors above).

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


BWRAP_RETRIED = [0]  # bare bwraps run again (see bare_bwrap), noted at the end


def bare_bwrap() -> float:
    """``BWRAP`` once. Its ``--ro-bind / /`` copies every mount of the host, the roots of
    this run's sandboxes too: one torn down meanwhile fails it ("Can't bind mount ...
    remount ...: No such file or directory"), which is no cost of bwrap's: that one is
    run again, untimed until it succeeds."""
    for _ in range(5):
        t0 = time.perf_counter()
        p = subprocess.run(BWRAP, capture_output=True)
        elapsed = time.perf_counter() - t0
        if p.returncode == 0:
            return elapsed
        if b"No such file or directory" not in p.stderr:
            break
        BWRAP_RETRIED[0] += 1
    raise RuntimeError(f"bare bwrap failed: {p.stderr.decode(errors='replace')}")


def runsc_bundle(args: list[str] | None = None) -> list[str]:
    """``runsc run`` of ``echo hi`` (or ``args``) over the host's root, read-only (no
    network, no cgroup, no mounts of strato's), on the gvisor runtime's platform: gVisor's
    own start and exit, the floor under a gVisor sandbox's time-to-interactive."""
    tmp = tempfile.mkdtemp(prefix="bench-runsc-")
    atexit.register(shutil.rmtree, tmp, True)  # (the bundle and runsc's state)
    spec = {
        "ociVersion": "1.0.0",
        "process": {"args": args or ["echo", "hi"], "env": ["PATH=/usr/bin:/bin"], "cwd": "/",
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


def bare_runsc(argv: list[str]) -> tuple[float, float]:
    """One ``runsc run`` of ``argv``'s bundle (``echo hi``): the seconds to its output's
    first byte (its start) and to its exit (start, run and teardown)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [*argv, f"bench-{uuid.uuid4().hex[:12]}"],
        bufsize=0,  # (unbuffered: communicate() reads the rest from the pipe itself)
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert p.stdout is not None
    first = p.stdout.read(1)
    started = time.perf_counter() - t0
    rest, err = p.communicate()
    elapsed = time.perf_counter() - t0
    assert p.returncode == 0 and first + rest == b"hi\n", (p.returncode, first + rest, err)
    return started, elapsed


def strato_runsc_bundle() -> list[str]:
    """``runsc run`` argv of a bundle that the gvisor runtime itself writes (``_bundle``:
    its minimal root on a tmpfs, the interpreter's and ``/etc`` binds, user 65534, no
    capabilities, rlimits, sized tmpfs folders), running ``echo hi`` without network and
    without a cgroup: strato's bundle under gVisor's start, nothing else of strato's."""
    from strato.runtime.base import ContainerLaunch
    from strato.runtime.gvisor import GvisorRuntime

    tmp = tempfile.mkdtemp(prefix="bench-strato-bundle-")
    rt = GvisorRuntime(use_cgroups=False, state_dir=tmp)
    rt.runsc_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    launch = ContainerLaunch(
        container_id="bench-bundle",
        argv=[sys.executable, "-S"],  # (its root binds the interpreter, as an agent's)
        env={},
        cwd="/",
        pids_max=4096,
        disk_mb=4096,
        block_network=True,
    )
    container_dir = rt._bundle(launch, {"PATH": "/usr/bin:/bin", "HOME": "/root"})

    def remove() -> None:
        container_dir.remove()
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(remove)
    config = container_dir.path / "config.json"
    spec = json.loads(config.read_text())
    spec["process"]["args"] = ["/bin/echo", "hi"]
    config.write_text(json.dumps(spec))
    return rt._runsc("run", f"--bundle={container_dir.path}")


SPAWN_PROBE = r"""
import os, sys, time
def spawn(argv, want):
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                         file_actions=[(os.POSIX_SPAWN_DUP2, w, 1), (os.POSIX_SPAWN_CLOSE, r)])
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.waitpid(pid, 0)
    elapsed = time.perf_counter() - t0
    os.close(r)
    assert out == want, out
    return elapsed
while sys.stdin.buffer.readline():
    echo = spawn(["/bin/echo", "hi"], b"hi\n")
    python = spawn([sys.executable, "-S", "-c", "print('hi')"], b"hi\n")
    sys.stdout.write(f"{echo:.9f} {python:.9f}\n")
    sys.stdout.flush()
"""


class SpawnProbe:
    """One live gVisor sandbox (``runsc run`` over the host's root, read-only, as
    :func:`runsc_bundle`'s) running :data:`SPAWN_PROBE`: each :meth:`measure` has it
    time, inside gVisor, ``posix_spawn`` + reading to EOF + ``waitpid`` of ``/bin/echo hi``
    (an exec's floor) and of ``python3 -S -c "print('hi')"`` (an interpreter's start)."""

    def __init__(self) -> None:
        argv = runsc_bundle([sys.executable, "-S", "-c", SPAWN_PROBE])
        self.proc = subprocess.Popen(
            [*argv, f"bench-probe-{uuid.uuid4().hex[:8]}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def measure(self) -> tuple[float, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the spawn probe in gVisor exited ({self.proc.wait()})")
        echo, python = line.split()
        return float(echo), float(python)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # (its loop ends, and the sandbox with it)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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
    strato_runsc = strato_runsc_bundle() if runsc is not None else None
    probe = SpawnProbe() if runsc is not None else None
    if runsc is not None:
        for k in ("bare_runsc", "bare_runsc_start", "strato_runsc_start"):
            samples[k] = []
        samples["spawn_in_gvisor"], samples["python_in_gvisor"] = [], []
    with strato_env():
        app = strato.App.lookup(f"bench-sandbox-{uuid.uuid4().hex[:6]}", create_if_missing=True)
        live = {n: strato.Sandbox.create(app=app, runtime=n, timeout=3600) for n in names}
        try:
            for i in range(args.warmup + args.runs):
                row = {"bare": bare(), "bare_bwrap": bare_bwrap()}
                if runsc is not None and strato_runsc is not None and probe is not None:
                    row["bare_runsc_start"], row["bare_runsc"] = bare_runsc(runsc)
                    row["strato_runsc_start"] = bare_runsc(strato_runsc)[0]
                    row["spawn_in_gvisor"], row["python_in_gvisor"] = probe.measure()
                for n in names:
                    row[f"tti_{n}"] = time_to_interactive(app, n)
                    row[f"exec_{n}"] = exec_round_trip(live[n])
                if i >= args.warmup:
                    for k, v in row.items():
                        samples[k].append(v)
        finally:
            for sb in live.values():
                sb.terminate()
            if probe is not None:
                probe.close()
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
        runsc_start = latency_summary(samples["bare_runsc_start"])
        emit({"bench": "sandbox", "what": "bare runsc run ... echo, to its first output",
              **runsc_start,
              "ratio_to_bare": round(runsc_start["p50_ms"] / base["p50_ms"], 2)})  # fmt: skip
        strato_start = latency_summary(samples["strato_runsc_start"])
        emit({"bench": "sandbox",
              "what": "runsc run of the gvisor runtime's bundle ... echo, to its first output",
              **strato_start,
              "ratio_to_bare_runsc_start": round(
                  strato_start["p50_ms"] / runsc_start["p50_ms"], 2)})  # fmt: skip
        spawn_gv = latency_summary(samples["spawn_in_gvisor"])
        emit({"bench": "sandbox",
              "what": "posix_spawn + waitpid of echo inside a live gVisor sandbox",
              **spawn_gv,
              "ratio_to_bare": round(spawn_gv["p50_ms"] / base["p50_ms"], 2)})  # fmt: skip
        python_gv = latency_summary(samples["python_in_gvisor"])
        emit({"bench": "sandbox",
              "what": "python3 -S start (print) inside a live gVisor sandbox",
              **python_gv,
              "ratio_to_bare": round(python_gv["p50_ms"] / base["p50_ms"], 2)})  # fmt: skip
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
            result["ratio_to_bare_runsc_start"] = round(tti["p50_ms"] / runsc_start["p50_ms"], 2)
            # what is left once gVisor's start (its bare floor) is taken off
            result["over_bare_runsc_start_ms"] = round(tti["p50_ms"] - runsc_start["p50_ms"], 1)
        emit(result)
        ex = latency_summary(samples[f"exec_{n}"])
        exec_result = {
            "bench": "sandbox",
            "what": f"exec round trip on a live sandbox, {n}",
            **ex,
            "ratio_to_bare": round(ex["p50_ms"] / base["p50_ms"], 1),
            "target_p50_ms": TARGET_EXEC_MS,
            "meets_target": ex["p50_ms"] < TARGET_EXEC_MS,
        }
        if n == "gvisor":
            exec_result["ratio_to_bare_spawn_in_gvisor"] = round(
                ex["p50_ms"] / spawn_gv["p50_ms"], 2
            )
            exec_result["over_bare_spawn_in_gvisor_ms"] = round(
                ex["p50_ms"] - spawn_gv["p50_ms"], 1
            )
        emit(exec_result)
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
    if BWRAP_RETRIED[0]:
        note(f"{BWRAP_RETRIED[0]} bare bwrap(s) run again: a sandbox's mount vanished mid-bind")


if __name__ == "__main__":
    main()
