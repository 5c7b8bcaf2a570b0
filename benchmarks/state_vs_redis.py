"""strato.Dict and strato.Queue against Redis, both measured in one run on this machine.

Starts Debian's ``redis-server`` itself (default persistence: no AOF), on a free port,
and an embedded strato control plane (SQLite, every change committed before it answers).
Measures, from a client, one operation at a time after a warm-up:

- ``dict_put`` / ``dict_get``: ``d[k] = v`` / ``d[k]`` vs ``SET`` / ``GET`` (p50, p90, p99);
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

    .venv/bin/python benchmarks/state_vs_redis.py [--ops 2000] [--warmup 200]
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import shutil
import subprocess
import tempfile
import threading
import time

from _common import emit, free_port, latency_summary, note, strato_env

import strato

app = strato.App("bench-state")
VALUE = {"user": 12345, "tags": ["a", "b", "c"], "score": 0.5}


@app.function()
def consume(queue_name: str, n: int, batch: int) -> dict:
    """Take ``n`` items with ``get_many(batch)``; the rate from the first item to the last."""
    q = strato.Queue.from_name(queue_name)
    got = len(q.get_many(batch, timeout=60))
    t0 = time.perf_counter()
    while got < n:
        got += len(q.get_many(batch, timeout=60))
    elapsed = time.perf_counter() - t0
    return {"items": got, "seconds": elapsed}


@contextlib.contextmanager
def redis_server():
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir, "--save", ""],
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


def bench_strato(ops: int, warmup: int, consumer_items: int) -> dict:
    from strato.client import session

    out: dict = {}
    d = strato.Dict.from_name("bench-dict", create_if_missing=True)
    q = strato.Queue.from_name("bench-queue", create_if_missing=True)
    for i in range(warmup):
        d[f"k{i}"] = VALUE
        d[f"k{i}"]
        q.put(i)
        q.get()

    def put(i: int) -> None:
        d[f"k{i}"] = VALUE

    def get(i: int) -> None:
        d[f"k{i}"]

    out["dict_put"] = latency_summary(timed(put, ops))
    out["dict_get"] = latency_summary(timed(get, ops))
    client = session.api()
    out["http_floor"] = latency_summary(timed(lambda i: client.request_raw("GET", "/health"), ops))
    out["queue_put_get"] = rate(lambda i: (q.put(i), q.get()), ops)
    batch = list(range(100))
    out["queue_batch"] = 100 * rate(lambda i: (q.put_many(batch), q.get_many(100)), ops // 10)
    # a consumer in a container, while this process produces
    name = "bench-consumer"
    cq = strato.Queue.from_name(name, create_if_missing=True)
    with app.run(quiet=True):
        call = consume.spawn(name, consumer_items, 1000)
        produce(lambda items: cq.put_many(items), consumer_items)
        res = call.get(timeout=600)
    out["queue_consumer_container"] = res["items"] / res["seconds"]
    return out


def produce(put_many, n: int) -> None:
    for i in range(0, n, 1000):
        put_many(list(range(i, min(n, i + 1000))))


def bench_redis(r, ops: int, warmup: int, consumer_items: int) -> dict:
    out: dict = {}
    for i in range(warmup):
        r.set(f"k{i}", pickle.dumps(VALUE))
        pickle.loads(r.get(f"k{i}"))
        r.rpush("q", pickle.dumps(i))
        pickle.loads(r.blpop(["q"], timeout=10)[1])

    def put(i: int) -> None:
        r.set(f"k{i}", pickle.dumps(VALUE))

    def get(i: int) -> None:
        pickle.loads(r.get(f"k{i}"))

    out["dict_put"] = latency_summary(timed(put, ops))
    out["dict_get"] = latency_summary(timed(get, ops))
    out["http_floor"] = latency_summary(timed(lambda i: r.ping(), ops))

    def put_get(i: int) -> None:
        r.rpush("q", pickle.dumps(i))
        pickle.loads(r.blpop(["q"], timeout=10)[1])

    out["queue_put_get"] = rate(put_get, ops)
    batch = [pickle.dumps(i) for i in range(100)]

    def put_get_batch(i: int) -> None:
        r.rpush("q", *batch)
        [pickle.loads(x) for x in r.lpop("q", 100)]

    out["queue_batch"] = 100 * rate(put_get_batch, ops // 10)

    # the same consumer loop, against Redis, while another thread produces
    def consumer(result: dict) -> None:
        got = 0
        t0 = None
        while got < consumer_items:
            items = r.lpop("cq", 1000)
            if not items:
                _, first = r.blpop(["cq"], timeout=60)
                items = [first]
            if t0 is None:
                t0 = time.perf_counter()
                got += len(items)
                continue
            got += len([pickle.loads(x) for x in items])
        result["rate"] = got / (time.perf_counter() - t0)

    result: dict = {}
    t = threading.Thread(target=consumer, args=(result,))
    t.start()
    produce(lambda items: r.rpush("cq", *[pickle.dumps(x) for x in items]), consumer_items)
    t.join(600)
    out["queue_consumer_container"] = result["rate"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--consumer-items", type=int, default=50_000)
    args = ap.parse_args()
    with redis_server() as r:
        note("redis")
        theirs = bench_redis(r, args.ops, args.warmup, args.consumer_items)
    with strato_env():
        note("strato")
        ours = bench_strato(args.ops, args.warmup, args.consumer_items)
    for op in ("dict_put", "dict_get", "http_floor"):
        for q in ("p50", "p90", "p99"):
            ratio = round(ours[op][f"{q}_ms"] / theirs[op][f"{q}_ms"], 3)
            line = {
                "benchmark": f"{op}_{q}",
                "strato_ms": ours[op][f"{q}_ms"],
                "redis_ms": theirs[op][f"{q}_ms"],
                "ratio": ratio,
                "ops": args.ops,
            }
            if q == "p50" and op != "http_floor":
                line.update(target="<= 2", **{"pass": ratio <= 2})
                line["strato_over_http_floor"] = round(
                    ours[op]["p50_ms"] / ours["http_floor"]["p50_ms"], 3
                )
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
            }
        )
    op = "queue_consumer_container"
    emit(
        {
            "benchmark": op,
            "strato_items_per_s": round(ours[op]),
            "redis_items_per_s": round(theirs[op]),
            "ratio": round(theirs[op] / ours[op], 3),
            "items": args.consumer_items,
            "target": ">= 5000 items/s",
            "pass": ours[op] >= 5000,
        }
    )


if __name__ == "__main__":
    main()
