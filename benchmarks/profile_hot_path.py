"""Sample the strato hot path with py-spy while a benchmark workload runs.

Runs ``remote`` (back-to-back ``noop.remote()`` calls) or ``map`` (``noop.map`` over N
inputs) against a fresh control plane, with ``py-spy record`` attached to the control
plane and to one container, and prints the functions that hold the most samples
(inclusive and self), per process. Raw collapsed stacks are kept with ``--keep DIR``.

    .venv/bin/pip install py-spy
    .venv/bin/python benchmarks/profile_hot_path.py remote --seconds 10
    .venv/bin/python benchmarks/profile_hot_path.py map --n 20000
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import note, server_pid, strato_env

import strato

app = strato.App("bench-profile")


@app.function()
def noop(x):
    return x


def _children(pid: int) -> list[int]:
    try:
        out = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(p) for p in out]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def container_pids(server: int) -> list[int]:
    out = []
    stack = [server]
    while stack:
        p = stack.pop()
        for c in _children(p):
            if "strato.container" in _cmdline(c):
                out.append(c)
            stack.append(c)
    return out


def worker_pid(server: int) -> int | None:
    for c in _children(server):
        if "strato.worker" in _cmdline(c):
            return c
    return None


def summarize(path: Path, label: str, top: int) -> None:
    inclusive: collections.Counter = collections.Counter()
    self_: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for f in set(frames):
            inclusive[f] += n
        self_[frames[-1]] += n
    if not total:
        print(f"== {label}: no samples")
        return
    print(f"\n== {label}: {total} samples")
    print("-- inclusive (% of samples with the frame on the stack)")
    for f, n in inclusive.most_common(top):
        print(f"{100 * n / total:6.1f}%  {f}")
    print("-- self (% of samples with the frame on top)")
    for f, n in self_.most_common(top):
        print(f"{100 * n / total:6.1f}%  {f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=["remote", "map"])
    ap.add_argument("--seconds", type=float, default=10.0, help="remote: how long to call")
    ap.add_argument("--n", type=int, default=20000, help="map: inputs")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--idle", action="store_true", help="include idle (waiting) samples")
    ap.add_argument("--keep", metavar="DIR", help="keep py-spy's raw collapsed stacks here")
    args = ap.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out_dir = Path(args.keep or tempfile.mkdtemp(prefix="strato-prof-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    with strato_env():
        with app.run(quiet=True):
            noop.remote(0)
            list(noop.map(range(2000)))  # containers up, the function's duration known
            for i in range(200):
                noop.remote(i)
            server = server_pid()
            targets = {"control-plane": server}
            cts = container_pids(server)
            if cts:
                targets["container"] = cts[0]
            note(f"profiling {targets} ({len(cts)} containers live)")
            procs = {}
            for label, pid in targets.items():
                cmd = [pyspy, "record", "--pid", str(pid), "--rate", str(args.rate)]
                cmd += ["--format", "raw", "-o", str(out_dir / f"{label}.txt"), "--nonblocking"]
                if args.idle:
                    cmd.append("--idle")
                procs[label] = subprocess.Popen(
                    cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            time.sleep(1.0)  # py-spy attaches
            t0 = time.perf_counter()
            if args.workload == "remote":
                n = 0
                while time.perf_counter() - t0 < args.seconds:
                    noop.remote(n)
                    n += 1
                what = f"{n} .remote() calls"
            else:
                n = sum(1 for _ in noop.map(range(args.n)))
                what = f"map over {n} inputs"
            elapsed = time.perf_counter() - t0
            note(f"{what} in {elapsed:.2f}s ({n / elapsed:.0f}/s) under py-spy")
            for p in procs.values():
                p.send_signal(2)  # SIGINT: py-spy writes its output and exits
            for p in procs.values():
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
    for label in procs:
        path = out_dir / f"{label}.txt"
        if path.exists():
            summarize(path, label, args.top)
    if args.keep:
        note(f"raw stacks in {out_dir}")
    else:
        shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    threading.current_thread().name = "main"
    main()
