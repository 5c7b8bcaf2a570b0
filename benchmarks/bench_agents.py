"""Many worker agents on one control plane.

1. ``heartbeats``: ``--agents`` (200) simulated agents, asyncio clients in this process
   speaking the real protocol over TCP (join token, ``WorkerHello``, a ``Heartbeat`` every
   ``--every`` seconds), joined to a control plane that runs no local agent. The figure:
   the control plane's CPU time per heartbeat (CPU over a window with heartbeats minus an
   equal window with the agents connected and silent, divided by the heartbeats). The
   baseline, in the same run with the same clients: a bare asyncio server (a subprocess)
   that only reads and decodes the same frames. Reported with their ratio.
2. ``map``: ``.map`` of ``--n`` no-ops over ``--nodes`` (4) real joined agents on this
   machine (``strato worker start`` processes, loopback) against 1 joined agent, each
   after a warm-up; the ratio of throughputs. This machine's cores are few: the point is
   that the overhead of more nodes stays flat, not that it scales up.

    python benchmarks/bench_agents.py [--agents 200] [--every 0.2] [--window 10]
                                      [--n 20000] [--nodes 4] [--skip-map]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_seconds, emit, free_port, note

import strato
from strato.protocol import frames
from strato.protocol import messages as m

app = strato.App("bench-agents")


@app.function()
def noop(x):
    return x


BARE = r"""
import asyncio, sys
from strato.protocol import frames
from strato.protocol import messages as m

async def conn(r, w):
    hello = await frames.read_frame(r)
    w.write(frames.encode(m.WorkerWelcome(node_id="x", epoch="e", http_url="")))
    while await frames.read_frame(r) is not None:
        pass

