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
   after a warm-up, with the machine's CPUs shared out among the nodes (each of the 4
   offers a quarter: the same capacity, so the same containers, as the 1 node). Both
   clusters are up at once and take turns ``--rounds`` times; reported: the ratio of the
   best throughputs (and of the medians), and the CPU microseconds per input of the
   control plane, the agents, the containers and the client. This machine's cores are
   few: the point is that the overhead of more nodes stays flat, not that it scales up.

    python benchmarks/bench_agents.py [--agents 200] [--every 0.2] [--window 10]
                                      [--n 20000] [--nodes 4] [--skip-map]
                                      [--skip-heartbeats] [--rounds 5]
                                      [--node-cpu CPUS]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_seconds, descendants, emit, free_port, note, wait_containers_settled

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


class Cluster:
    """A control plane with ``nodes`` joined agents (``strato worker start`` processes on
    this machine, loopback), each offering its share of this machine's CPUs (so the 1-node
    and the n-node cluster have the same capacity: an agent that offered the whole machine
    would make n times the containers on the same cores), and a driver process (this file
    with ``--driver``) that runs the maps against it when told."""

    def __init__(self, nodes: int, warmup: int, node_cpu: float | None = None) -> None:
        from strato.server.cluster.join_tokens import JoinTokens

        self.nodes = nodes
        self.home = Path(tempfile.mkdtemp(prefix="strato-bench-map-nodes-"))
        port, agent_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{port}"
        try:
            self.proc = start_control_plane(self.home, port, agent_port)
        except SystemExit:
            print((self.home / "server.log").read_text()[-2000:], file=sys.stderr)
            shutil.rmtree(self.home, ignore_errors=True)
            raise
        self.agents: list[tuple[subprocess.Popen, Path]] = []
        self.driver: subprocess.Popen | None = None
        _, token = JoinTokens(self.home).create("bench")
        share = node_cpu or (os.cpu_count() or 1) / nodes
        for i in range(nodes):
            ahome = Path(tempfile.mkdtemp(prefix="strato-bench-node-"))
            env = dict(
                os.environ,
                STRATO_HOME=str(ahome),
                STRATO_RUNTIME="process",
                STRATO_NODE_CPU=f"{share:g}",
                PYTHONPATH=str(Path(__file__).parent),
            )
            env.pop("STRATO_SERVER_URL", None)
            cmd = [sys.executable, "-m", "strato.cli.main", "worker", "start"]
            cmd += ["--server", self.url, "--join-token", token]
            cmd += ["--name", f"n{i}", "--agent-port", str(agent_port)]
            out = open(ahome / "agent.log", "ab")  # noqa: SIM115 - the process keeps it
            p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
            self.agents.append((p, ahome))
        env = dict(os.environ, STRATO_HOME=str(self.home), STRATO_SERVER_URL=self.url)
        self.driver = subprocess.Popen(
            [sys.executable, __file__, "--driver", "--nodes", str(nodes), "--n", str(warmup)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def wait_ready(self) -> None:
        assert self.driver is not None and self.driver.stdout is not None
        line = self.driver.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"the {self.nodes}-node driver failed; see {self.home}")
        for p, _ in self.agents:  # the warm-up's late containers are done importing
            wait_containers_settled(p.pid)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the control plane, the agents and their containers."""
        out = {"control_plane": cpu_seconds(self.proc.pid), "agents": 0.0, "containers": 0.0}
        for p, _ in self.agents:
            out["agents"] += cpu_seconds(p.pid)
            out["containers"] += sum(cpu_seconds(c) for c in descendants(p.pid))
        return out

    def run_map(self, n: int) -> tuple[float, dict[str, float]]:
        """(seconds, CPU seconds per process kind) of one timed ``.map`` of ``n``."""
        assert self.driver is not None and self.driver.stdin and self.driver.stdout
        c0 = self.cpu()
        self.driver.stdin.write(f"{n}\n")
        self.driver.stdin.flush()
        reply = json.loads(self.driver.stdout.readline())
        c1 = self.cpu()
        used = {k: c1[k] - c0[k] for k in c1}
        used["client"] = reply["client_cpu_s"]
        return reply["elapsed_s"], used

    def containers_per_node(self) -> list[int]:
        assert self.driver is not None and self.driver.stdin and self.driver.stdout
        self.driver.stdin.write("containers\n")
        self.driver.stdin.flush()
        return json.loads(self.driver.stdout.readline())

    def close(self) -> None:
        if self.driver is not None:
            with contextlib.suppress(OSError):
                assert self.driver.stdin is not None
                self.driver.stdin.close()
            try:
                self.driver.wait(60)
            except subprocess.TimeoutExpired:
                self.driver.kill()
        for p, _ in self.agents:
            p.send_signal(signal.SIGTERM)
        for p, ahome in self.agents:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
            shutil.rmtree(ahome, ignore_errors=True)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        shutil.rmtree(self.home, ignore_errors=True)


def driver(nodes: int, warmup: int) -> None:
    """``--driver``: join the cluster at ``$STRATO_SERVER_URL``, warm up, say ``ready``;
    then per line on stdin: a number (time a ``.map`` of that many no-ops, answer with its
    seconds and this process's CPU seconds) or ``containers`` (live containers per node)."""
    from strato.client import session

    deadline = time.monotonic() + 60
    while (
        sum(n.state == "ready" for n in session.api().call("GET", "/nodes", None, m.NodeList).nodes)
        < nodes
    ):
        if time.monotonic() > deadline:
            raise SystemExit("the agents did not join")
        time.sleep(0.2)
    with app.run(quiet=True):
        list(noop.map(range(warmup)))
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() == "containers":
                per_node: dict[str, int] = {}
                listed = session.api().call("GET", "/containers", None, m.ContainerList)
                for c in listed.containers:
                    if c.state in ("starting", "ready"):
                        per_node[c.node_id] = per_node.get(c.node_id, 0) + 1
                print(json.dumps(sorted(per_node.values())), flush=True)
                continue
            n = int(line)
            t, c0 = time.perf_counter(), os.times()
            out = list(noop.map(range(n)))
            elapsed, c1 = time.perf_counter() - t, os.times()
            assert out == list(range(n))
            cpu = (c1.user + c1.system) - (c0.user + c0.system)
            print(json.dumps({"elapsed_s": elapsed, "client_cpu_s": cpu}), flush=True)


def bench_map(args: argparse.Namespace) -> None:
    """Both clusters are up at once (idle between their turns) and take turns, in
    alternating order, ``--rounds`` times: the machine's other load falls on both alike."""
    sizes = (1, args.nodes)
    clusters: dict[int, Cluster] = {}
    rates: dict[int, list[float]] = {k: [] for k in sizes}
    cpu: dict[int, list[dict[str, float]]] = {k: [] for k in sizes}
    try:
        for k in sizes:
            clusters[k] = Cluster(k, min(args.n, 2000), args.node_cpu)
        for k in sizes:
            clusters[k].wait_ready()
        for r in range(args.rounds):
            for k in sizes if r % 2 == 0 else sizes[::-1]:
                elapsed, used = clusters[k].run_map(args.n)
                rates[k].append(args.n / elapsed)
                cpu[k].append({p: v / args.n * 1e6 for p, v in used.items()})
                note(f"{k} node(s): {args.n / elapsed:.0f} inputs/s")
        containers = {k: clusters[k].containers_per_node() for k in sizes}
    finally:
        for c in clusters.values():
            c.close()

    def cpu_us(k: int) -> dict[str, float]:  # the median of each process kind
        return {p: round(statistics.median(c[p] for c in cpu[k]), 1) for p in cpu[k][0]}

    many = args.nodes
    total = {k: sum(cpu_us(k).values()) for k in sizes}
    best = {k: max(v) for k, v in rates.items()}
    median = {k: statistics.median(v) for k, v in rates.items()}
    emit(
        {
            "benchmark": "agents_map",
            "inputs": args.n,
            "nodes": many,
            "rounds": args.rounds,
            "node_cpu": args.node_cpu or "share",
            "inputs_per_s_1_node": round(best[1]),
            f"inputs_per_s_{many}_nodes": round(best[many]),
            "ratio_many_to_one": round(best[many] / best[1], 2),
            "ratio_of_medians": round(median[many] / median[1], 2),
            # what the ratio is on a machine the map has to itself (all of it CPU-bound):
            # the CPU one input costs on 1 node over what it costs on many
            "cpu_ratio_one_to_many": round(total[1] / total[many], 2),
            "load_average": os.getloadavg()[0],
            "cpu_us_per_input_1_node": cpu_us(1),
            f"cpu_us_per_input_{many}_nodes": cpu_us(many),
            "containers_per_node_1_node": containers[1],
            f"containers_per_node_{many}_nodes": containers[many],
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
    ap.add_argument("--skip-heartbeats", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--node-cpu",
        type=float,
        default=None,
        help="CPUs each node offers (default: this machine's CPUs / nodes)",
    )
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.driver:
        driver(args.nodes, args.n)
        return 0
    if not args.skip_heartbeats:
        bench_heartbeats(args)
    if not args.skip_map:
        bench_map(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
