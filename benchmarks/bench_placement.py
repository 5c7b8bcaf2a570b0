"""Placement rate of the scheduler: 1,000 nodes of mixed shapes (CPU, memory, GPU types,
prices) and 10,000 pending containers of mixed shapes, placed one after another (place,
then reserve), as the fleet does.

Two placers over the same cluster and the same containers, one after the other:
- ``indexed``: ``strato.server.cluster.placer.Placer`` (nodes grouped by shape, each group
  sorted by free fraction);
- the baseline, ``scan``: ``strato.server.scheduler.place`` (every node checked for every
  container), on the first ``--baseline`` containers (a full run takes minutes).

Both must decide the same (same node and GPUs for every container the baseline placed:
checked, counted as ``agree``). Prints one JSON object per result: placements per second
of each, and their ratio. Target: >= 10,000 placements/s for ``indexed``. Pure: no
control plane, no processes.

    python benchmarks/bench_placement.py [--nodes 1000] [--containers 10000] [--baseline 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from strato.protocol.gpu import parse_gpu
from strato.server.cluster.placer import Placer
from strato.server.scheduler.placement import ContainerRequest, NodeView, place, reserve

SHAPES = [  # (cpu, memory MiB, gpus)
    (8.0, 32768, {}),
    (16.0, 65536, {}),
    (32.0, 131072, {}),
    (64.0, 262144, {}),
    (16.0, 131072, {"A10G": 4}),
    (32.0, 262144, {"A100-80GB": 8}),
    (64.0, 524288, {"H100": 8}),
]
PRICES = [0.0, 0.5, 1.0, 2.0]
REGIONS = ["us-east-1", "us-west-2", "eu-west-1"]


def cluster(n: int, rng: random.Random) -> list[NodeView]:
    nodes = []
    for i in range(n):
        cpu, mem, gpus = SHAPES[rng.randrange(len(SHAPES))]
        nodes.append(
            NodeView(
                node_id=f"node-{i:05d}",
                provider=rng.choice(["local", "joined", "ray"]),
                region=rng.choice(REGIONS),
                price_per_hour=rng.choice(PRICES) + (3.0 if gpus else 0.0),
                cpu_total=cpu,
                memory_mb=mem,
                gpus={t: list(range(c)) for t, c in gpus.items()},
            )
        )
    return nodes


def containers(n: int, rng: random.Random) -> list[ContainerRequest]:
    out = []
    for _ in range(n):
        k = rng.random()
        gpu = []
        if k < 0.04:
            gpu = parse_gpu("H100:2")
        elif k < 0.08:
            gpu = parse_gpu(["A100-80GB", "H100"])  # a fallback list
        elif k < 0.12:
            gpu = parse_gpu("A10G")
        region = rng.choice([None, None, None, "us", "eu-west-1"])
        out.append(
            ContainerRequest(
                cpu=rng.choice([0.125, 0.25, 0.5, 1.0, 2.0, 4.0]),
                memory_mb=rng.choice([128, 256, 512, 1024, 2048, 8192]),
                gpu=gpu,
                region=region,
            )
        )
    return out


def copy(nodes: list[NodeView]) -> list[NodeView]:
    return [n.copy() for n in nodes]


def run(args: argparse.Namespace) -> list[dict]:
    rng = random.Random(args.seed)
    nodes = cluster(args.nodes, rng)
    pending = containers(args.containers, rng)

    placer = Placer(copy(nodes))
    decided = []
    t0 = time.perf_counter()
    for req in pending:
        p = placer.place(req)
        if p is not None:
            placer.reserve(req, p)
        decided.append(p)
    indexed_s = time.perf_counter() - t0
    placed = sum(p is not None for p in decided)

    scan_nodes = copy(nodes)
    by_id = {n.node_id: n for n in scan_nodes}
    k = min(args.baseline, len(pending))
    agree = 0
    t0 = time.perf_counter()
    reference = []
    for req in pending[:k]:
        p = place(req, scan_nodes)
        if p is not None:
            reserve(by_id[p.node_id], req, p)
        reference.append(p)
    scan_s = time.perf_counter() - t0
    for a, b in zip(reference, decided[:k], strict=True):
        agree += a == b
    indexed_rate = len(pending) / indexed_s
    scan_rate = k / scan_s
    common = {"nodes": args.nodes, "containers": len(pending), "placed": placed}
    return [
        {
            "benchmark": "placement",
            "placer": "indexed",
            "placements_per_s": round(indexed_rate),
            "seconds": round(indexed_s, 3),
            "groups": len(placer.groups),
            "target_per_s": 10000,
            "meets_target": indexed_rate >= 10000,
            **common,
        },
        {
            "benchmark": "placement",
            "placer": "scan (baseline: scheduler.place)",
            "placements_per_s": round(scan_rate),
            "measured_on": k,
            **common,
        },
        {
            "benchmark": "placement",
            "ratio_indexed_to_scan": round(indexed_rate / scan_rate, 1),
            "decisions_compared": k,
            "decisions_agree": agree,
        },
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--containers", type=int, default=10000)
    ap.add_argument("--baseline", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)
    results = run(args)
    for r in results:
        print(json.dumps(r), flush=True)
    return 0 if results[-1]["decisions_agree"] == results[-1]["decisions_compared"] else 1


if __name__ == "__main__":
    sys.exit(main())