async def main():
    srv = await asyncio.start_server(conn, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    async with srv:
        await srv.serve_forever()

asyncio.run(main())
"""


def start_control_plane(home: Path, port: int, agent_port: int) -> subprocess.Popen:
    env = dict(
        os.environ,
        STRATO_HOME=str(home),
        STRATO_PORT=str(port),
        STRATO_HOST="127.0.0.1",
        STRATO_LOCAL_WORKER="0",
        STRATO_AGENT_PORT=str(agent_port),
        STRATO_WORKER_HEARTBEAT_TIMEOUT="120",
        STRATO_LOG_LEVEL="WARNING",
    )
    log = open(home / "server.log", "ab")  # noqa: SIM115 - the process keeps it
    proc = subprocess.Popen(
        [sys.executable, "-m", "strato.server"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    while not (home / "server.json").exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"the control plane did not start; see {home / 'server.log'}")
        time.sleep(0.1)
    return proc


async def simulated(port: int, token: str, n: int, every: float, window: float, pid: int) -> dict:
    conns = []
    for i in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        info = m.NodeInfo(name=f"sim-{i}", provider="sim-agent", cpu=4.0, memory_mb=8192)
        w.write(frames.encode(m.WorkerHello(token, info, "wk-" + secrets.token_hex(6))))
        welcome = await asyncio.wait_for(frames.read_frame(r), 30)
        assert isinstance(welcome, m.WorkerWelcome), welcome
        conns.append((r, w))
    await asyncio.sleep(1.0)
    # a window with the agents silent, then one with heartbeats
    c0 = cpu_seconds(pid)
    await asyncio.sleep(window)
    idle = cpu_seconds(pid) - c0
    beat = frames.encode(m.Heartbeat(running=[]))
    sent = 0
    c0 = cpu_seconds(pid)
    t_end = time.monotonic() + window
    while time.monotonic() < t_end:
        t = time.monotonic()
        for _, w in conns:
            w.write(beat)
        sent += len(conns)
        await asyncio.sleep(max(0.0, every - (time.monotonic() - t)))
    await asyncio.sleep(0.5)
    busy = cpu_seconds(pid) - c0
    for _, w in conns:
        w.close()
    return {"idle_cpu_s": idle, "busy_cpu_s": busy, "heartbeats": sent}


def bench_heartbeats(args: argparse.Namespace) -> None:
    from strato.server.cluster.join_tokens import JoinTokens

    home = Path(tempfile.mkdtemp(prefix="strato-bench-agents-"))
    port, agent_port = free_port(), free_port()
    proc = start_control_plane(home, port, agent_port)
    try:
        _, token = JoinTokens(home).create("bench")
        strato_run = asyncio.run(
            simulated(agent_port, token, args.agents, args.every, args.window, proc.pid)
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(home, ignore_errors=True)
    bare_port = free_port()
    bare = subprocess.Popen([sys.executable, "-c", BARE, str(bare_port)])
    try:
        time.sleep(1.0)
        bare_run = asyncio.run(
            simulated(bare_port, "x", args.agents, args.every, args.window, bare.pid)
        )
    finally:
        bare.kill()
        bare.wait()

    def per_beat(r: dict) -> float:
        return max(r["busy_cpu_s"] - r["idle_cpu_s"], 0.0) / max(r["heartbeats"], 1)

    s, b = per_beat(strato_run), per_beat(bare_run)
    emit(
        {
            "benchmark": "agents_heartbeats",
            "agents": args.agents,
            "heartbeat_every_s": args.every,
            "window_s": args.window,
            "strato_cpu_us_per_heartbeat": round(s * 1e6, 1),
            "bare_cpu_us_per_heartbeat": round(b * 1e6, 1),
            "ratio_strato_to_bare": round(s / b, 2) if b > 0 else None,
            "strato_idle_cpu_s": round(strato_run["idle_cpu_s"], 3),
            "heartbeats": strato_run["heartbeats"],
        }
    )


def bench_map(args: argparse.Namespace) -> None:
    from strato.client import session
    from strato.server.cluster.join_tokens import JoinTokens

    rates = {}
    for nodes in (1, args.nodes):
        home = Path(tempfile.mkdtemp(prefix="strato-bench-map-nodes-"))
        port, agent_port = free_port(), free_port()
        proc = start_control_plane(home, port, agent_port)
        agents: list[tuple[subprocess.Popen, Path]] = []
        os.environ["STRATO_HOME"] = str(home)
        os.environ["STRATO_SERVER_URL"] = f"http://127.0.0.1:{port}"
        session.reset()
        try:
            _, token = JoinTokens(home).create("bench")
            for i in range(nodes):
                ahome = Path(tempfile.mkdtemp(prefix="strato-bench-node-"))
                env = dict(
                    os.environ,
                    STRATO_HOME=str(ahome),
                    STRATO_RUNTIME="process",
                    PYTHONPATH=str(Path(__file__).parent),
                )
                env.pop("STRATO_SERVER_URL")
                agents.append(
                    (
                        subprocess.Popen(
                            [sys.executable, "-m", "strato.cli.main", "worker", "start"]
                            + ["--server", f"http://127.0.0.1:{port}", "--join-token", token]
                            + ["--name", f"n{i}", "--agent-port", str(agent_port)],
                            env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        ),
                        ahome,
                    )
                )
            deadline = time.monotonic() + 60
            while True:
                listed = session.api().call("GET", "/nodes", None, m.NodeList).nodes
                if sum(n.state == "ready" for n in listed) >= nodes:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit("the agents did not join")
                time.sleep(0.2)
            with app.run(quiet=True):
                list(noop.map(range(min(args.n, 2000))))  # warm-up
                t0 = time.perf_counter()
                out = list(noop.map(range(args.n)))
                elapsed = time.perf_counter() - t0
                assert out == list(range(args.n))
            rates[nodes] = args.n / elapsed
            note(f"{nodes} node(s): {rates[nodes]:.0f} inputs/s")
        finally:
            session.reset()
            for p, _ in agents:
                p.send_signal(signal.SIGTERM)
            for p, ahome in agents:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                shutil.rmtree(ahome, ignore_errors=True)
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            shutil.rmtree(home, ignore_errors=True)
    emit(
        {
            "benchmark": "agents_map",
            "inputs": args.n,
            "nodes": args.nodes,
            "inputs_per_s_1_node": round(rates[1]),
            f"inputs_per_s_{args.nodes}_nodes": round(rates[args.nodes]),
            "ratio_many_to_one": round(rates[args.nodes] / rates[1], 2),
        }
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=200)
    # (agents beat every 5 s by default; faster here so the CPU is above the clock tick)
    ap.add_argument("--every", type=float, default=0.2)
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--skip-map", action="store_true")
    args = ap.parse_args(argv)
    bench_heartbeats(args)
    if not args.skip_map:
        bench_map(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
