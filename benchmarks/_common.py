"""Shared helpers of strato's benchmarks (stdlib only: containers import this module too).

Each benchmark runs strato against its own embedded control plane, in a fresh
``STRATO_HOME`` (a temporary directory) on a free port, and stops it when done; then it
runs the Ray baseline on the same machine, one after the other, never concurrently.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path


def emit(result: dict) -> None:
    """Print one result as one JSON line on stdout."""
    print(json.dumps(result), flush=True)


def note(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of an already sorted list, by linear interpolation."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def latency_summary(samples_s: list[float]) -> dict:
    s = sorted(samples_s)
    return {
        "p50_ms": round(percentile(s, 50) * 1e3, 4),
        "p90_ms": round(percentile(s, 90) * 1e3, 4),
        "p99_ms": round(percentile(s, 99) * 1e3, 4),
        "mean_ms": round(sum(s) / len(s) * 1e3, 4),
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=0.5):
            return True
    except OSError:
        return False


def server_pid(home: str | os.PathLike | None = None) -> int:
    home = Path(home or os.environ["STRATO_HOME"])
    return int(json.loads((home / "server.json").read_text())["pid"])


def rss_kb(pid: int) -> dict:
    """VmRSS and VmHWM (peak) of a process, in kB, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _alive(pid: int) -> bool:
    """Whether pid runs; a zombie (the embedded control plane is this process's child,
    started by the strato client and never waited for) counts as gone, and is reaped."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _stop_server(home: Path, timeout: float = 30.0) -> None:
    try:
        pid = server_pid(home)
    except (OSError, ValueError, KeyError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    note(f"control plane {pid} still alive {timeout:g}s after SIGTERM; sending SIGKILL")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def strato_env():
    """A fresh embedded control plane for this benchmark.

    Uses ``STRATO_HOME``/``STRATO_SERVER_URL`` when both are set (``run_all.py`` sets them,
    fresh for each benchmark); otherwise makes a temporary ``STRATO_HOME`` and picks a
    free port. The control plane starts on the first strato call, and is stopped
    (SIGTERM to the pid in ``$STRATO_HOME/server.json``) on exit.
    """
    made = None
    if not (os.environ.get("STRATO_HOME") and os.environ.get("STRATO_SERVER_URL")):
        made = tempfile.mkdtemp(prefix="strato-bench-")
        os.environ["STRATO_HOME"] = made
        os.environ["STRATO_SERVER_URL"] = f"http://127.0.0.1:{free_port()}"
    home = Path(os.environ["STRATO_HOME"])
    url = os.environ["STRATO_SERVER_URL"]
    if _ping(url):
        raise SystemExit(
            f"a control plane already answers at {url}: the benchmarks need a fresh one "
            "(unset STRATO_HOME/STRATO_SERVER_URL to get a temporary one)"
        )
    os.environ.setdefault("STRATO_LOG_LEVEL", "WARNING")
    try:
        yield home
    finally:
        from strato.client import session

        session.reset()
        _stop_server(home)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


@contextlib.contextmanager
def ray_env():
    """A local Ray instance: ``ray.init(num_cpus=2, include_dashboard=False)``."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used, from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


def descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        try:
            kids = [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            kids = []
        out += kids
        stack += kids
    return out


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class CpuMeter:
    """CPU seconds used by the control plane, its worker agent, its containers and this
    client process between ``start()`` and ``stop()`` (containers that exit in between
    are not counted)."""

    def __init__(self, server: int) -> None:
        self.server = server

    def _sample(self) -> dict[str, float]:
        out = {"control_plane": cpu_seconds(self.server), "worker": 0.0, "containers": 0.0}
        for p in descendants(self.server):
            kind = "containers" if "strato.container" in _cmd(p) else "worker"
            out[kind] += cpu_seconds(p)
        t = os.times()
        out["client"] = t.user + t.system
        return out

    def start(self) -> None:
        self._t0 = self._sample()

    def stop(self) -> dict[str, float]:
        t1 = self._sample()
        return {k: t1[k] - self._t0[k] for k in t1}

    @staticmethod
    def per_item_us(used: dict[str, float], n: int) -> dict[str, float]:
        return {k: round(v / n * 1e6, 1) for k, v in used.items()}


def wait_containers_settled(server: int, timeout: float = 20.0, quiet_cpu_s: float = 0.02) -> int:
    """Wait until the control plane's containers stop burning CPU (the ones the autoscaler
    started late are done importing); returns how many container processes there are."""
    deadline = time.monotonic() + timeout

    def ct_cpu() -> tuple[int, float]:
        pids = [p for p in descendants(server) if "strato.container" in _cmd(p)]
        return len(pids), sum(cpu_seconds(p) for p in pids)

    n, before = ct_cpu()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        n, now = ct_cpu()
        if now - before < quiet_cpu_s:
            break
        before = now
    return n
