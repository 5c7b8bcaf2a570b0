"""Web endpoints: one raw ASGI app served through strato's gateway vs by plain uvicorn.

The app (``hello_app`` below: 200, ``text/plain``, 13 bytes) runs

- through strato: ``@app.function() @strato.concurrent(max_inputs=1000)
  @strato.asgi_app()``, deployed on a fresh embedded control plane, one warm container,
  requests to ``http://127.0.0.1:<gateway>/bench-web/hello/``;
- directly: ``uvicorn bench_web:hello_app`` (httptools, uvloop, no access log, one
  process) on a free port of this machine.

Load comes from ``wrk`` (Debian's ``apt-get install -y wrk``) with keep-alive connections,
or, without wrk, from a small asyncio keep-alive client. Results, one JSON line each:

- ``web_throughput``: requests/s with ``--connections`` (64) connections for
  ``--seconds`` (8); target: strato / direct >= 0.5.
- ``web_latency``: p50 (and p90/p99) of one connection's sequential requests; target:
  strato p50 - direct p50 <= 1 ms.
- ``web_cold_start``: the first request to an endpoint at zero containers (worker's own
  Python, nothing to build), median of ``--cold`` (3) fresh apps, against starting plain
  uvicorn with the same app and waiting for its first response.

    .venv/bin/python benchmarks/bench_web.py [--seconds 8] [--connections 64] [--cold 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import emit, free_port, note, strato_env

import strato

HERE = Path(__file__).resolve().parent
BODY = b"hello, world\n"
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]


async def hello_app(scope, receive, send):
    """The raw ASGI app both sides serve."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            await send({"type": msg["type"] + ".complete"})
            if msg["type"] == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


app = strato.App("bench-web")


@app.function()
@strato.concurrent(max_inputs=1000)
@strato.asgi_app()
def hello():
    return hello_app


# ---------------------------------------------------------------------- load generation

