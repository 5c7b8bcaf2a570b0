"""strato.Dict and strato.Queue against Redis, both measured in one run on this machine.

Starts Debian's ``redis-server`` itself on a free port (no persistence by default;
``--redis-appendfsync everysec`` or ``always`` turns its append-only file on, Redis's own
durable settings), and an embedded strato control plane (SQLite, every change committed
before it answers: it survives a SIGKILL of the control plane, not a power loss).
Measures, from a client, one operation at a time after a warm-up:

- ``dict_put`` / ``dict_get``: ``d[k] = v`` / ``d[k]`` vs ``SET`` / ``GET`` (p50, p90, p99),
  each key read once after its put; ``dict_get_hot``: reads of 100 keys over and over;
- ``queue_put_get``: ``q.put(v)`` then ``q.get()`` vs ``RPUSH`` then ``BLPOP`` (pairs/s);
- ``queue_batch``: ``put_many(100)`` then ``get_many(100)`` vs ``RPUSH`` x100 then
  ``LPOP 100`` (items/s);
- ``http_floor``: the control plane's cheapest route (``GET /health``) vs ``PING``: what
  any API call costs before it does anything (the floor under every strato figure);
- ``queue_consumer_container``: a consumer loop in a container (``get_many(1000)``,
  over its channel) while this process produces, items/s, vs the same loop against Redis
  from this process (target: >= 5,000 items/s).

Values are pickled on both sides. Each result is one JSON line with its ratio to Redis
(strato / Redis for latencies, Redis / strato for rates: above 1 means slower), target
<= 2 for single operations.

    .venv/bin/python benchmarks/state_vs_redis.py [--ops 2000] [--warmup 200] [--rounds 3]

Rounds alternate between the two sides; each figure is the side's best round.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import shutil
import subprocess
import tempfile
import threading
import time

from _common import emit, free_port, latency_summary, note, server_pid, strato_env

import strato

app = strato.App("bench-state")
VALUE = {"user": 12345, "tags": ["a", "b", "c"], "score": 0.5}


@app.function()
def consume(queue_name: str, n: int, batch: int) -> dict:
    """Take ``n`` items with ``get_many(batch)``; the rate from the first item to the last."""
    q = strato.Queue.from_name(queue_name)
    first = len(q.get_many(batch, timeout=60))  # the clock starts once items flow
    got = first
    t0 = time.perf_counter()
    while got < n:
        got += len(q.get_many(batch, timeout=60))
    elapsed = time.perf_counter() - t0
    return {"items": got - first, "seconds": elapsed}


@contextlib.contextmanager
def redis_server(appendfsync: str = "no-aof"):
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    aof = [] if appendfsync == "no-aof" else ["--appendonly", "yes", "--appendfsync", appendfsync]
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir, "--save", "", *aof],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def redis_pid(r) -> int:
    return int(r.info("server")["process_id"])


def timed(fn, n: int) -> list[float]:
    perf = time.perf_counter
    out = []
    for i in range(n):
        t0 = perf()
        fn(i)
        out.append(perf() - t0)
    return out


def rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


class StratoSide:
    def __init__(self, warmup: int) -> None:
        from strato.client import session

        self.client = session.api()
        self.d = strato.Dict.from_name("bench-dict", create_if_missing=True)
        self.q = strato.Queue.from_name("bench-queue", create_if_missing=True)
        for i in range(warmup):
            self.d[f"k{i}"] = VALUE
            self.d[f"k{i}"]
            self.q.put(i)
            self.q.get()

    def single(self, ops: int) -> dict:
        d, q, client = self.d, self.q, self.client

        def put(i: int) -> None:
            d[f"k{i}"] = VALUE

        def get(i: int) -> None:
            d[f"k{i}"]

        batch = list(range(100))
        return {
            "dict_put": latency_summary(timed(put, ops)),
            "dict_get": latency_summary(timed(get, ops)),
            "dict_get_hot": latency_summary(timed(lambda i: get(i % 100), ops)),
            "http_floor": latency_summary(
                timed(lambda i: client.request_raw("GET", "/health"), ops)
            ),
            "queue_put_get": rate(lambda i: (q.put(i), q.get()), ops),
            "queue_batch": 100 * rate(lambda i: (q.put_many(batch), q.get_many(100)), ops // 10),
        }

    def consumer(self, items: int) -> float:
        """A consumer in a container, while this process produces."""
        name = "bench-consumer"
        cq = strato.Queue.from_name(name, create_if_missing=True).hydrate()
        with app.run(quiet=True):
            call = consume.spawn(name, items, 1000)
            produce(lambda batch: cq.put_many(batch), items)
            res = call.get(timeout=600)
        return res["items"] / res["seconds"]


def produce(put_many, n: int) -> None:
    for i in range(0, n, 1000):
        put_many(list(range(i, min(n, i + 1000))))


class RedisSide:
    def __init__(self, r, warmup: int) -> None:
        self.r = r
        for i in range(warmup):
            r.set(f"k{i}", pickle.dumps(VALUE))
            pickle.loads(r.get(f"k{i}"))
            r.rpush("q", pickle.dumps(i))
            pickle.loads(r.blpop(["q"], timeout=10)[1])

    def single(self, ops: int) -> dict:
        r = self.r

        def put(i: int) -> None:
            r.set(f"k{i}", pickle.dumps(VALUE))

        def get(i: int) -> None:
            pickle.loads(r.get(f"k{i}"))

        def put_get(i: int) -> None:
            r.rpush("q", pickle.dumps(i))
            pickle.loads(r.blpop(["q"], timeout=10)[1])

        batch = [pickle.dumps(i) for i in range(100)]

        def put_get_batch(i: int) -> None:
            r.rpush("q", *batch)
            [pickle.loads(x) for x in r.lpop("q", 100)]

        return {
            "dict_put": latency_summary(timed(put, ops)),
            "dict_get": latency_summary(timed(get, ops)),
            "dict_get_hot": latency_summary(timed(lambda i: get(i % 100), ops)),
            "http_floor": latency_summary(timed(lambda i: r.ping(), ops)),
            "queue_put_get": rate(put_get, ops),
            "queue_batch": 100 * rate(put_get_batch, ops // 10),
        }

    def consumer(self, items: int) -> float:
        """The same consumer loop, against Redis, while another thread produces."""
        r = self.r
        result: dict = {}

        def consume_redis() -> None:
            got = first = 0
            t0 = None
            while got < items:
                batch = r.lpop("cq", 1000)
                if not batch:
                    _, one = r.blpop(["cq"], timeout=60)
                    batch = [one]
                got += len([pickle.loads(x) for x in batch])
                if t0 is None:  # the clock starts once items flow, as in the container
                    t0, first = time.perf_counter(), got
            assert t0 is not None
            result["rate"] = (got - first) / (time.perf_counter() - t0)

        t = threading.Thread(target=consume_redis)
        t.start()
        produce(lambda batch: r.rpush("cq", *[pickle.dumps(x) for x in batch]), items)
        t.join(600)
        return result["rate"]


def best(rounds: list[dict]) -> dict:
    """Per figure, the best round (lowest p50 latency, highest rate): noise only slows."""
    out = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        if isinstance(values[0], dict):
            out[key] = min(values, key=lambda v: v["p50_ms"])
        else:
            out[key] = max(values)
    return out


def placements(names: list[str]) -> dict[str, tuple[set[int], set[int]] | None]:
    """The CPU placements asked for: name -> (the servers' CPUs, the client's), or None to
    leave both to the scheduler. ``split`` needs two CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    known: dict[str, tuple[set[int], set[int]] | None] = {
        "same": ({cpus[0]}, {cpus[0]}),
        "free": None,
    }
    if len(cpus) > 1:
        known["split"] = ({cpus[1]}, {cpus[0]})
    out = {}
    for name in names:
        if name not in known:
            raise SystemExit(f"placement {name!r}: this machine offers {sorted(known)}")
        out[name] = known[name]
    return out


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` onto ``cpus`` (threads started later inherit it
    from the thread that starts them)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def place(placement: tuple[set[int], set[int]] | None, servers: list[int]) -> None:
    server_cpus, client_cpus = placement or (ALL_CPUS, ALL_CPUS)
    for pid in servers:
        pin(pid, server_cpus)
    pin(os.getpid(), client_cpus)


ALL_CPUS = os.sched_getaffinity(0)


def single_rounds(redis_side, strato_side, rounds: int, ops: int) -> tuple[dict, dict]:
    their_rounds, our_rounds = [], []
    for i in range(rounds):  # alternating, one side at a time
        note(f"  round {i}: redis")
        their_rounds.append(redis_side.single(ops))
        note(f"  round {i}: strato")
        our_rounds.append(strato_side.single(ops))
    return best(their_rounds), best(our_rounds)


def emit_single(theirs: dict, ours: dict, placement: str, args) -> list[bool]:
    """One line per figure; returns the pass of each judged one."""
    passed = []
    common = {"placement": placement, "redis_appendfsync": args.redis_appendfsync}
    for op in ("dict_put", "dict_get", "dict_get_hot", "http_floor"):
        for q in ("p50", "p90", "p99"):
            ratio = round(ours[op][f"{q}_ms"] / theirs[op][f"{q}_ms"], 3)
            line = {
                "benchmark": f"{op}_{q}",
                "strato_ms": ours[op][f"{q}_ms"],
                "redis_ms": theirs[op][f"{q}_ms"],
                "ratio": ratio,
                "ops": args.ops,
                **common,
            }
            if q == "p50" and op != "http_floor":
                line.update(target="<= 2", **{"pass": ratio <= 2})
                line["strato_over_http_floor"] = round(
                    ours[op]["p50_ms"] / ours["http_floor"]["p50_ms"], 3
                )
                passed.append(ratio <= 2)
            emit(line)
    for op, unit in (("queue_put_get", "pairs_per_s"), ("queue_batch", "items_per_s")):
        ratio = round(theirs[op] / ours[op], 3)
        emit(
            {
                "benchmark": op,
                f"strato_{unit}": round(ours[op]),
                f"redis_{unit}": round(theirs[op]),
                "ratio": ratio,
                "target": "<= 2",
                "pass": ratio <= 2,
                **common,
            }
        )
        passed.append(ratio <= 2)
    return passed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--consumer-items", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--placements",
        default="same,split,free",
        help="CPU placements of the servers and this client, comma-separated: same (one "
        "CPU for all), split (servers on one CPU, the client on another), free (the "
        "scheduler's choice)",
    )
    ap.add_argument(
        "--redis-appendfsync",
        choices=["no-aof", "everysec", "always"],
        default="no-aof",
        help="Redis's persistence: none (default), or its append-only file synced so",
    )
    args = ap.parse_args()
    chosen = placements([p.strip() for p in args.placements.split(",") if p.strip()])
    passed: list[bool] = []
    with redis_server(args.redis_appendfsync) as r, strato_env() as home:
        redis_side, strato_side = RedisSide(r, args.warmup), StratoSide(args.warmup)
        servers = [redis_pid(r), server_pid(home)]
        try:
            for name, placement in chosen.items():
                note(f"placement {name}")
                place(placement, servers)
                theirs, ours = single_rounds(redis_side, strato_side, args.rounds, args.ops)
                passed += emit_single(theirs, ours, name, args)
        finally:
            place(None, servers)  # (the consumer's containers start from the control plane)
        note("consumer loops")
        theirs = redis_side.consumer(args.consumer_items)
        ours = strato_side.consumer(args.consumer_items)
    emit(
        {
            "benchmark": "queue_consumer_container",
            "strato_items_per_s": round(ours),
            "redis_items_per_s": round(theirs),
            "ratio": round(theirs / ours, 3),
            "items": args.consumer_items,
            "target": ">= 5000 items/s",
            "pass": ours >= 5000,
        }
    )
    passed.append(ours >= 5000)
    note(f"{sum(passed)} of {len(passed)} figures within target")


if __name__ == "__main__":
    main()
