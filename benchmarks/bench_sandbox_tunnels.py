"""Sandbox tunnels: an HTTP server inside a ``block_network`` sandbox reached through
``sb.tunnels()``, against the same server run as a plain process on the host's loopback.
Each sandbox is reached two ways: the port's own listener (``tls_socket``) and the web
gateway's port (``Tunnel.url``, the tunnel's host name in ``Host``: the gateway reads the
first head, then splices the connection into the same tunnel).

- **request on a new connection**: connect, ``GET /small`` (13 bytes), read, close. Through
  a tunnel each connection is a listener accept, an ``SbTunnelOpen`` to the agent, its
  connection to the port and its dial of the channel socket.
- **request on a kept-alive connection**: ``GET /small`` on one HTTP/1.1 connection.
- **bulk download**: ``GET /big`` (``--mib`` MiB), in MB/s.

Baseline, in the same run and interleaved: the same server script as a host process, the
same client. One JSON line per result with its ratio to the baseline (p50 for latencies,
throughput for the download).

    .venv/bin/python benchmarks/bench_sandbox_tunnels.py [--runs 200] [--runtimes bwrap,gvisor]
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from urllib.parse import urlsplit

from _common import emit, free_port, latency_summary, note, strato_env

import strato

SERVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BIG = b"x" * (int(sys.argv[2]) << 20)

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # head and body in one write (no Nagle wait between them)

    def do_GET(self):
        body = BIG if self.path == "/big" else b"hello, world\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


Target = tuple[str, int, dict[str, str]]  # host, port, headers (the Host of a gateway URL)


def new_connection(t: Target) -> float:
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(t[0], t[1], timeout=30)
    c.request("GET", "/small", headers=t[2])
    assert c.getresponse().read() == b"hello, world\n"
    c.close()
    return time.perf_counter() - t0


def kept_alive(c: http.client.HTTPConnection, headers: dict[str, str]) -> float:
    t0 = time.perf_counter()
    c.request("GET", "/small", headers=headers)
    assert c.getresponse().read() == b"hello, world\n"
    return time.perf_counter() - t0


def download(t: Target, mib: int) -> float:
    """MB/s of one ``GET /big``."""
    c = http.client.HTTPConnection(t[0], t[1], timeout=60)
    t0 = time.perf_counter()
    c.request("GET", "/big", headers=t[2])
    r = c.getresponse()
    n = 0
    while chunk := r.read(1 << 20):
        n += len(chunk)
    took = time.perf_counter() - t0
    c.close()
    assert n == mib << 20
    return n / took / 1e6


def wait_up(t: Target) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            new_connection(t)
            return
        except (OSError, http.client.HTTPException, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--downloads", type=int, default=5)
    ap.add_argument("--runtimes", default="bwrap,gvisor")
    args = ap.parse_args()
    names = [n for n in args.runtimes.split(",") if n]
    missing = [n for n in names if not shutil.which("runsc" if n == "gvisor" else n)]
    if missing:
        raise SystemExit(f"not installed: {', '.join(missing)}")
    tmp = tempfile.mkdtemp(prefix="bench-tunnels-")
    script = f"{tmp}/server.py"
    with open(script, "w") as f:
        f.write(SERVER)
    base_port = free_port()
    base = subprocess.Popen([sys.executable, script, str(base_port), str(args.mib)])
    targets: dict[str, Target] = {"direct": ("127.0.0.1", base_port, {})}
    try:
        with strato_env():
            app = strato.App.lookup(f"bench-tunnels-{uuid.uuid4().hex[:6]}", create_if_missing=True)
            live = []
            for n in names:
                sb = strato.Sandbox.create(
                    app=app, runtime=n, block_network=True, unencrypted_ports=[8000], timeout=3600
                )
                live.append(sb)
                with sb.open("/tmp/server.py", "w") as f:
                    f.write(SERVER)
                sb.exec("python3", "/tmp/server.py", "8000", str(args.mib))
                t = sb.tunnels()[8000]
                targets[n] = (t.host, t.port, {})
                gw = urlsplit(t.url)
                assert gw.port is not None, t.url
                targets[f"{n} via gateway"] = ("127.0.0.1", gw.port, {"Host": gw.netloc})
            try:
                for target in targets.values():
                    wait_up(target)
                measure(targets, args)
            finally:
                for sb in live:
                    sb.terminate()
    finally:
        base.kill()
        base.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def measure(targets: dict[str, Target], args: argparse.Namespace) -> None:
    fresh: dict[str, list[float]] = {k: [] for k in targets}
    alive: dict[str, list[float]] = {k: [] for k in targets}
    conns = {k: http.client.HTTPConnection(t[0], t[1], timeout=30) for k, t in targets.items()}
    for i in range(args.warmup + args.runs):
        for k, t in targets.items():  # interleaved: the machine's load is shared
            a, b = new_connection(t), kept_alive(conns[k], t[2])
            if i >= args.warmup:
                fresh[k].append(a)
                alive[k].append(b)
    rates: dict[str, list[float]] = {k: [] for k in targets}
    for _ in range(args.downloads):
        for k, t in targets.items():
            rates[k].append(download(t, args.mib))
    note(f"{args.runs} runs per target; {args.downloads} downloads of {args.mib} MiB")
    for what, samples in (("new connection + GET", fresh), ("kept-alive GET", alive)):
        direct = latency_summary(samples["direct"])
        emit({"bench": "sandbox_tunnels", "what": f"{what}, direct", **direct})
        for k in targets:
            if k == "direct":
                continue
            s = latency_summary(samples[k])
            emit({"bench": "sandbox_tunnels", "what": f"{what}, tunnel, {k}", **s,
                  "ratio_to_direct": round(s["p50_ms"] / direct["p50_ms"], 2)})  # fmt: skip
    direct_rate = sorted(rates["direct"])[len(rates["direct"]) // 2]
    emit({"bench": "sandbox_tunnels", "what": f"download {args.mib} MiB, direct",
          "mb_per_s": round(direct_rate, 1)})  # fmt: skip
    for k in targets:
        if k == "direct":
            continue
        rate = sorted(rates[k])[len(rates[k]) // 2]
        ratio = round(rate / direct_rate, 2)
        emit({"bench": "sandbox_tunnels", "what": f"download {args.mib} MiB, tunnel, {k}",
              "mb_per_s": round(rate, 1), "ratio_to_direct": ratio})  # fmt: skip


if __name__ == "__main__":
    socket.setdefaulttimeout(60)
    main()