WRK_LUA = """
done = function(summary, latency, requests)
  io.write(string.format("STRATO_BENCH %d %d %d %f %f %f %f\\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read +
    summary.errors.write + summary.errors.timeout, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


def run_wrk(url: str, connections: int, seconds: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_LUA)
        script = f.name
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", script, url],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        ).stdout
    finally:
        os.unlink(script)
    m = re.search(r"STRATO_BENCH (\d+) (\d+) (\d+) (\S+) (\S+) (\S+) (\S+)", out)
    if m is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    n, errors, dur_us = int(m[1]), int(m[2]), int(m[3])
    return {
        "requests": n,
        "errors": errors,
        "per_s": n / (dur_us / 1e6),
        "p50_ms": float(m[4]) / 1e3,
        "p90_ms": float(m[5]) / 1e3,
        "p99_ms": float(m[6]) / 1e3,
    }


async def _py_load(host: str, port: int, path: str, connections: int, seconds: float) -> dict:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    lat: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        perf = time.perf_counter
        while perf() < deadline:
            t0 = perf()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            n = int(re.search(rb"content-length: *(\d+)", head, re.I)[1])
            await reader.readexactly(n)
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
            lat.append(perf() - t0)
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    dur = time.perf_counter() - t0
    lat.sort()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(len(lat) * q))] * 1e3

    return {
        "requests": len(lat),
        "errors": errors,
        "per_s": len(lat) / dur,
        "p50_ms": pct(0.5),
        "p90_ms": pct(0.9),
        "p99_ms": pct(0.99),
    }


def load(url: str, connections: int, seconds: float) -> dict:
    if shutil.which("wrk"):
        return run_wrk(url, connections, seconds)
    m = re.match(r"http://([^:/]+):(\d+)(/.*)?$", url)
    host, port, path = m[1], int(m[2]), m[3] or "/"
    return asyncio.run(_py_load(host, port, path, connections, seconds))


def wait_http(url: str, timeout: float) -> float:
    """Seconds until ``url`` answers 200."""
    t0 = time.perf_counter()
    deadline = t0 + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            if time.perf_counter() > deadline:
                raise
            time.sleep(0.002)


# ---------------------------------------------------------------------- the two sides


class Uvicorn:
    """Plain uvicorn serving ``hello_app`` from this file, as its own process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Start it; seconds until its first 200."""
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench_web:hello_app",
                "--port",
                str(self.port),
                "--http",
                "httptools",
                "--loop",
                "uvloop",
                "--no-access-log",
                "--log-level",
                "warning",
                "--lifespan",
                "on",
            ],
            cwd=HERE,
        )
        wait_http(self.url, 30)
        return time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def cold_start_strato(i: int) -> float:
    """Deploy a fresh app (its endpoint at zero) and time the first request."""
    fresh = strato.App(f"bench-web-cold-{i}")
    fn = fresh.function()(_cold_hello)
    fresh.deploy()
    url = fn.get_web_url() + "/"
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        assert r.status == 200 and r.read() == BODY
    dt = time.perf_counter() - t0
    fresh.stop()
    return dt


@strato.asgi_app(label="hello")
def _cold_hello():
    return hello_app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--cold", type=int, default=3)
    args = ap.parse_args()
    tool = "wrk" if shutil.which("wrk") else "asyncio"
    note(f"load generator: {tool}; {os.cpu_count()} CPUs")

    direct = Uvicorn()
    direct_start = [direct.start()]
    try:
        load(direct.url, 4, 1.0)  # warm-up
        d_tp = load(direct.url, args.connections, args.seconds)
        d_lat = load(direct.url, 1, args.seconds)
    finally:
        direct.stop()
    for _ in range(max(0, args.cold - 1)):
        again = Uvicorn()
        direct_start.append(again.start())
        again.stop()

    with strato_env():
        app.deploy()
        url = hello.get_web_url() + "/"
        wait_http(url, 60)
        load(url, 4, 1.0)  # warm-up
        s_tp = load(url, args.connections, args.seconds)
        s_lat = load(url, 1, args.seconds)
        cold = [cold_start_strato(i) for i in range(args.cold)]

    ratio = s_tp["per_s"] / d_tp["per_s"]
    emit(
        {
            "benchmark": "web_throughput",
            "strato_per_s": round(s_tp["per_s"], 1),
            "direct_per_s": round(d_tp["per_s"], 1),
            "ratio": round(ratio, 3),
            "connections": args.connections,
            "seconds": args.seconds,
            "strato_errors": s_tp["errors"],
            "direct_errors": d_tp["errors"],
            "strato_p50_ms_loaded": round(s_tp["p50_ms"], 3),
            "direct_p50_ms_loaded": round(d_tp["p50_ms"], 3),
            "load_generator": tool,
            "cpus": os.cpu_count(),
            "target": ">= 0.5",
            "pass": ratio >= 0.5 and s_tp["errors"] == 0,
        }
    )
    added = s_lat["p50_ms"] - d_lat["p50_ms"]
    emit(
        {
            "benchmark": "web_latency",
            "strato_p50_ms": round(s_lat["p50_ms"], 3),
            "direct_p50_ms": round(d_lat["p50_ms"], 3),
            "added_p50_ms": round(added, 3),
            "ratio": round(s_lat["p50_ms"] / d_lat["p50_ms"], 3),
            "strato_p99_ms": round(s_lat["p99_ms"], 3),
            "direct_p99_ms": round(d_lat["p99_ms"], 3),
            "requests": s_lat["requests"],
            "load_generator": tool,
            "target": "added p50 <= 1 ms",
            "pass": added <= 1.0,
        }
    )
    s_cold, d_cold = statistics.median(cold), statistics.median(direct_start)
    emit(
        {
            "benchmark": "web_cold_start",
            "strato_first_request_ms": round(s_cold * 1e3, 1),
            "uvicorn_start_ms": round(d_cold * 1e3, 1),
            "ratio": round(s_cold / d_cold, 3),
            "samples_ms": [round(c * 1e3, 1) for c in cold],
            "what": "first request to an endpoint at zero containers (no image to build) vs "
            "starting plain uvicorn and waiting for its first response",
        }
    )


if __name__ == "__main__":
    socket.setdefaulttimeout(60)
    main()
